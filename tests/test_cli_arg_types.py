"""Every float flag of every subcommand refuses nan and ±inf, and every seed flag refuses negatives,
as one argparse line naming the flag and the value (exit 2) before any work starts."""

import argparse
import importlib

import pytest

from fastdit.cli import SUBCOMMANDS, build_parser, main
from fastdit.cli.arg_types import finite_float


@pytest.fixture(autouse=True)
def _no_command_runs(monkeypatch):
    """A flag that parses must not start a run (a demo or a download): fail at once instead."""
    for module_name in SUBCOMMANDS.values():
        module = importlib.import_module(f"fastdit.cli.{module_name}")
        monkeypatch.setattr(module, "run", lambda args: pytest.fail(f"{args.command} accepted its arguments and started"))


def float_flags() -> list[tuple[str, str]]:
    """(subcommand, flag) for every option parsed as a number with a fraction."""
    subcommands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return [(name, action.option_strings[-1])
            for name, sub in subcommands.choices.items()
            for action in sub._actions
            if action.type in (float, finite_float)]


def test_the_float_flags_are_found():
    # Guards the test below against passing on an empty list.
    found = set(float_flags())
    assert {("sample", "--cfg-scale"), ("sample-ddp", "--cfg-scale"), ("demo", "--cfg-scale"), ("demo", "--lr"),
            ("train", "--lr"), ("train", "--grad-clip"), ("sample", "--eta")} <= found


def non_finite_cases() -> list[tuple[str, str, list[str]]]:
    """(subcommand, flag, argv) with a non-finite value for every float flag. One value (or an optional one): "--flag=value"
    (with "=": argparse takes a bare "-inf" for an option). Two values (--guidance-interval): the bad one
    second; "-inf" cannot stand there unquoted at all, so those flags get nan and inf."""
    nargs = {(name, action.option_strings[-1]): action.nargs
             for name, sub in next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices.items()
             for action in sub._actions if action.option_strings}
    cases = []
    for subcommand, flag in float_flags():
        for value in ("nan", "inf", "-inf"):
            if nargs[(subcommand, flag)] in (None, "?"):  # one value ("?": --route's optional rate)
                cases.append((subcommand, value, [f"{flag}={value}"]))
            elif value != "-inf":
                cases.append((subcommand, value, [flag, "0.5", value]))
    return cases


@pytest.mark.parametrize("subcommand, value, argv", non_finite_cases())
def test_non_finite_floats_are_refused(subcommand, value, argv, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main([subcommand, *argv])
    assert exit_info.value.code == 2
    flag = argv[0].split("=")[0]
    assert f"argument {flag}: {value!r} is not a finite number" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("subcommand", ["sample", "sample-ddp", "demo"])
def test_negative_seeds_are_refused_when_parsed(subcommand, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([subcommand, "--seed", "-1"])
    assert exit_info.value.code == 2
    assert "argument --seed: -1 is negative; seeds are integers >= 0" in capsys.readouterr().err


def test_finite_values_pass_through():
    assert finite_float("1.5") == 1.5 and finite_float("-2e-3") == -2e-3
    with pytest.raises(argparse.ArgumentTypeError, match="'x' is not a number"):
        finite_float("x")
