"""fastdit.cpu_threads: a job takes the cores other processes leave free, unless told otherwise."""

import pytest
import torch

from fastdit import cpu_threads
from fastdit.cli import main
from fastdit.cpu_threads import choose_threads


@pytest.mark.parametrize("busy, usable, expected", [
    (0.0, 2, 2), (0.3, 2, 2), (0.6, 2, 1), (1.0, 2, 1), (3.0, 2, 1), (1.4, 8, 7), (None, 4, 4),
])
def test_the_free_cores_rounded_and_at_least_one(busy, usable, expected):
    assert choose_threads(None, busy=busy, usable=usable)[0] == expected
    assert choose_threads(3, busy=busy, usable=usable) == (3, "--threads")


@pytest.fixture
def fresh(monkeypatch):
    """A process that has not chosen yet, without the test suite's OMP_NUM_THREADS; torch's count restored."""
    threads = torch.get_num_threads()
    monkeypatch.setattr(cpu_threads, "_configured", False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(cpu_threads, "usable_cores", lambda: 2)
    yield monkeypatch
    torch.set_num_threads(threads)


def test_a_busy_machine_gets_fewer_threads_and_one_line_saying_so(fresh, capsys):
    fresh.setattr(cpu_threads, "cores_busy_elsewhere", lambda: 1.0)
    cpu_threads.configure_threads(None)
    assert torch.get_num_threads() == 1
    assert "fastdit: the machine is busy (2 usable cores, 1.0 busy with other processes); running on 1 thread" \
        in capsys.readouterr().err
    cpu_threads.configure_threads(None)  # once per process: no second line
    assert capsys.readouterr().err == ""


def test_an_idle_machine_keeps_every_core_quietly(fresh, capsys):
    fresh.setattr(cpu_threads, "cores_busy_elsewhere", lambda: 0.1)
    cpu_threads.configure_threads(None)
    assert torch.get_num_threads() == 2 and capsys.readouterr().err == ""


def test_omp_num_threads_and_the_flag_are_obeyed(fresh):
    fresh.setattr(cpu_threads, "cores_busy_elsewhere", lambda: pytest.fail("no measuring when told"))
    fresh.setenv("OMP_NUM_THREADS", "2")
    torch.set_num_threads(2)
    cpu_threads.configure_threads(None)
    assert torch.get_num_threads() == 2
    fresh.setattr(cpu_threads, "_configured", False)
    cpu_threads.configure_threads(1)
    assert torch.get_num_threads() == 1


def test_the_cli_flag(fresh, capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_:
        main(["sample", "--threads", "0", "--out", str(tmp_path / "x.png")])
    assert exit_.value.code == 2 and "argument --threads: 0 must be >= 1" in capsys.readouterr().err


def test_the_busy_cores_are_measured_from_proc_stat_where_there_is_one():
    busy = cpu_threads.cores_busy_elsewhere(0.05)
    assert busy is None or 0 <= busy <= 1.01 * (torch.get_num_threads() + cpu_threads.usable_cores() + 64)
