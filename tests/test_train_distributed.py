"""Two processes under torchrun (DDP over gloo, CPU) train like one process at the same global batch."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastdit.train.loop import train
from test_train import OBJECTIVE_RUNS, TINY, final_state, tiny_config

REPO = Path(__file__).resolve().parents[1]


def torchrun(tmp_path, *args):
    # One thread a process, said explicitly: the one-process reference below runs on one thread, and a
    # process left to choose (fastdit.cpu_threads) may take two on an idle machine, which sums in
    # another order (seen: DiT^DH with routing, 4 of 768 entries moved by Adam's sign of rounding).
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "fastdit", "train", *args]
    return subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)


@OBJECTIVE_RUNS
def test_two_processes_match_one_process(tmp_path, flags, fields):
    result = torchrun(tmp_path, *TINY, *flags, "--max-steps", "4", "--ckpt-every", "4", "--device", "cpu",
                      "--results-dir", str(tmp_path / "two"), "--micro-batch-size", "4")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("saved") == 1  # only rank 0 writes and logs

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as torchrun runs each process: the same float summation order
    try:
        one = train(tiny_config(tmp_path / "one", max_steps=4, ckpt_every=4, **fields))
    finally:
        torch.set_num_threads(threads)
    two_state, one_state = final_state(tmp_path / "two" / one.run_dir.name), final_state(one.run_dir)
    assert two_state["position"] == one_state["position"]
    for key in one_state["model"]:
        assert_same_after_adam(two_state["model"][key], one_state["model"][key], key, steps=4)
        assert_same_after_adam(two_state["ema"][key], one_state["ema"][key], key, steps=4)


def assert_same_after_adam(two: torch.Tensor, one: torch.Tensor, key: str, *, steps: int, lr: float = 1e-3) -> None:
    """Weights of 1 and 2 processes agree to 1e-5 relative (their gradients differ by summation order
    only), except where Adam divides rounding by rounding: a coordinate whose gradient is ~0 (e.g. an
    embedding entry whose contributions cancel) moves by up to lr a step in a direction the rounding
    picks (seen: 1 of 704 entries under ATEN_CPU_CAPABILITY=default). Those must stay rare (a real
    divergence moves many coordinates) and within twice the most Adam can move a weight in `steps` steps:
    lr (1 − β1) / √(1 − β2) a step for the default betas (Kingma & Ba 2015, section 2.1); the EMA, an
    average of weights, stays within the same bound."""
    close = torch.isclose(two, one, rtol=1e-5, atol=1e-6)
    assert close.float().mean() >= 0.995, f"{key}: {int((~close).sum())} of {one.numel()} entries differ"
    most = 2 * steps * lr * (1 - 0.9) / (1 - 0.999) ** 0.5
    assert ((two - one).abs() <= most).all(), f"{key}: entries differ by more than Adam can move them"


def test_batch_not_divisible_by_processes(tmp_path):
    result = torchrun(tmp_path, *TINY, "--global-batch-size", "15", "--max-steps", "1", "--device", "cpu",
                      "--results-dir", str(tmp_path / "runs"))
    assert result.returncode != 0
    assert "global batch size 15 is not divisible by the 2 processes" in result.stderr
    assert not (tmp_path / "runs").exists()


def test_a_folder_in_use_stops_every_process(tmp_path):
    """Rank 0 is refused the run folder's lock; rank 1 must leave too (exit 2, no traceback), not wait
    for rank 0 at its next collective call. The two processes are started by hand, as one per node
    would be: no torchrun agent here stops a waiting rank 1 when rank 0 exits."""
    import socket

    from fastdit.run_folder import exclusive_lock

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "fastdit", "train", *TINY, "--max-steps", "1", "--device", "cpu",
               "--results-dir", str(tmp_path / "runs"), "--run-name", "busy"]
    base = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
            "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    with exclusive_lock(tmp_path / "runs" / "busy", "fastdit train"):
        ranks = [subprocess.Popen(command, env={**base, "RANK": str(r), "LOCAL_RANK": str(r)}, cwd=tmp_path,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in (0, 1)]
        try:
            errors = [process.communicate(timeout=120)[1] for process in ranks]
        finally:
            for process in ranks:
                process.kill()
    assert [process.returncode for process in ranks] == [2, 2], errors
    assert "is in use by fastdit train" in errors[0] and "Traceback" not in errors[0], errors[0]
    assert "Traceback" not in errors[1], errors[1]
    assert sorted(p.name for p in (tmp_path / "runs" / "busy").iterdir()) == [".fastdit.lock"]


def test_a_step_non_finite_on_one_process_is_skipped_by_every_process(tmp_path):
    # --skip-nonfinite under DDP: step 3 is non-finite on rank 1 only (its loss terms); every process
    # must skip it, or the replicas would part ways. Rank 0 writes the checkpoints: its state after step
    # 3 is the one after step 2, and the run goes on to the end.
    script = tmp_path / "poisoned_train.py"
    script.write_text(
        "import sys\n"
        f"sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        "import nonfinite_steps\n"
        "nonfinite_steps.install(setattr, {3}, rank=1)\n"
        "from fastdit.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    # One thread a process, said explicitly: the one-process reference below runs on one thread, and a
    # process left to choose (fastdit.cpu_threads) may take two on an idle machine, which sums in
    # another order (seen: DiT^DH with routing, 4 of 768 entries moved by Adam's sign of rounding).
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
               "train", *TINY, "--max-steps", "4", "--ckpt-every", "1", "--keep-last", "4", "--device", "cpu",
               "--skip-nonfinite", "1", "--results-dir", str(tmp_path / "two")]
    result = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("step 0000003  the loss became inf: skipped") == 1, result.stdout  # rank 0 logs
    run_dir = next((tmp_path / "two").iterdir())

    def checkpoint(step):
        return torch.load(run_dir / "checkpoints" / f"{step:07d}.pt", map_location="cpu", weights_only=True)

    after_2, after_3, after_4 = checkpoint(2), checkpoint(3), checkpoint(4)
    for key in after_2["model"]:
        assert torch.equal(after_3["model"][key], after_2["model"][key]), key
        assert torch.equal(after_3["ema"][key], after_2["ema"][key]), key
    assert not torch.equal(after_4["model"]["final_layer.linear.weight"], after_3["model"]["final_layer.linear.weight"])


def test_posthoc_ema_under_two_processes_matches_one_process(tmp_path):
    """`--posthoc-ema` under DDP: every process updates its replica of both power EMAs; rank 0 alone
    writes the snapshots, and they hold what one process computes (within the 1-vs-2-process bound)."""
    posthoc = ["--posthoc-ema", "--posthoc-every", "2"]
    result = torchrun(tmp_path, *TINY, *posthoc, "--max-steps", "4", "--ckpt-every", "4", "--device", "cpu",
                      "--results-dir", str(tmp_path / "two"), "--micro-batch-size", "4")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("saved post-hoc EMA snapshots") == 2  # steps 2 and 4, by rank 0 only
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one = train(tiny_config(tmp_path / "one", max_steps=4, ckpt_every=4, posthoc_ema=True, posthoc_every=2))
    finally:
        torch.set_num_threads(threads)
    two_dir = tmp_path / "two" / one.run_dir.name
    assert sorted(p.name for p in (two_dir / "posthoc_ema").iterdir()) == sorted(
        p.name for p in (one.run_dir / "posthoc_ema").iterdir())
    two_state, one_state = final_state(two_dir), final_state(one.run_dir)
    for two_ema, one_ema in zip(two_state["posthoc_ema"], one_state["posthoc_ema"], strict=True):
        for key in one_ema:
            assert_same_after_adam(two_ema[key], one_ema[key], key, steps=4)


READ_ON_RANK0_ONLY = '''
import os, sys
import pytest
import torch
if os.environ["RANK"] != "0":  # any other process that reads a training checkpoint fails the run
    read = torch.load
    def refuse(path, *args, **kwargs):
        if str(path).endswith(".pt"):
            raise RuntimeError(f"rank {os.environ['RANK']} read {path}")
        return read(path, *args, **kwargs)
    torch.load = refuse
from fastdit.cli import main
sys.exit(main(sys.argv[1:]))
'''


@pytest.mark.parametrize("sharding", [[], ["--fsdp"]], ids=["ddp", "fsdp"])
def test_a_resume_of_several_processes_reads_the_checkpoint_once(tmp_path, sharding):
    """Rank 0 alone reads the checkpoint and broadcasts it (model, optimizer, the EMAs, REPA's projector);
    the other processes never open it, and the resumed run is bit for bit the uninterrupted one."""
    from fastdit.demo.encoder import DigitTokens, save_digit_encoder

    torch.manual_seed(1)
    encoder = str(save_digit_encoder(DigitTokens(), tmp_path / "tiny.ts"))
    script = tmp_path / "rank0_reads.py"
    script.write_text(READ_ON_RANK0_ONLY)
    methods = ["--posthoc-ema", "--posthoc-every", "2", "--repa", encoder, "--repa-depth", "1",
               "--repa-projector-dim", "32", *sharding, "--device", "cpu", "--micro-batch-size", "4"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}

    def run(results, steps):
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
                   "train", *TINY, *methods, "--max-steps", str(steps), "--ckpt-every", "2", "--results-dir",
                   str(tmp_path / results)]
        result = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        return result

    run("whole", 4)
    run("resumed", 2)
    assert "resuming from" in run("resumed", 4).stdout
    (whole,), (resumed,) = (tmp_path / "whole").iterdir(), (tmp_path / "resumed").iterdir()
    a, b = final_state(whole), final_state(resumed)
    assert a["position"] == b["position"] == {"step": 4, "epoch": 0, "step_in_epoch": 4}
    for part in ("model", "ema"):
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part]), part
    for x, y in zip(a["posthoc_ema"], b["posthoc_ema"]):
        assert all(torch.equal(x[k], y[k]) for k in x)
    assert all(torch.equal(a["alignment"]["projector"][k], b["alignment"]["projector"][k])
               for k in a["alignment"]["projector"])
