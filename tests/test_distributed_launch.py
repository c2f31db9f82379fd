"""How a process finds its place in a job: torchrun's variables, an srun step's (SLURM), or none; the
process group's timeout; and which GPU each process takes. Tested by environment: the launcher's
variables set, `torch.cuda` and `init_process_group` replaced, and one real 2-process gloo group
started the way srun starts its tasks."""

import datetime
import os
import random
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastdit import distributed as dist
from fastdit.errors import UserError

REPO = Path(__file__).resolve().parents[1]
LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID", "SLURM_LOCALID",
                    "SLURM_NTASKS", "SLURM_STEP_NUM_TASKS", "SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_JOB_ID",
                    "CUDA_VISIBLE_DEVICES", dist.TIMEOUT_VARIABLE)


@pytest.fixture
def joined(monkeypatch):
    """No launcher variables; `init_process_group` records its arguments instead of joining a group."""
    for name in LAUNCH_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    calls = []
    monkeypatch.setattr(dist.torch_dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist.torch_dist, "init_process_group", lambda **kwargs: calls.append(kwargs))
    return calls


def gpus(monkeypatch, count: int) -> list:
    """`count` visible CUDA GPUs, as far as `fastdit.distributed` asks; returns the devices set."""
    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    return chosen


def test_the_process_group_gets_a_timeout_for_long_jobs(monkeypatch, joined):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    info = dist.init_from_env("cpu")
    assert (info.rank, info.world_size, info.local_rank) == (1, 2, 0)
    [call] = joined
    assert call["timeout"] == datetime.timedelta(minutes=30) and call["backend"] == "gloo"  # torch's NCCL default: 10
    assert (call["rank"], call["world_size"], call["init_method"]) == (1, 2, "env://")
    monkeypatch.setenv(dist.TIMEOUT_VARIABLE, "2h")
    dist.init_from_env("cpu")
    assert joined[-1]["timeout"] == datetime.timedelta(hours=2)
    assert dist.init_from_env("cpu", timeout=datetime.timedelta(seconds=5)) and joined[-1]["timeout"].total_seconds() == 5


@pytest.mark.parametrize("text, seconds", [("5400", 5400), ("90m", 5400), ("1.5h", 5400), (" 45 s ", 45), ("", 1800)])
def test_the_timeout_setting_reads_seconds_minutes_and_hours(text, seconds):
    assert dist.timeout_from_env({dist.TIMEOUT_VARIABLE: text}).total_seconds() == seconds


@pytest.mark.parametrize("text", ["soon", "0", "-5m", "10d", "1h30m"])
def test_a_bad_timeout_is_one_line_naming_the_variable(text):
    with pytest.raises(UserError, match=rf"^{dist.TIMEOUT_VARIABLE}=.* is not a duration; give seconds, or a number"):
        dist.timeout_from_env({dist.TIMEOUT_VARIABLE: text})


def srun_task(monkeypatch, *, rank: int, local_rank: int, tasks: int, nodelist="gpu[07-09,12],cpu01", job_id="123456"):
    """The variables srun sets in one task of a job step (and none of torchrun's)."""
    for name, value in (("SLURM_PROCID", rank), ("SLURM_LOCALID", local_rank), ("SLURM_NTASKS", tasks),
                        ("SLURM_STEP_NUM_TASKS", tasks), ("SLURM_STEP_NODELIST", nodelist), ("SLURM_JOB_ID", job_id)):
        if value is not None:
            monkeypatch.setenv(name, str(value))


def test_srun_tasks_take_rank_world_and_gpu_from_slurm(monkeypatch, joined):
    srun_task(monkeypatch, rank=6, local_rank=2, tasks=8)
    chosen = gpus(monkeypatch, 4)  # the node's 4 GPUs visible to every task: task 6 is the node's third
    info = dist.init_from_env()
    assert (info.rank, info.world_size, info.local_rank, info.device) == (6, 8, 2, torch.device("cuda", 2))
    assert chosen == [torch.device("cuda", 2)]
    [call] = joined
    assert call["backend"] == "nccl" and (call["rank"], call["world_size"]) == (6, 8)
    # Task 0 runs on the step's first node; the port follows the job id, so two jobs on a node do not meet.
    assert call["init_method"] == f"tcp://gpu07:{15000 + 123456 % 20000}"
    assert call["timeout"] == dist.DEFAULT_TIMEOUT


