"""`fastdit app` without a browser: the class list, the model choices, the reproducing command, the
library-level loader, and that the core stays light (Gradio only inside `fastdit app`)."""

import http.client
import json
import os
import shlex
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fastdit.app.classes import class_choices, imagenet_class_names, label_of
from fastdit.app.models import DIGITS, LOCAL, OFFICIAL, ModelSource, model_source, official_choice
from fastdit.app.job import DONE, FAILED, PREVIEW, WAITING, Job
from fastdit.app.messages import in_page_words
from fastdit.app.outputs import OutputFolder
from fastdit.app.request import (Limits, ModelCache, SampleRequest, Stopped, generate_grid, parse_interval, real_number,
                                 whole_number)
from fastdit.checkpoint import export_weights
from fastdit.model_info import LatentInfo, ModelInfo
from fastdit.errors import UserError
from fastdit.loading import LoadedModel, load_for_sampling
from fastdit.models import build_model
from fastdit.objectives import build_objective
from fastdit.sampling.presets import PRESETS, get_preset
from cli_runner import run_cli


def tiny_digits_run(folder: Path, step: int = 6, objective: str = "ddpm") -> Path:
    """A digits-demo-shaped run folder (DIR/train/checkpoints/NNNNNNN-ema.safetensors) holding a random
    8x8 one-channel DiT with ten named classes: the page needs a loadable model, not a good one."""
    torch.manual_seed(0)
    model = build_model("DiT-T/2", depth=1, input_size=8, in_channels=1, num_classes=10)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.05)
    info = ModelInfo(config=model.config, latent=LatentInfo(kind="pixels", vae=None), class_names=[str(k) for k in range(10)],
                     objective=build_objective(objective))
    return export_weights(model, info, folder / "train" / "checkpoints" / f"{step:07d}-ema.safetensors")


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
    with pytest.raises(UserError, match="no readable checkpoint at .*nope.pt"):
        model_source(LOCAL, str(tmp_path / "nope.pt"), [])
    official = {(s.model_name, s.image_size) for s in (model_source(c, "", []) for c in OFFICIAL)}
    assert official == {("DiT-XL/2", 256), ("DiT-XL/2", 512), ("SiT-XL/2", 256), ("DiTDH-XL", 256), ("DiTDH-S", 256),
                        ("DiTDH-XL", 512), ("DiTDH-S", 512)}


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


# ----------------------------------------------------------------------------------------------
# Errors in the page's words, bounded requests, previews, Stop, files and hosts (issues #18, #19)
# ----------------------------------------------------------------------------------------------


def test_checkpoint_field_does_not_tell_which_files_exist(tmp_path, monkeypatch):
    """A missing file, a folder and a file the server may not read get the same message (the path
    aside); a name that is no checkpoint is refused before the disk is looked at."""
    (tmp_path / "folder.pt").mkdir()
    unreadable = tmp_path / "secret.pt"
    unreadable.write_bytes(b"x")
    real_access = os.access
    # Tests run as root here, for whom chmod 000 still reads: the server's view of the file is faked.
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == unreadable else real_access(p, mode))
    messages = set()
    for name in ("missing.pt", "folder.pt", "secret.pt"):
        with pytest.raises(UserError) as err:
            model_source(LOCAL, str(tmp_path / name), [])
        messages.add(str(err.value).replace(name, "NAME"))
    assert len(messages) == 1 and "no readable checkpoint" in messages.pop()
    # An existing file and a missing one of another kind: the same refusal, which names no file state.
    looked_at = []
    monkeypatch.setattr(Path, "is_file", lambda self: looked_at.append(self) or True)
    for path in ("/etc/passwd", str(tmp_path / "missing.txt")):
        with pytest.raises(UserError, match=r"takes a \.pt, \.pth or \.safetensors file"):
            model_source(LOCAL, path, [])
    assert looked_at == []


