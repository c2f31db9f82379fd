"""One schema for the sampling options (`fastdit.sampling.options`): the command line, the recipe, the
app's fields and its "Reproduce with" command all take their sampling fields from it; the page takes
every seed the command line takes; a library error speaks of the value, and the edge that took it
names its flag or field; `fastdit sample` checks its options once."""

import argparse
import dataclasses
import shlex
from types import SimpleNamespace

import pytest

import fastdit.sampling.options as options_module
from fastdit.app.request import ModelCache, SampleRequest, generate_grid, request_name, request_value, seed_number
from fastdit.app.models import DIGITS, ModelSource, model_source
from fastdit.cli import build_parser
from fastdit.cli.common import RecipePlan
from fastdit.errors import OptionError, UserError, flag_namer
from fastdit.objectives import build_objective
from fastdit.program import program_words
from fastdit.sampling import OPTIONS, SamplingOptions
from fastdit.sampling.recipe import DEFAULTS, FLAGS, SAMPLING_FIELDS, recorded_options
from fastdit.seeding import MAX_SEED
from cli_runner import run_cli
from test_app import tiny_digits_run

OFFICIAL = ModelSource(None, "DiT-XL/2", 256)  # names no file: the command's words alone are compared
# A value other than the default for every option (the sampler is written always).
OTHER = {"sampler": "ddim", "num_steps": 7, "cfg_scale": 2.5, "guided_channels": 3, "guidance_interval": (0.2, 0.9),
         "eta": 0.5, "time_shift": 2.0, "precision": "bf16", "diffusion_form": "linear", "diffusion_norm": 0.5,
         "last_step": "tweedie", "last_step_size": 0.1, "guidance_model": "weaker.safetensors"}


def subcommand_parser(name: str) -> argparse.ArgumentParser:
    return next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices[name]


def parse_command(command: str) -> argparse.Namespace:
    """The namespace `fastdit` parses from a printed command (the program's own words dropped)."""
    words = shlex.split(command)
    assert words[:len(program_words())] == program_words()
    return build_parser().parse_args(words[len(program_words()):])


def request_of(options: SamplingOptions, **others) -> SampleRequest:
    """The page's request for `options` (the official weights, two classes)."""
    fields = {request_name(option): request_value(option, getattr(options, name)) for name, option in OPTIONS.items()}
    return SampleRequest(source=OFFICIAL, labels=(3, 1), **fields, **others)


def test_the_schema_covers_every_field_of_the_options():
    assert list(OPTIONS) == [field.name for field in dataclasses.fields(SamplingOptions)] == list(OTHER)
    for name, option in OPTIONS.items():
        assert option.name == name and option.default == getattr(SamplingOptions(), name)
        assert option.flag.startswith("--") and option.label and option.page_id and option.help
    # The recipe's tables are the schema's, around the job's own fields.
    assert SAMPLING_FIELDS == tuple(name for name, option in OPTIONS.items() if option.recipe)
    assert {FLAGS[name] for name in SAMPLING_FIELDS} == {OPTIONS[name].flag for name in SAMPLING_FIELDS}
    assert all(DEFAULTS[name] == OPTIONS[name].default for name in SAMPLING_FIELDS)
    assert set(FLAGS) - set(SAMPLING_FIELDS) == {"model", "image_size", "label_sampling", "num_samples"}


@pytest.mark.parametrize("command", ["sample", "sample-ddp"])
def test_every_option_has_a_flag(command):
    flags = {flag for action in subcommand_parser(command)._actions for flag in action.option_strings}
    for option in OPTIONS.values():
        assert option.flag in flags and (option.off is None or option.off in flags), option.name


def test_every_option_has_a_place_in_the_printed_command():
    for name, value in OTHER.items():
        options = dataclasses.replace(SamplingOptions(sampler="ddpm"), **{name: value})
        words = shlex.split(request_of(options).command(options.sampler))
        assert OPTIONS[name].flag in words, name
        assert parse_command(request_of(options).command(options.sampler)).__dict__[OPTIONS[name].dest] is not None


def test_the_command_parsed_again_gives_back_the_same_options():
    options = SamplingOptions(**OTHER)
    request = request_of(options, seed=MAX_SEED)
    args = parse_command(request.command(options.sampler))
    assert args.seed == MAX_SEED
    assert RecipePlan(args).options == options
    # At the defaults: only the options written always (sampler, steps, guidance scale), and the same options.
    plain = SamplingOptions(sampler="ddpm")
    command = request_of(plain).command("ddpm")
    assert "--time-shift" not in command and "--official-guidance" not in command and "--eta" not in command
    assert RecipePlan(parse_command(command)).options == plain


