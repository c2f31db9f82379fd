"""Every subcommand's --help, rendered and read: each flag says its default once, a flag with choices
lists them, no subcommand offers a flag that does nothing (--threads where no torch work runs), and
counts in printed lines agree with their number ("1 step", not "1 steps")."""

import argparse
import re

import pytest

from fastdit.cli import SUBCOMMANDS, build_parser
from fastdit.text import counted


def subparsers() -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def options_of(parser: argparse.ArgumentParser):
    """The optional flags of a parser, its nested subcommands' (bench train, bench sample) included."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from options_of(sub)
        elif action.option_strings and action.help != argparse.SUPPRESS and not isinstance(action, argparse._HelpAction):
            yield action


def says_no_default(action) -> bool:
    """A flag whose default needs no words: a switch that is off unless given, or a value that means 'not given'."""
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction, argparse._StoreConstAction)):
        return True
    return action.default is None or action.required


@pytest.mark.parametrize("name", list(SUBCOMMANDS))
def test_every_flag_says_its_default_once_and_lists_its_choices(name):
    parser = subparsers()[name]
    text = parser.format_help()  # renders without error
    assert text.startswith("usage: fastdit " + name)
    assert "==SUPPRESS==" not in text  # argparse's marker for "no default" is never shown as one
    for action in options_of(parser):
        flag, help_text = action.option_strings[-1], " ".join((action.help or "").split())
        assert help_text and not help_text.startswith("(default"), f"{name} {flag} has no help text"
        assert len(re.findall(r"\(default\b", help_text)) <= 1, f"{name} {flag}: the default is said twice: {help_text}"
        if not says_no_default(action):
            assert "default" in help_text, f"{name} {flag} does not say its default ({action.default!r}): {help_text}"
        if action.choices is not None and action.metavar is not None:  # argparse shows {a,b} unless a metavar hides them
            missing = [c for c in action.choices if str(c) not in help_text]
            assert not missing, f"{name} {flag} hides its choices {missing} behind {action.metavar}: {help_text}"


def test_threads_only_where_torch_works():
    parsers = subparsers()
    assert "--threads" not in parsers["presets"].format_help()  # lists presets: nothing to thread
    for name in ("sample", "train", "evaluate", "demo"):
        assert "--threads" in parsers[name].format_help()


def test_counts_agree_with_their_number():
    assert counted(1, "step") == "1 step" and counted(2, "step") == "2 steps" and counted(0, "image") == "0 images"
    assert counted(1, "process", "processes") == "1 process" and counted(3, "process", "processes") == "3 processes"


def test_sample_help_says_which_labels_it_samples():
    text = " ".join(subparsers()["sample"].format_help().split())
    assert "one of each class, at most the first 16" in text


@pytest.mark.parametrize("words", [["--help"], ["--version"], []])
def test_top_level_help_and_version_import_no_torch(words):
    """`fastdit --help`, `fastdit --version` and a bare `fastdit` answer without importing torch (seconds on
    a busy machine) or any subcommand's module."""
    import subprocess
    import sys

    code = ("import sys\nfrom fastdit.cli import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
            "loaded = sorted(m for m in sys.modules if m == 'torch' or m.startswith('fastdit.cli.'))\n"
            "print('LOADED', loaded)")
    done = subprocess.run([sys.executable, "-c", code, *words], capture_output=True, text=True, timeout=120)
    assert "LOADED ['fastdit.cli.arg_types']" in done.stdout, done.stdout + done.stderr
    if words == ["--version"]:
        import fastdit

        assert done.stdout.startswith(f"fastdit {fastdit.__version__}\n")
    else:  # every subcommand listed with its one line, read from its module's source
        listed = done.stdout if words else done.stdout + done.stderr
        assert "sample a grid of images from a DiT" in listed and "presets" in listed


@pytest.mark.parametrize("rank, printed", [("0", True), ("1", False)])
def test_the_closing_line_of_train_is_the_main_process_s(monkeypatch, capsys, tmp_path, rank, printed):
    """Under torchrun every process finishes `fastdit train`; only RANK 0 says "done"."""
    from types import SimpleNamespace

    import fastdit.cli.train as train_command
    import fastdit.train.loop as loop

    result = SimpleNamespace(export=tmp_path / "0000001-ema.safetensors", step=1, run_dir=tmp_path)
    monkeypatch.setattr(loop, "train", lambda config: result)
    monkeypatch.setattr(train_command, "config_from_args", lambda args: None)
    monkeypatch.setenv("RANK", rank)
    assert train_command.run(argparse.Namespace()) == 0
    assert ("done: step 1" in capsys.readouterr().out) is printed


def test_data_workers_follow_the_cores(monkeypatch):
    """extract's --num-workers default: a worker per usable core, at most 4 (4 workers on 2 cores made
    PyTorch's DataLoader warn before fastdit's first line)."""
    import fastdit.cpu_threads as cpu_threads

    for cores, workers in ((1, 1), (2, 2), (4, 4), (64, 4)):
        monkeypatch.setattr(cpu_threads, "usable_cores", lambda cores=cores: cores)
        assert cpu_threads.data_workers() == workers
        args = build_parser(["extract"]).parse_args(["extract", "--data-path", "d", "--features-path", "f"])
        assert args.num_workers == workers


def test_a_quick_command_says_nothing_about_a_busy_machine(monkeypatch, capsys):
    """The busy-machine line belongs to jobs that run torch; `presets` lists settings and stays quiet, and
    --help never gets that far."""
    import fastdit.cpu_threads as cpu_threads
    from fastdit.cli import main

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(cpu_threads, "_configured", False)
    monkeypatch.setattr(cpu_threads, "cores_busy_elsewhere", lambda seconds=0: 64.0)
    assert main(["presets"]) == 0
    assert "busy" not in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["sample", "--help"])
    assert "busy" not in "".join(capsys.readouterr())
    assert not cpu_threads._configured


def test_a_dataclass_field_with_choices_becomes_a_flag_that_lists_them():
    import dataclasses

    from fastdit.cli.dataclass_args import add_dataclass_arguments

    @dataclasses.dataclass
    class Settings:
        path_type: str = dataclasses.field(default="linear", metadata={"help": "the path", "choices": ("linear", "vp")})
        depth: int | None = dataclasses.field(default=None, metadata={"help": "depth (default: the preset's)"})
        tf32: bool = dataclasses.field(default=True, metadata={"help": "TF32 matmuls"})

    parser = argparse.ArgumentParser()
    add_dataclass_arguments(parser, Settings)
    text = " ".join(parser.format_help().split())
    assert "--path-type {linear,vp} the path (default: linear)" in text
    assert "depth (default: the preset's)" in text and text.count("(default:") == 3  # said once each
    assert "TF32 matmuls (default: on)" in text
    with pytest.raises(SystemExit):
        parser.parse_args(["--path-type", "gvp"])