def test_number_fields_empty_or_out_of_range_say_which_field():
    assert whole_number(3, "Steps", 1) == 3 and whole_number(2.0, "Steps", 1) == 2 and real_number(1.5, "Guidance scale") == 1.5
    cases = [(lambda: whole_number(None, "Images per class", 1), "the Images per class field is empty"),
             (lambda: whole_number(0, "Images per class", 1), "Images per class field should be a whole number >= 1, got 0"),
             (lambda: whole_number(-1, "Seed", 0), "Seed field should be a whole number >= 0, got -1"),
             (lambda: whole_number(2.5, "Steps", 1), "Steps field should be a whole number"),
             (lambda: real_number(None, "Guidance scale"), "the Guidance scale field is empty"),
             (lambda: real_number(float("nan"), "Guidance scale"), "finite")]
    for call, message in cases:
        with pytest.raises(UserError, match=message):
            call()


def test_cli_flags_become_the_pages_fields():
    page = pytest.importorskip("fastdit.app.page", reason="gradio is not installed (pip install 'fastdit[app]')")
    examples = {
        "this model has no null class (trained without label dropout); use --cfg-scale 1": "use Guidance scale 1",
        "cannot download x offline, or pass --ckpt PATH to a local copy": "give the path of a local copy in the Checkpoint field",
        "pick --cfg-scale in that range, not 5": "pick the Guidance scale field in that range",
        "number of --num-sampling-steps too large": "the Steps field",
        "use --time-shift 1 or drop --official-guidance": "use Time shift 1 or drop the Official guidance field",
    }
    for message, expected in examples.items():
        shown = page.error_message(UserError(message))
        assert expected in shown and "--" not in shown, shown
    assert in_page_words("drop --vae mse") == "drop vae mse"  # no field for it: at least no flag


def test_a_request_is_bounded_before_anything_is_loaded():
    official = ModelSource(None, "DiT-XL/2", 256)  # would be a download: the checks must come first
    limits = Limits(max_images=64, max_image_steps=64 * 250)
    with pytest.raises(UserError, match="1000 classes x 1000 images per class = 1000000 images; .* at most 64"):
        SampleRequest(source=official, labels=tuple(range(1000)), images_per_class=1000).check(limits)
    with pytest.raises(UserError, match=r"8 images x 1000 steps = 8,000 image-steps; this server allows 1,000"):
        SampleRequest(source=official, labels=(1, 2), images_per_class=4, num_steps=1000).check(Limits(64, 1000))
    SampleRequest(source=official, labels=tuple(range(8)), images_per_class=8, num_steps=250).check(limits)  # the most
    with pytest.raises(UserError, match="Seed field"):
        SampleRequest(source=official, labels=(1,), seed=2**64).check(limits)
    cache = ModelCache()
    with pytest.raises(UserError, match="at most 64"):
        generate_grid(SampleRequest(source=official, labels=tuple(range(65))), cache, Path("unused.png"))
    assert cache._loaded is None  # nothing was loaded (or downloaded)


def test_grid_is_sampled_in_fixed_batches_with_previews(tmp_path, monkeypatch):
    import fastdit.sampling as sampling

    run = tmp_path / "demo"
    tiny_digits_run(run)
    request = SampleRequest(source=model_source(DIGITS, "", [run]), labels=(3, 1, 4), images_per_class=2, sampler="ddim",
                            num_steps=8, cfg_scale=2.0, seed=5)
    cache, batches = ModelCache(), []
    real_generate = sampling.generate
    monkeypatch.setattr(sampling, "generate", lambda model, space, labels, **kw: batches.append(len(labels)) or
                        real_generate(model, space, labels, **kw))
    previews = []
    generate_grid(request, cache, tmp_path / "batched.png", progress=False, batch_size=4,
                  on_preview=lambda grid, note: previews.append((grid.copy(), note)))
    assert batches == [4, 2]  # six images, four at a time: memory is that of four, whatever the grid
    final = np.asarray(Image.open(tmp_path / "batched.png"))
    assert previews and all(grid.shape == final.shape for grid, _ in previews)
    assert "batch 2 of 2" in previews[-1][1]
    assert (previews[0][0] == 128).any()  # the images still to come are gray in the first preview
    # With previews or without, the same batches: the same bytes.
    generate_grid(request, cache, tmp_path / "plain.png", progress=False, batch_size=4)
    assert np.array_equal(final, np.asarray(Image.open(tmp_path / "plain.png")))
    # One batch of six instead: images k keep their noise (seeded by (seed, k)), and only rounding of
    # the other batch shape can differ; to_uint8 truncates, so one level at most.
    generate_grid(request, cache, tmp_path / "whole.png", progress=False, batch_size=16)
    whole = np.asarray(Image.open(tmp_path / "whole.png")).astype(int)
    assert np.abs(whole - final.astype(int)).max() <= 1