def test_the_command_overrides_the_checkpoint_recipe_where_the_page_differs():
    """`fastdit sample --ckpt X` without a flag takes X's recipe: the command writes what differs from it,
    "none" included (--no-official-guidance, --no-guidance-interval), and so samples the page's options."""
    recorded = {"sampler": "euler", "num_steps": 9, "cfg_scale": 3.0, "guided_channels": 3,
                "guidance_interval": [0.1, 0.5], "time_shift": 2.0}
    info = SimpleNamespace(sampling=recorded, objective=build_objective("flow"))
    wanted = SamplingOptions(sampler="euler", num_steps=9, cfg_scale=3.0)  # every channel, every step, no shift
    request = dataclasses.replace(request_of(wanted), source=ModelSource("x.safetensors"))
    command = request.command("euler", baseline=recorded_options(info))
    assert {"--no-official-guidance", "--no-guidance-interval", "--time-shift"} <= set(shlex.split(command))
    assert RecipePlan(parse_command(command)).options_for(info) == wanted
    # Against the plain defaults, the same request leaves the recipe's guidance and shift in place.
    assert RecipePlan(parse_command(request.command("euler"))).options_for(info) != wanted


def test_every_option_has_a_page_field():
    page_module = pytest.importorskip("fastdit.app.page", reason="gradio is not installed (pip install 'fastdit[app]')")
    assert set(page_module.PAGE_FIELDS) == set(OPTIONS)
    page = page_module.build_page([], device="cpu")
    ids = {getattr(block, "elem_id", None) for block in page.blocks.values()}
    assert {option.page_id for option in OPTIONS.values()} <= ids
    # What a field shows reads back as the same option.
    options = SamplingOptions(**OTHER)
    shown = page_module.field_values(options)
    read = {request_name(OPTIONS[name]): page_module.read_field(OPTIONS[name], value) for name, value in shown.items()}
    assert SampleRequest(source=OFFICIAL, labels=(1,), **read).options() == options


SEED_TEXTS = ["0", "1", "7 ", "1_000", "+3", str(2**53 + 1), str(MAX_SEED), str(MAX_SEED + 1), "-1", "-0", "1.5", "1e3",
              "abc", "0x10", ""]


def cli_seed(text: str):
    try:
        return subcommand_parser("sample").parse_args(["--seed", text]).seed
    except SystemExit:
        return None


def page_seed(text: str):
    try:
        return seed_number(text)
    except UserError as err:
        assert "Seed field" in str(err) and "--" not in str(err)
        return None


def test_the_page_takes_every_seed_the_command_line_takes(capsys):
    for text in SEED_TEXTS:
        assert page_seed(text) == cli_seed(text), text
    capsys.readouterr()
    assert page_seed(str(MAX_SEED)) == MAX_SEED == 2**64 - 1 and page_seed(MAX_SEED) == MAX_SEED
    with pytest.raises(UserError, match="Seed field"):
        SampleRequest(source=OFFICIAL, labels=(1,), seed=MAX_SEED + 1).check()
    SampleRequest(source=OFFICIAL, labels=(1,), seed=MAX_SEED).check()


def test_the_largest_seed_goes_through_the_page_and_its_command(tmp_path):
    """2^64 - 1 typed in the Seed field: the page samples with it, and its command, run, writes the same picture."""
    page_module = pytest.importorskip("fastdit.app.page", reason="gradio is not installed (pip install 'fastdit[app]')")
    import numpy as np
    from PIL import Image

    tiny_digits_run(tmp_path / "demo")
    page = page_module.build_page([tmp_path / "demo"], device="cpu", work_dir=str(tmp_path / "work"))
    generate = next(fn for fn in page.fns.values() if fn.name == "generate").fn
    updates = list(generate(DIGITS, "", ["7"], 1, "ddim", 2, 1.0, "", False, 1.0, str(MAX_SEED), None,
                            request=None, progress=lambda *a, **k: None))
    picture, _, command, status, _ = updates[-1]
    assert status == "Done: 1 image." and f"--seed {MAX_SEED} " in command, status
    words = shlex.split(command)
    words[words.index("--out") + 1] = str(tmp_path / "cli.png")
    assert run_cli(*words[len(program_words()):]) == 0
    assert np.array_equal(np.asarray(Image.open(picture)), np.asarray(Image.open(tmp_path / "cli.png")))


# ----------------------------------------------------------------------------------------------
# Errors: the library speaks of the value, the edge names the flag or the field
# ----------------------------------------------------------------------------------------------


def test_a_library_error_speaks_of_the_value_and_carries_its_option():
    with pytest.raises(OptionError) as err:
        SamplingOptions(num_steps=0).validate(build_objective("ddpm"))
    assert str(err.value) == "number of sampling steps must be in [2, 1000], got 0"
    assert err.value.fields == ("num_steps",) and err.value.unnamed == ("num_steps",)
    # Each edge names the option in its words, after the message (the command line with its own flags).
    assert err.value.at_edge(flag_namer({"num_steps": "--num-sampling-steps"})).endswith("got 0 (--num-sampling-steps)")
    assert err.value.at_edge(flag_namer({"num_steps": "--sampling-steps"})).endswith("(--sampling-steps)")
    # A message that names its option itself: in the edge's words, and not named twice.
    with pytest.raises(OptionError) as err:
        SamplingOptions(num_steps=1, cfg_scale=4.0).validate(build_objective("meanflow", meanflow_omega=3.0))
    assert err.value.fields == ("cfg_scale",) and err.value.unnamed == ()
    assert "sample it with --cfg-scale 1, not 4" in err.value.at_edge(flag_namer())


