"""The README's "Train on your own images" runs as written, on a generated folder: its CPU commands,
parsed from the README itself, train, sample, sample 50K-style into an .npz and compute a FID."""

import re
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import make_image_folder
from fastdit.cli import main
from fastdit.evaluate.inception import random_inception_state_dict

README = Path(__file__).resolve().parents[1] / "README.md"


def own_data_commands() -> list[str]:
    """The first bash block of the README's "Train on your own images" section, one command per line."""
    text = README.read_text()
    section = text[text.index("## Train on your own images"):]
    section = section[: section.index("\n## ", 1)]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [line for line in block.replace("\\\n", " ").splitlines() if line.strip()]


def sweep_commands() -> list[str]:
    """The bash block of the README's `fastdit sweep` section, which sweeps the run of "Train on your own images"."""
    text = README.read_text()
    section = text[text.index("### Finding the sampling settings of a run"):]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [line.split("  #")[0] for line in block.replace("\\\n", " ").splitlines() if line.strip()]


def test_the_readme_commands_exist_and_name_the_folder():
    commands = own_data_commands()
    assert [shlex.split(c)[1] for c in commands] == ["train", "sample", "sample-ddp", "evaluate"]
    assert all("my-images" in c or "my-samples" in c for c in commands)


@pytest.mark.slow
def test_the_readme_own_data_commands_run_as_written(tmp_path, monkeypatch, capsys):
    """As written, but for three substitutions that keep it to seconds: the folder is a generated one of
    3 classes x 24 images (one batch of 64), 2 training steps instead of 1,000 (and the checkpoint name that follows), 8
    samples for the .npz instead of 1,000; and Inception-v3's weights are a random stand-in in the
    download cache (the real ones cannot be downloaded here)."""
    make_image_folder(tmp_path / "my-images", classes=("ant", "bee", "cow"), per_class=24)
    cache = tmp_path / "cache"
    (cache / "inception").mkdir(parents=True)
    torch.save(random_inception_state_dict(seed=0), cache / "inception" / "pt_inception-2015-12-05-6726825d.pth")
    monkeypatch.setenv("FASTDIT_CACHE", str(cache))
    monkeypatch.chdir(tmp_path)
    for command in own_data_commands():
        command = (command.replace("--max-steps 1000", "--max-steps 2").replace("0001000-ema", "0000002-ema")
                   .replace("--num-fid-samples 1000", "--num-fid-samples 8"))
        words = shlex.split(command)
        assert words[0] == "fastdit"
        if words[1] == "train":
            words += ["--num-workers", "0", "--no-progress", "--no-tensorboard"]
        assert main(words[1:]) == 0, command
    out = capsys.readouterr().out
    assert (tmp_path / "my-samples.png").is_file() and (tmp_path / "runs" / "my-images").is_dir()
    samples = np.load(tmp_path / "my-samples.npz")["arr_0"]
    assert samples.shape == (8, 16, 16, 3)
    assert re.search(r"\bfid\b\s+[0-9.]+", out, re.I)

    # The sweep section's commands on that run, with 16 images a point and 32 to confirm
    for command in sweep_commands():
        command = command.replace("--num-samples 1000", "--num-samples 16").replace("--confirm-samples 4000",
                                                                                    "--confirm-samples 32")
        words = shlex.split(command)
        assert main(words[1:] + ["--no-progress"]) == 0, command
    assert np.load(tmp_path / "best.npz")["arr_0"].shape == (32, 16, 16, 3)