def test_stop_ends_a_generation_at_the_next_model_call(tmp_path):
    run = tmp_path / "demo"
    tiny_digits_run(run)
    request = SampleRequest(source=model_source(DIGITS, "", [run]), labels=(2,), sampler="ddim", num_steps=40, cfg_scale=1.0)
    stop, previews = threading.Event(), []

    def press_stop(grid, note):
        previews.append(note)
        stop.set()

    with pytest.raises(Stopped):
        generate_grid(request, ModelCache(), tmp_path / "stopped.png", progress=False, on_preview=press_stop, stop=stop)
    assert previews == ["5 of 40 model calls"]  # 40 steps, a preview every 40 // 8 calls: stopped at the first
    assert not (tmp_path / "stopped.png").exists()


def test_job_streams_previews_then_its_outcome():
    def work(job):
        for k in range(3):
            job.preview(k, f"note {k}")
            time.sleep(0.05)
        return "command"

    updates = [u for u in Job(work).updates(heartbeat=0.01) if u[0] != WAITING]
    assert updates[-1] == (DONE, "command") and {kind for kind, _ in updates[:-1]} == {PREVIEW}

    def fail(job):
        raise UserError("bad")

    kind, err = list(Job(fail).updates())[-1]
    assert kind == FAILED and isinstance(err, UserError)

    def until_stopped(job):
        while not job.stopping.wait(0.01):
            pass
        raise Stopped

    job = Job(until_stopped)
    assert next(job.updates(heartbeat=0.01)) == (WAITING, None)  # a heartbeat while nothing happens
    job.stop()
    assert job.join(timeout=10)


def test_output_folder_keeps_the_last_pictures(tmp_path):
    folder = OutputFolder(tmp_path / "pictures", keep=3)
    paths = []
    for k in range(5):
        paths.append(folder.new_path("fastdit-seed0.png"))
        paths[-1].write_bytes(b"png")
    assert [p.exists() for p in paths] == [False, False, True, True, True]
    assert len({p.parent for p in paths}) == 5 and all(p.name == "fastdit-seed0.png" for p in paths)
    # A second folder object on the same root (a restarted server) continues the numbering.
    assert int(OutputFolder(tmp_path / "pictures", keep=3).new_path("x.png").parent.name) == 6


def page_functions(page):
    return {block_fn.name: block_fn for block_fn in page.fns.values()}


def test_page_shows_errors_in_the_status_line_and_keeps_the_picture(tmp_path):
    page_module = pytest.importorskip("fastdit.app.page", reason="gradio is not installed (pip install 'fastdit[app]')")
    import gradio as gr

    run = tmp_path / "demo"
    tiny_digits_run(run)
    page = page_module.build_page([run], device="cpu", work_dir=str(tmp_path / "work"))
    functions = page_functions(page)
    generate = functions["generate"].fn
    values = dict(choice=DIGITS, path="", classes=["7"], per_class=2, sampler="ddim", steps=8, cfg=2.0, interval="",
                  official=False, shift=1.0, seed=0)

    def run_page(last=None, **changes):
        return list(generate(*{**values, **changes}.values(), last, request=None, progress=lambda *a, **k: None))

    updates = run_page()
    done = updates[-1]
    assert done[3] == "Done: 2 images." and Path(done[0]).is_file() and "--class-labels 7 7" in done[2]
    assert any(u[3].startswith("Sampling:") and isinstance(u[0], np.ndarray) for u in updates)  # previews
    for bad, message in [(dict(per_class=0), "Images per class field should be"), (dict(seed=-1), "Seed field should be"),
                         (dict(per_class=None), "Images per class field is empty"), (dict(steps=None), "Steps field is empty"),
                         (dict(interval="abc"), "guidance interval 'abc'"), (dict(shift=None), "Time shift field is empty"),
                         (dict(choice=LOCAL, path="/nonexistent/x.pt"), "no readable checkpoint")]:
        updates = run_page(last=done[4], **bad)
        assert len(updates) == 1, bad
        picture, png, command, status, last = updates[0]
        assert status.startswith("**Error:** ") and message in status and "Done" not in status, status
        assert "unexpected" not in status and "--" not in status
        skipped = gr.skip()
        assert picture == png == command == last == skipped  # the last picture and command stay
    # A value refused once the model is loaded (its sampler's fewest steps): the same, in the same place.
    updates = run_page(last=done[4], steps=1)
    assert updates[-1][3].startswith("**Error:** number of sampling steps") and updates[-1][0] == skipped
    assert not any(isinstance(u[3], str) and u[3].startswith("Done") for u in updates)
    updates = run_page(last=done[4], shift=2.0)  # this DDPM model has no flow time to shift
    assert updates[-1][3].startswith("**Error:** a time shift applies to flow models only") and updates[-1][0] == skipped
    # The Stop button cancels the generation event (Gradio then closes the handler, which stops its job).
    stop_click = functions["stop"].targets
    cancelling = [fn for fn in page.fns.values() if fn.cancels and fn.targets == stop_click]
    assert [fn.cancels for fn in cancelling] == [[functions["generate"]._id]]


