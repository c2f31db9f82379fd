"""`fastdit app` without a browser: the class list, the model choices, the reproducing command, the
library-level loader, and that the core stays light (Gradio only inside `fastdit app`)."""

import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fastdit.app.classes import class_choices, imagenet_class_names, label_of
from fastdit.app.models import DIGITS, LOCAL, OFFICIAL, ModelSource, model_source
from fastdit.app.request import ModelCache, SampleRequest, generate_grid, parse_interval
from fastdit.checkpoint import export_weights
from fastdit.model_info import LatentInfo, ModelInfo
from fastdit.cli import main
from fastdit.errors import UserError
from fastdit.loading import LoadedModel, load_for_sampling
from fastdit.models import build_model


def tiny_digits_run(folder: Path, step: int = 6) -> Path:
    """A digits-demo-shaped run folder (DIR/train/checkpoints/NNNNNNN-ema.safetensors) holding a random
    8x8 one-channel DiT with ten named classes: the page needs a loadable model, not a good one."""
    torch.manual_seed(0)
    model = build_model("DiT-T/2", depth=1, input_size=8, in_channels=1, num_classes=10)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.05)
    info = ModelInfo(config=model.config, latent=LatentInfo(kind="pixels", vae=None), class_names=[str(k) for k in range(10)])
    return export_weights(model, info, folder / "train" / "checkpoints" / f"{step:07d}-ema.safetensors")


def run_cli(*args):
    try:
        return main([str(a) for a in args])
    except SystemExit as exit_:
        return exit_.code


def test_imagenet_class_names_are_the_standard_list():
    names = imagenet_class_names()
    assert len(names) == 1000 and len(set(names)) == 998  # "crane" (134, 517) and "maillot" (638, 639) repeat
    expected = {0: "tench", 207: "golden retriever", 360: "otter", 387: "lesser panda", 974: "geyser",
                88: "macaw", 979: "valley", 417: "balloon", 279: "arctic fox"}
    assert {k: names[k].lower() for k in expected} == expected
    choices = class_choices(1000)
    assert len(set(choices)) == 1000 and choices[134] == "134 crane" and label_of(choices[517]) == 517


def test_class_choices_for_digits_and_unnamed_classes():
    assert class_choices(10, [str(k) for k in range(10)]) == [str(k) for k in range(10)]
    assert class_choices(3, ["cat", "dog", "fox"]) == ["0 cat", "1 dog", "2 fox"]
    assert class_choices(4) == ["0", "1", "2", "3"]
    assert label_of("7") == 7
    with pytest.raises(UserError, match="pick one from the list"):
        label_of("golden retriever")


def test_model_choices(tmp_path):
    older, newer = tiny_digits_run(tmp_path / "run", 2), tiny_digits_run(tmp_path / "run", 6)
    assert model_source(DIGITS, "", [tmp_path / "missing", tmp_path / "run"]).path == str(newer)
    assert model_source(DIGITS, str(older), [tmp_path / "run"]).path == str(older)  # a run elsewhere
    with pytest.raises(UserError, match="no digits demo found in .*missing.*make demo"):
        model_source(DIGITS, "", [tmp_path / "missing"])
    with pytest.raises(UserError, match="not found"):
        model_source(LOCAL, str(tmp_path / "nope.pt"), [])
    official = {(s.model_name, s.image_size) for s in (model_source(c, "", []) for c in OFFICIAL)}
    assert official == {("DiT-XL/2", 256), ("DiT-XL/2", 512), ("SiT-XL/2", 256)}


def test_bad_page_values_are_refused_with_their_fix():
    assert parse_interval("") is None and parse_interval(" 0, 500 ") == (0.0, 500.0)
    with pytest.raises(UserError, match="two numbers"):
        parse_interval("abc")
    with pytest.raises(UserError, match="at least one class"):
        SampleRequest(source=ModelSource(None, "DiT-XL/2", 256), labels=()).check()


def test_page_grid_is_what_its_command_writes(tmp_path):
    run = tmp_path / "demo"
    tiny_digits_run(run)
    request = SampleRequest(source=model_source(DIGITS, "", [run]), labels=(3, 1), images_per_class=2,
                            sampler="ddim", num_steps=4, cfg_scale=2.5, guidance_interval=(0.0, 600.0), seed=5)
    out = tmp_path / "page.png"
    command = generate_grid(request, ModelCache(), out, progress=False)
    words = shlex.split(command)
    # The program as it runs from here (`fastdit`, or this environment's script when that is not on PATH).
    from fastdit.program import program_words

    program = program_words()
    assert words[:len(program) + 1] == [*program, "sample"]
    assert words[words.index("--class-labels") + 1:][:4] == ["3", "3", "1", "1"]
    words[words.index("--out") + 1] = str(tmp_path / "cli.png")
    assert run_cli(*words[len(program):]) == 0
    page, cli = np.asarray(Image.open(out)), np.asarray(Image.open(tmp_path / "cli.png"))
    assert page.shape == (2 + 2 * (8 + 2), 2 + 2 * (8 + 2))  # two classes, one row each of two 8x8 images
    # the same computation on the same shapes in the same process: identical pixels
    assert np.array_equal(page, cli)


def test_library_loader_has_plain_arguments_and_words(tmp_path):
    ckpt = tiny_digits_run(tmp_path / "run")
    loaded = load_for_sampling(str(ckpt), device="cpu")
    assert isinstance(loaded, LoadedModel) and loaded.info.config.num_classes == 10
    assert loaded.latent_space.decode(torch.zeros(1, 1, 8, 8)).shape == (1, 1, 8, 8)
    with pytest.raises(UserError, match="no official weights for DiT-B/4") as err:
        load_for_sampling(model_name="DiT-B/4")
    assert "--" not in str(err.value)  # flags are the CLI's words, not the library's


def test_app_without_gradio_says_how_to_install(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "gradio", None)  # as if the extra were not installed
    monkeypatch.delitem(sys.modules, "fastdit.app.page", raising=False)
    assert run_cli("app", "--device", "cpu") == 2
    err = capsys.readouterr().err
    assert "-m pip install -e " in err and "[app]'" in err  # this interpreter's pip, from the source folder


def test_core_and_cli_do_not_import_gradio():
    code = "import sys, fastdit, fastdit.loading; from fastdit.cli import build_parser; build_parser(); print('gradio' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def test_page_turns_failures_into_messages():
    page = pytest.importorskip("fastdit.app.page", reason="gradio is not installed (pip install 'fastdit[app]')")
    assert page.error_message(UserError("bad value x; use y")) == "**Error:** bad value x; use y"
    assert "out of memory; make fewer images" in page.error_message(torch.OutOfMemoryError("CUDA out of memory"))
    assert page.error_message(KeyError("boom")).startswith("**Error:** unexpected KeyError")
