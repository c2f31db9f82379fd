"""One process tree per run folder: a second one is refused with a message; a killed holder frees it."""

import errno
import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from fastdit.errors import UserError
from fastdit.run_folder import HELD_NAME, exclusive_lock, is_lock_file, refuse_other_settings

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


# ------------------------------------------------------------------------------------------------
# on a cluster: filesystems without flock, and a lock that outlives a dead node
# ------------------------------------------------------------------------------------------------

RUN_VARIABLES = ("TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT", "SLURM_JOB_ID", "SLURM_RESTART_COUNT")


@pytest.fixture
def no_flock(monkeypatch):
    """A filesystem whose flock(2) fails as NFS without lockd does (ENOLCK)."""
    import fcntl

    def refuse(fd, operation, code=errno.ENOLCK):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(fcntl, "flock", refuse)
    return refuse


@pytest.fixture(autouse=True)
def outside_any_job(monkeypatch):
    for name in RUN_VARIABLES:
        monkeypatch.delenv(name, raising=False)


@pytest.mark.parametrize("code", [errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP])
def test_without_flock_a_lock_file_created_exclusively_holds_the_folder(tmp_path, monkeypatch, capsys, code):
    import fcntl

    monkeypatch.setattr(fcntl, "flock", lambda fd, operation: (_ for _ in ()).throw(OSError(code, os.strerror(code))))
    held = tmp_path / "run" / HELD_NAME
    with exclusive_lock(tmp_path / "run", "fastdit train"):
        assert held.read_text().startswith(f"fastdit train (pid {os.getpid()} on {socket.gethostname()})")
        assert "has no flock" in capsys.readouterr().err
        with pytest.raises(UserError) as refused:  # a second job, here or on another host
            with exclusive_lock(tmp_path / "run", "fastdit sample-ddp"):
                pass
        message = str(refused.value)
        assert message.startswith(f"{str(tmp_path / 'run')!r} is in use by fastdit train (pid {os.getpid()}")
        assert f"If that job is gone (its node died, or it was killed), delete {str(held)!r} and rerun" in message
        assert "\n" not in message
    assert not held.exists()  # the job ended: the folder is free
    with exclusive_lock(tmp_path / "run", "fastdit train"):
        pass


def test_without_flock_a_lock_file_of_a_killed_process_here_is_taken_over(tmp_path, no_flock, capsys):
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / HELD_NAME).write_text(f"fastdit train (pid {gone.stdout.strip()} on {socket.gethostname()})")
    with exclusive_lock(tmp_path, "fastdit train"):
        assert f"(pid {os.getpid()} on" in (tmp_path / HELD_NAME).read_text()
    assert "which is gone; taking it over" in capsys.readouterr().err


def test_without_flock_a_lock_file_from_another_host_is_refused_until_deleted(tmp_path, no_flock):
    (tmp_path / HELD_NAME).write_text("fastdit train (pid 4242 on node-17) [slurm job 99]")
    with pytest.raises(UserError, match=r"in use by fastdit train \(pid 4242 on node-17\); .* delete .*\.fastdit\.lock\.held"):
        with exclusive_lock(tmp_path, "fastdit train"):
            pass
    (tmp_path / HELD_NAME).unlink()  # what the message says to do once that job is known to be gone
    with exclusive_lock(tmp_path, "fastdit train"):
        pass


def test_other_lock_errors_are_one_line(tmp_path, monkeypatch):
    import fcntl

    monkeypatch.setattr(fcntl, "flock", lambda fd, operation: (_ for _ in ()).throw(OSError(errno.EIO, "Input/output error")))
    with pytest.raises(UserError, match=r"^cannot lock .*\.fastdit\.lock': Input/output error$"):
        with exclusive_lock(tmp_path, "fastdit train"):
            pass


def held_by_dead_node(tmp_path, run_id):
    """A process that holds the flock and records torchrun run `run_id`: the lock a node that died holds
    on NFS until its lease runs out (the process is alive here; to this host it looks like another)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "TORCHELASTIC_RUN_ID": run_id, "TORCHELASTIC_RESTART_COUNT": "0"}
    process = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path / "run"), "120"], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "locked"
    return process


def test_a_torchrun_restart_takes_over_the_lock_its_earlier_attempt_left_on_a_dead_node(tmp_path, monkeypatch, capsys):
    process = held_by_dead_node(tmp_path, "job-8f2c")
    try:
        monkeypatch.setattr(socket, "gethostname", lambda: "node-b")  # the restart runs on another node
        monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-8f2c")
        # The first attempt of another job (or this one, not restarted) is refused, with what to do.
        with pytest.raises(UserError) as refused:
            with exclusive_lock(tmp_path / "run", "fastdit train"):
                pass
        assert f"in use by fastdit other (pid {process.pid} on " in str(refused.value)
        assert "the file server frees its lock after the node's lease (NFSv4: about 90 s), or delete" in str(refused.value)
        monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
        monkeypatch.setenv("TORCHELASTIC_RUN_ID", "another-job")  # a restart of another job does not take it
        with pytest.raises(UserError, match="is in use by fastdit other"):
            with exclusive_lock(tmp_path / "run", "fastdit train"):
                pass
        monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-8f2c")  # the restart of the holder's job does
        with exclusive_lock(tmp_path / "run", "fastdit train"):
            assert (tmp_path / "run" / ".fastdit.lock").read_text() == \
                f"fastdit train (pid {os.getpid()} on node-b) [torchrun run job-8f2c]"
        assert "this job's earlier attempt; taking it over" in capsys.readouterr().err
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()


def test_lock_files_are_not_output():
    assert is_lock_file(Path("run") / ".fastdit.lock") and is_lock_file(HELD_NAME) and not is_lock_file("config.json")


def test_a_requeued_slurm_job_takes_over_the_lock_file_of_its_earlier_attempt(tmp_path, no_flock, monkeypatch):
    (tmp_path / HELD_NAME).write_text("fastdit train (pid 4242 on node-17) [slurm job 99]")
    monkeypatch.setenv("SLURM_JOB_ID", "99")
    with pytest.raises(UserError, match="in use by fastdit train"):  # the same job's second step: not a restart
        with exclusive_lock(tmp_path, "fastdit train"):
            pass
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")  # `scontrol requeue`, or --requeue after a node failure
    with exclusive_lock(tmp_path, "fastdit train"):
        assert (tmp_path / HELD_NAME).read_text().endswith("[slurm job 99]")
    assert not (tmp_path / HELD_NAME).exists()