def test_closing_the_handler_stops_its_sampling(tmp_path):
    """Gradio closes a generator handler when its Stop button is pressed or its client goes away
    (between two yields); the sampling thread must then stop at its next model call."""
    page_module = pytest.importorskip("fastdit.app.page", reason="gradio is not installed (pip install 'fastdit[app]')")
    run = tmp_path / "demo"
    tiny_digits_run(run)
    page = page_module.build_page([run], device="cpu", work_dir=str(tmp_path / "work"))
    generate = page_functions(page)["generate"].fn
    handler = generate(DIGITS, "", ["7"], 64, "ddim", 250, 2.0, "", False, 1.0, 0, None, request=None,
                       progress=lambda *a, **k: None)
    for update in handler:
        if isinstance(update[3], str) and update[3].startswith("Sampling:"):
            break
    threads = [t for t in threading.enumerate() if t.name == "fastdit-app-job"]
    assert len(threads) == 1
    handler.close()
    threads[0].join(timeout=30)
    assert not threads[0].is_alive()  # 64 images x 250 steps would take far longer than one model call
    assert not list((tmp_path / "work" / "pictures").glob("*/*.png"))


def start_app(tmp_path, *extra):
    tiny_digits_run(tmp_path / "demo")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(Path.cwd()), os.environ.get("PYTHONPATH")])),
           "GRADIO_ANALYTICS_ENABLED": "False", "TMPDIR": str(tmp_path)}
    server = subprocess.Popen([sys.executable, "-m", "fastdit", "app", "--demo-out", str(tmp_path / "demo"), "--device", "cpu",
                               *extra], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=tmp_path)
    deadline, port = time.monotonic() + 120, None
    while port is None and time.monotonic() < deadline:
        line = server.stdout.readline()
        if not line and server.poll() is not None:
            break
        if "serving on" in line:
            port = int(line.split("serving on ", 1)[1].split()[0].rsplit(":", 1)[1])
    return server, port


def raw_get(port: int, host: str, path: str = "/") -> int:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    connection.putrequest("GET", path, skip_host=True)
    connection.putheader("Host", host)
    connection.endheaders()
    status = connection.getresponse().status
    connection.close()
    return status


def test_app_answers_only_local_host_names(tmp_path):
    pytest.importorskip("gradio", reason="gradio is not installed (pip install 'fastdit[app]')")
    server, port = start_app(tmp_path)
    try:
        assert port, f"fastdit app did not start (exit {server.poll()})"
        assert raw_get(port, f"127.0.0.1:{port}") == 200
        assert raw_get(port, f"localhost:{port}") == 200
        # DNS rebinding: a foreign name pointed at 127.0.0.1 reaches the socket, not the app.
        assert raw_get(port, f"evil.example:{port}") == 400
        assert raw_get(port, "evil.example", "/gradio_api/info") == 400
        folders = list(tmp_path.glob("fastdit-app-*"))
        assert len(folders) == 1  # the server's one folder (TMPDIR is this test's)
    finally:
        server.terminate()  # SIGTERM: the server removes its folder on the way out
        server.wait(timeout=30)
    assert not list(tmp_path.glob("fastdit-app-*"))