def test_the_command_line_names_the_flag(tmp_path, capsys):
    ckpt = tiny_digits_run(tmp_path / "demo")
    out = tmp_path / "x.png"
    assert run_cli("sample", "--ckpt", ckpt, "--num-sampling-steps", 0, "--out", out, "--device", "cpu") == 2
    assert "error: number of sampling steps must be in [2, 1000], got 0 (--num-sampling-steps)\n" in capsys.readouterr().err
    assert run_cli("sample", "--ckpt", ckpt, "--time-shift", 2, "--out", out, "--device", "cpu") == 2
    assert "a time shift applies to flow models only (flow time); leave it at 1 for a ddpm model (--time-shift)" in \
        capsys.readouterr().err
    # A preset's value: the preset is said, and the flag that overrides it.
    assert run_cli("sample", "--ckpt", ckpt, "--preset", "repa-sde-250", "--out", out, "--device", "cpu") == 2
    assert "preset repa-sde-250 (for flow models): sampler 'sde-euler' does not fit this ddpm model; " \
           "use one of: ddpm, ddim, dpm++2m (--sampler)" in capsys.readouterr().err
    # The demo's flag for the steps is its own.
    assert build_parser().parse_args(["demo"])._option_flags["num_steps"] == "--sampling-steps"


def test_the_page_names_its_field_without_translating_flags(monkeypatch):
    page_module = pytest.importorskip("fastdit.app.page", reason="gradio is not installed (pip install 'fastdit[app]')")
    monkeypatch.setattr(page_module, "in_page_words", lambda message: pytest.fail("an option's error was translated"))
    with pytest.raises(OptionError) as err:
        SamplingOptions(num_steps=1).validate(build_objective("ddpm"))
    assert page_module.error_message(err.value) == \
        "**Error:** number of sampling steps must be in [2, 1000], got 1 (the Steps field)"
    with pytest.raises(OptionError) as err:
        SamplingOptions(num_steps=1, cfg_scale=4.0).validate(build_objective("meanflow", meanflow_omega=3.0))
    shown = page_module.error_message(err.value)
    assert "sample it with Guidance scale 1, not 4" in shown and "--" not in shown and shown.count("Guidance scale") == 1
    with pytest.raises(OptionError) as err:
        SamplingOptions(guidance_interval=(0.0, 0.5), num_steps=1, cfg_scale=1.0).validate(build_objective("meanflow"))
    assert page_module.error_message(err.value).endswith("; leave the Guidance interval field unset")


# ----------------------------------------------------------------------------------------------
# Validated once at each edge
# ----------------------------------------------------------------------------------------------


@pytest.fixture
def checks(monkeypatch):
    """How many times the options' checks ran (the sampler lookup that opens `validate`)."""
    ran = []
    real = options_module.get_sampler
    monkeypatch.setattr(options_module, "get_sampler", lambda *args: ran.append(args) or real(*args))
    return ran


def test_fastdit_sample_checks_its_options_once(tmp_path, checks):
    ckpt = tiny_digits_run(tmp_path / "demo")
    assert run_cli("sample", "--ckpt", ckpt, "--num-sampling-steps", 2, "--class-labels", 1, 2, 3, "--batch-size", 2,
                   "--out", tmp_path / "x.png", "--device", "cpu", "--no-progress") == 0
    assert len(checks) == 1


def test_the_page_checks_its_options_once(tmp_path, checks):
    tiny_digits_run(tmp_path / "demo")
    request = SampleRequest(source=model_source(DIGITS, "", [tmp_path / "demo"]), labels=(1, 2, 3), sampler="ddim",
                            num_steps=2, cfg_scale=1.0)
    generate_grid(request, ModelCache(), tmp_path / "page.png", progress=False, batch_size=2)
    assert len(checks) == 1


def test_changed_options_are_checked_again():
    options, ddpm = SamplingOptions(num_steps=2), build_objective("ddpm")
    options.validate(ddpm)
    options.num_steps = 0
    with pytest.raises(OptionError, match="got 0"):
        options.validate(ddpm)
    options.num_steps = 2
    with pytest.raises(OptionError, match="does not fit this flow model"):
        dataclasses.replace(options, sampler="ddpm").validate(build_objective("flow"))


def test_the_no_flags_set_none_on_purpose():
    """--no-official-guidance and --no-guidance-interval are given values (None), not flags left out."""
    args = subcommand_parser("sample").parse_args(["--no-official-guidance", "--no-guidance-interval"])
    plan = RecipePlan(args)
    assert plan.flags["guided_channels"] is None and plan.flags["guidance_interval"] is None
