"""`fastdit demo --latent rae` end to end at a reduced size: the digit encoder, its decoder by `train-decoder`,
DiT^DH-T in that latent space, samples decoded and judged; what it prints and writes (not its quality: the
figures at the recipe's size are in the README)."""

import json
import re

import numpy as np
import pytest

from fastdit.checkpoint import load_model
from fastdit.cli import main
from fastdit.demo.run import DemoConfig, train_config
from fastdit.errors import UserError
from fastdit.rae.space import describe


@pytest.mark.slow
def test_demo_in_the_rae_latent_space_runs_end_to_end(tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["demo", "--latent", "rae", "--out", out, "--steps", "6", "--batch-size", "32", "--decoder-epochs", "0.5",
            "--samples-per-class", "2", "--sampling-steps", "2", "--classifier-epochs", "1", "--no-progress"]
    assert main([str(a) for a in argv]) == 0
    printed = capsys.readouterr().out
    space = f"rae:{(out / 'decoder').resolve()}"
    assert re.search(r"samples classified as their class: \d+\.\d+% of 20 \(cfg 3\.0, euler 2 steps\)", printed)
    assert "Frechet distance in classifier features: samples vs real" in printed
    assert f"RAE latent space {space}: digit encoder tokens 64x4x4, decoder trained 11 steps" in printed
    assert re.search(r"decoder on 359 held-out digits: PSNR -?\d+\.\d dB, \d+\.\d+% classified as their class", printed)
    assert "the pixel demo for comparison" in printed
    report = json.loads((out / "report.json").read_text())
    assert report["latent"]["space"] == space and report["config"]["objective"] == "rae"
    # The decoder's run folder is the latent space the DiT trained in; its checkpoint records that space.
    assert describe(space).latent_shape == (64, 4, 4) and describe(space).channels == 1
    model, info = load_model(out / "train" / "checkpoints" / "0000006-ema.safetensors")
    assert info.latent.vae == space and info.objective.name == "rae" and model.config.in_channels == 64
    with np.load(out / "samples.npz") as samples:
        assert samples["arr_0"].shape == (20, 8, 8, 3)


def test_rae_latent_flags_are_checked(tmp_path, capsys):
    for flags, message in ((["--latent", "rae", "--objective", "flow"], "--latent rae trains RAE's DiT^DH"),
                           (["--latent", "rae", "--repa"], "--repa aligns a pixel-space DiT"),
                           (["--decoder-epochs", "2"], "--decoder-epochs is for --latent rae")):
        with pytest.raises(SystemExit) as exit_info:
            main(["demo", "--out", str(tmp_path / "x"), *flags])
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_the_rae_demo_trains_ditdh_with_rae_objective_in_the_decoders_space(tmp_path):
    config = train_config(DemoConfig(out=str(tmp_path), latent="rae"))
    assert config.model.name == "DiTDH-T" and config.objective.name == "rae" and config.objective.time_shift_base == 64
    assert config.data.vae == f"rae:{(tmp_path / 'decoder').resolve()}" and config.data.data_path == "digits"
    assert config.alignment.repa is None


def test_a_demo_stopped_before_its_training_began_is_taken_as_ours(tmp_path):
    """The digit encoder and the decoder's run folder come before the DiT's run folder: a demo stopped while
    the decoder trained is resumed, not refused as a folder of other files."""
    from fastdit.demo.run import _refuse_a_folder_of_other_files

    (tmp_path / "digit-encoder-seed0.ts").write_bytes(b"")
    (tmp_path / "decoder").mkdir()
    (tmp_path / "decoder" / "config.json").write_text("{}")
    _refuse_a_folder_of_other_files(tmp_path)
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="holds other files"):
        _refuse_a_folder_of_other_files(tmp_path)