# ----------------------------------------------------------------------------------------------
# `fastdit app --preset NAME` (issue #17): the preset's model and values, official guidance, time shift
# ----------------------------------------------------------------------------------------------


def component(page, elem_id: str):
    return next(block for block in page.blocks.values() if getattr(block, "elem_id", None) == elem_id)


def described(page, choice: str, path: str = "") -> dict:
    """What the page puts in its fields for a model choice (the handler of a Model change and page load)."""
    outputs = page_functions(page)["describe_model"].fn(choice, path)
    names = ("classes", "sampler", "steps", "cfg", "interval", "official", "shift")
    return {**{name: out.value for name, out in zip(names, outputs)}, "status": outputs[-1]}


def test_preset_starts_the_page_on_its_model_and_values(tmp_path):
    page_module = pytest.importorskip("fastdit.app.page", reason="gradio is not installed (pip install 'fastdit[app]')")
    (tmp_path / "ddpm").mkdir()
    ddpm_ckpt = tiny_digits_run(tmp_path / "ddpm")
    tiny_digits_run(tmp_path / "flow", objective="flow")
    build = lambda preset=None: page_module.build_page([tmp_path / "flow"], device="cpu", work_dir=str(tmp_path / "work"),
                                                       preset=get_preset(preset) if preset else None)
    # Without a preset the page starts as before: the digits demo, every channel guided, no shift; every
    # digit is chosen, so Generate draws a picture at once.
    plain = build()
    assert component(plain, "model").value == DIGITS and component(plain, "official-guidance").value is False
    assert [label_of(name) for name in described(plain, DIGITS)["classes"]] == list(range(10))
    # dit-xl2-256: the official DiT-XL/2 at 256 (nothing is loaded to describe it), DiT's sample_ddp.py values.
    page = build("dit-xl2-256")
    choice = official_choice("DiT-XL/2", 256)
    assert component(page, "model").value == choice
    assert "preset `dit-xl2-256`" in component(page, "intro").value
    start = {name: component(page, elem_id).value for name, elem_id in
             [("steps", "steps"), ("cfg", "cfg"), ("official", "official-guidance"), ("shift", "time-shift")]}
    assert start == dict(steps=250, cfg=1.5, official=True, shift=1.0)
    fields = described(page, choice)
    assert {k: fields[k] for k in ("sampler", "steps", "cfg", "interval", "official", "shift")} == dict(
        sampler="ddpm", steps=250, cfg=1.5, interval="", official=True, shift=1.0)
    assert "settings from preset `dit-xl2-256`" in fields["status"]
    # The same preset on a DDPM checkpoint picked by hand: its values replace the checkpoint's (as --ckpt does).
    assert described(page, LOCAL, str(ddpm_ckpt))["official"] is True
    # repa-sde-250 names no model: the choice stays the digits demo, and the recipe fills its fields.
    page = build("repa-sde-250")
    assert component(page, "model").value == DIGITS
    fields = described(page, DIGITS)
    assert {k: fields[k] for k in ("sampler", "steps", "cfg", "interval", "official", "shift")} == dict(
        sampler="sde-euler", steps=250, cfg=1.8, interval="0.3 1.0", official=False, shift=1.0)
    # A DDPM model has no sde-euler: it keeps its own values, and the status says why.
    fields = described(page, LOCAL, str(ddpm_ckpt))
    assert fields["sampler"] != "sde-euler" and "is for flow models" in fields["status"]


def page_and_command_pictures(request: SampleRequest, folder: Path):
    """(the page's picture, the picture its "Reproduce with" command writes, the command's words, the
    recipe the command recorded in its PNG)."""
    from fastdit.program import program_words

    folder.mkdir()
    words = shlex.split(generate_grid(request, ModelCache(), folder / "page.png", progress=False))
    words[words.index("--out") + 1] = str(folder / "cli.png")
    assert run_cli(*words[len(program_words()):]) == 0
    written = Image.open(folder / "cli.png")
    recorded = json.loads(written.text["fastdit-recipe"])["values"]
    return np.asarray(Image.open(folder / "page.png")), np.asarray(written), words, recorded


