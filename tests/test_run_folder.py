"""One process tree per run folder: a second one is refused with a message; a killed holder frees it."""

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from fastdit.errors import UserError
from fastdit.run_folder import exclusive_lock, refuse_other_settings

REPO = Path(__file__).resolve().parents[1]

# Takes the lock on argv[1] as "fastdit other", says so, then holds it until killed (or prints the
# refusal and exits 2, as the CLI does).
HOLDER = textwrap.dedent("""
    import sys, time
    from fastdit.errors import UserError
    from fastdit.run_folder import exclusive_lock
    try:
        with exclusive_lock(sys.argv[1], "fastdit other"):
            print("locked", flush=True)
            time.sleep(float(sys.argv[2]))
    except UserError as err:
        print(err, file=sys.stderr)
        sys.exit(2)
""")


def holder(folder, seconds=120.0) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([sys.executable, "-c", HOLDER, str(folder), str(seconds)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_a_second_process_is_refused_while_we_hold_it(tmp_path):
    with exclusive_lock(tmp_path / "run", "fastdit train"):
        second = holder(tmp_path / "run", seconds=0)
        _, err = second.communicate(timeout=60)
    assert second.returncode == 2
    assert f"{str(tmp_path / 'run')!r} is in use by fastdit train (pid {os.getpid()}" in err
    # Released at the end of the block: the next one gets it.
    again = holder(tmp_path / "run", seconds=0)
    out, _ = again.communicate(timeout=60)
    assert again.returncode == 0 and out.strip() == "locked"


def test_the_lock_is_free_again_after_its_holder_is_sigkilled(tmp_path):
    process = holder(tmp_path / "run")
    try:
        assert process.stdout.readline().strip() == "locked"
        with pytest.raises(UserError, match=rf"in use by fastdit other \(pid {process.pid} on "):
            with exclusive_lock(tmp_path / "run", "fastdit train"):
                pass
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    with exclusive_lock(tmp_path / "run", "fastdit train"):
        assert "fastdit train (pid" in (tmp_path / "run" / ".fastdit.lock").read_text()


def test_two_holders_in_one_process_are_refused_too(tmp_path):
    with exclusive_lock(tmp_path, "first"):
        with pytest.raises(UserError, match="in use by first"):
            with exclusive_lock(tmp_path, "second"):
                pass


def test_refuse_other_settings_names_what_differs():
    recorded = {"lr": 0.001, "epochs": 10, "vae": {"name": "ema", "scale": 0.18215}}
    refuse_other_settings("the run", recorded, {**recorded, "epochs": 20}, "fix", ignore={"epochs"})
    with pytest.raises(UserError) as info:
        refuse_other_settings("the run", recorded, {**recorded, "lr": 0.002, "vae": {"name": "mse", "scale": 0.18215}},
                              "pass another --run-name")
    assert str(info.value) == 'the run with other settings (lr: 0.001 -> 0.002; vae.name: "ema" -> "mse"); pass another --run-name'