def test_srun_with_one_gpu_bound_to_each_task_uses_that_gpu(monkeypatch, joined):
    srun_task(monkeypatch, rank=3, local_rank=3, tasks=4)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")  # srun --gpus-per-task=1
    chosen = gpus(monkeypatch, 1)
    assert dist.init_from_env("cuda").device == torch.device("cuda", 0)
    assert chosen == [torch.device("cuda", 0)]


def test_master_address_and_port_given_are_kept(monkeypatch, joined):
    srun_task(monkeypatch, rank=0, local_rank=0, tasks=2)
    monkeypatch.setenv("MASTER_ADDR", "10.0.0.5")
    monkeypatch.setenv("MASTER_PORT", "29400")
    dist.init_from_env("cpu")
    assert joined[-1]["init_method"] == "tcp://10.0.0.5:29400"


def test_an_sbatch_script_without_srun_is_one_process(monkeypatch, joined):
    for name, value in (("SLURM_PROCID", "0"), ("SLURM_LOCALID", "0"), ("SLURM_NTASKS", "8"), ("SLURM_JOB_ID", "7")):
        monkeypatch.setenv(name, value)
    info = dist.init_from_env("cpu")
    assert (info.rank, info.world_size) == (0, 1) and joined == []
    assert not dist.in_multiprocess_job()


def test_a_process_beyond_the_visible_gpus_is_refused_in_one_line(monkeypatch, joined):
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("LOCAL_RANK", "2")
    gpus(monkeypatch, 2)
    with pytest.raises(UserError, match=r"^process 2 has local rank 2 but sees 2 GPU\(s\); start one process per GPU"):
        dist.init_from_env()
    assert joined == []


@pytest.mark.parametrize("environ, message", [
    ({"SLURM_STEP_NUM_TASKS": "2", "SLURM_PROCID": "0", "SLURM_LOCALID": "0"},
     "srun started 2 tasks but neither MASTER_ADDR nor SLURM_STEP_NODELIST is set; export MASTER_ADDR="),
    ({"SLURM_STEP_NUM_TASKS": "2", "SLURM_LOCALID": "0", "SLURM_STEP_NODELIST": "n1"},
     "the launcher's variable SLURM_PROCID is missing, not a whole number"),
    ({"RANK": "one", "WORLD_SIZE": "2"}, "the launcher's variable RANK is 'one', not a whole number"),
])
def test_missing_launcher_variables_are_one_line(environ, message):
    with pytest.raises(UserError, match="^" + message.replace("(", r"\(").replace(")", r"\)")):
        dist.launch_from_env(environ)


@pytest.mark.parametrize("nodelist, first", [
    ("gnode[10,20,25,37]", "gnode10"), ("node[001-004],gpu01", "node001"), ("a01,a02", "a01"),
    ("rack1-n[07-08]", "rack1-n07"), ("n[1-2]-ib[3-4]", "n1-ib3"), ("localhost", "localhost"),
])
def test_the_first_host_of_a_slurm_host_list(nodelist, first):
    assert dist._first_host(nodelist) == first


def free_job_port() -> int:
    """A free port of those SLURM job ids give (15000 + id mod 20000)."""
    for port in random.Random(os.getpid()).sample(range(15000, 35000), 200):
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port in 15000..34999")


def test_two_srun_tasks_form_a_gloo_group(tmp_path):
    """Two processes started with an srun step's variables only (no torchrun, no MASTER_ADDR): they find
    each other at the step's first node and sum their ranks."""
    job_id = free_job_port() - 15000
    script = ("from fastdit import distributed as dist\nimport torch\ninfo = dist.init_from_env('cpu')\n"
              "total = dist.all_reduce_sum(torch.tensor([float(info.rank + 1)]))\n"
              "print(info.rank, info.world_size, int(total.item()), flush=True)\ndist.shutdown()\n")
    base = {key: value for key, value in os.environ.items() if key not in LAUNCH_VARIABLES}
    base.update(PYTHONPATH=str(REPO), SLURM_STEP_NUM_TASKS="2", SLURM_NTASKS="2", SLURM_STEP_NODELIST="localhost",
                SLURM_JOB_ID=str(job_id), OMP_NUM_THREADS="1")
    tasks = [subprocess.Popen([sys.executable, "-c", script], env={**base, "SLURM_PROCID": str(r), "SLURM_LOCALID": str(r)},
                              cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    outputs = [task.communicate(timeout=120) for task in tasks]
    assert [task.returncode for task in tasks] == [0, 0], [err[-2000:] for _, err in outputs]
    assert sorted(out.strip() for out, _ in outputs) == ["0 2 3", "1 2 3"]