def test_official_guidance_and_time_shift_reach_the_sampler_and_the_command(tmp_path):
    tiny_digits_run(tmp_path / "flow", objective="flow")
    request = SampleRequest(source=model_source(DIGITS, "", [tmp_path / "flow"]), labels=(3, 1), images_per_class=2,
                            sampler="euler", num_steps=6, cfg_scale=2.5, official_guidance=True, time_shift=2.0, seed=5)
    options = request.options()
    assert options.guided_channels == 3 and options.time_shift == 2.0
    page, cli, words, recorded = page_and_command_pictures(request, tmp_path / "shifted")
    assert "--official-guidance" in words and words[words.index("--time-shift") + 1] == "2.0"
    assert recorded["guided_channels"] == 3 and recorded["time_shift"] == 2.0  # the command parsed both flags
    # the same computation on the same shapes in the same process: identical pixels
    assert np.array_equal(page, cli)
    # Not vacuous: without the shift the same request makes another picture (official guidance alone
    # changes nothing here: this flow model's only guided output channel past its velocity is discarded).
    plain = replace(request, time_shift=1.0)
    assert "--time-shift" not in plain.command("euler")
    assert not np.array_equal(page, page_and_command_pictures(plain, tmp_path / "plain")[0])
    # DDPM with a learned variance: the official rule also guides the variance channel (channels 0..2 of
    # the 2 outputs), which DDPM's ancestral steps use; the command reproduces it, and it differs from the default.
    tiny_digits_run(tmp_path / "ddpm")
    request = SampleRequest(source=model_source(DIGITS, "", [tmp_path / "ddpm"]), labels=(3, 1), sampler="ddpm",
                            num_steps=4, cfg_scale=4.0, official_guidance=True, seed=5)
    page, cli, words, recorded = page_and_command_pictures(request, tmp_path / "official")
    assert "--official-guidance" in words and "--time-shift" not in words and recorded["guided_channels"] == 3
    assert np.array_equal(page, cli)
    every_channel = page_and_command_pictures(replace(request, official_guidance=False), tmp_path / "every")
    assert "--official-guidance" not in every_channel[2] and every_channel[3]["guided_channels"] is None
    assert not np.array_equal(page, every_channel[0])


def test_page_with_a_preset_draws_what_sample_preset_draws(tmp_path):
    """The page started with --preset repa-sde-250 (its interval, 250 SDE steps, cfg 1.8) on a flow model
    writes the picture of `fastdit sample --preset repa-sde-250 --ckpt ...` with the same labels and seed."""
    page_module = pytest.importorskip("fastdit.app.page", reason="gradio is not installed (pip install 'fastdit[app]')")
    run = tmp_path / "flow"
    ckpt = tiny_digits_run(run, objective="flow")
    page = page_module.build_page([run], device="cpu", work_dir=str(tmp_path / "work"), preset=get_preset("repa-sde-250"))
    fields = described(page, DIGITS)
    generate = page_functions(page)["generate"].fn
    updates = list(generate(DIGITS, "", ["7"], 2, fields["sampler"], fields["steps"], fields["cfg"], fields["interval"],
                            fields["official"], fields["shift"], 3, None, request=None, progress=lambda *a, **k: None))
    picture, _, command, status, _ = updates[-1]
    assert status == "Done: 2 images." and "--guidance-interval 0.3 1.0" in command, (status, command)
    assert run_cli("sample", "--preset", "repa-sde-250", "--ckpt", ckpt, "--class-labels", 7, 7, "--seed", 3,
                   "--nrow", 2, "--no-upscale", "--no-progress", "--device", "cpu", "--out", tmp_path / "cli.png") == 0
    # the same computation on the same shapes in the same process: identical pixels
    assert np.array_equal(np.asarray(Image.open(picture)), np.asarray(Image.open(tmp_path / "cli.png")))


def test_app_unknown_preset_is_one_line_naming_the_presets(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "gradio", None)  # were the preset not checked first, this would be Gradio's message
    monkeypatch.delitem(sys.modules, "fastdit.app.page", raising=False)
    assert run_cli("app", "--preset", "dit-xl2-1024", "--device", "cpu") == 2
    err = capsys.readouterr().err
    # One error line (a busy machine may add its own note on threads before it), no traceback.
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1 and "unknown preset 'dit-xl2-1024'" in errors[0] and "Traceback" not in err, err
    assert all(name in errors[0] for name in PRESETS)
