"""`train --fsdp`: FSDP2 over gloo on the CPU (2 processes) trains like DDP and resumes exactly."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from fastdit.checkpoint import load_model
from fastdit.cli import main
from test_train import TINY, assert_same_tensors, final_state
from test_train_distributed import REPO, assert_same_after_adam

RUN = [*TINY, "--device", "cpu", "--run-name", "run", "--micro-batch-size", "4"]


def torchrun_command(*args):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            "-m", "fastdit", "train", *RUN, *args]


def torchrun_env():
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}


def torchrun(tmp_path, *args):
    result = subprocess.run(torchrun_command(*args), env=torchrun_env(), cwd=tmp_path, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def losses(run_dir):
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_fsdp_trains_like_ddp_and_resumes_exactly_after_sigkill(tmp_path):
    steps = ["--max-steps", "6", "--ckpt-every", "2"]
    assert "(DDP)" in torchrun(tmp_path, *steps, "--results-dir", str(tmp_path / "ddp")).stdout
    sharded = torchrun(tmp_path, *steps, "--results-dir", str(tmp_path / "fsdp"), "--fsdp", "--sample-every", "6",
                       "--sample-steps", "2")
    assert "(FSDP2: parameters, gradients, optimizer state and EMA sharded)" in sharded.stdout
    ddp, fsdp = tmp_path / "ddp" / "run", tmp_path / "fsdp" / "run"

    # Both runs compute every per-sample loss and local gradient from the same fp32 weights (FSDP
    # gathers them unchanged); they differ only in how the two processes' gradients are summed and
    # divided (DDP's all-reduce vs FSDP's reduce-scatter), one or two roundings of u = 2^-24 per
    # element. Adam's update m/sqrt(v) is invariant to the gradient's scale, so a relative gradient
    # error of a few u moves each weight by a few u of its step (lr 1e-3); over 6 steps of a depth-2
    # model that stays far below 1e-5 relative on the loss and the weights (the same bound as 1 vs 2
    # DDP processes in test_train_distributed.py).
    assert losses(fsdp) == pytest.approx(losses(ddp), rel=1e-5)
    assert len(losses(fsdp)) == 6
    ddp_state, fsdp_state = final_state(ddp), final_state(fsdp)
    assert fsdp_state["model"].keys() == ddp_state["model"].keys()  # plain names, no FSDP prefixes
    for key in ddp_state["model"]:
        assert_same_after_adam(fsdp_state["model"][key], ddp_state["model"][key], key, steps=4)
        torch.testing.assert_close(fsdp_state["ema"][key], ddp_state["ema"][key], rtol=1e-5, atol=1e-6, msg=key)
    # The EMA export is the official layout and loads like any other.
    export = fsdp / "checkpoints" / "0000006-ema.safetensors"
    model, _ = load_model(export)
    assert_same_tensors(load_file(export), fsdp_state["ema"])
    assert set(model.state_dict()) == set(fsdp_state["ema"])
    assert (fsdp / "samples" / "0000006.png").is_file()  # rank 0 sampled from the gathered EMA

    # Kill the whole FSDP job (agent and both workers) once its step-4 checkpoint exists, then resume.
    killed_dir = tmp_path / "killed"
    command = torchrun_command(*steps, "--results-dir", str(killed_dir), "--fsdp")
    job = subprocess.Popen(command, env=torchrun_env(), cwd=tmp_path, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 240
    try:
        while not (killed_dir / "run" / "checkpoints" / "0000004.pt").exists():
            assert job.poll() is None, "the run ended before it could be killed"
            assert time.time() < deadline
            time.sleep(0.05)
    finally:
        os.killpg(job.pid, signal.SIGKILL)
        job.wait()
    assert not (killed_dir / "run" / "checkpoints" / "0000006.pt").exists()
    torchrun(tmp_path, *steps, "--results-dir", str(killed_dir), "--fsdp")
    resumed = final_state(killed_dir / "run")
    assert resumed["position"] == fsdp_state["position"] == {"step": 6, "epoch": 0, "step_in_epoch": 6}
    assert_same_tensors(resumed["model"], fsdp_state["model"])
    assert_same_tensors(resumed["ema"], fsdp_state["ema"])
    assert resumed["optimizer"]["state"].keys() == fsdp_state["optimizer"]["state"].keys()
    for name in fsdp_state["optimizer"]["state"]:
        assert_same_tensors(resumed["optimizer"]["state"][name], fsdp_state["optimizer"]["state"][name])


@pytest.mark.parametrize("flags, message", [
    (["--precision", "fp16"], "--fsdp trains in fp32 or bf16"),
    (["--eval-every", "2", "--eval-ref", "ref.npz"], "--fsdp does not yet compute FIDs during training"),
])
def test_fsdp_refuses_what_it_cannot_do(tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as exit_:
        main(["train", *TINY, "--results-dir", str(tmp_path / "runs"), "--max-steps", "1", "--fsdp", *flags])
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_fsdp_trains_meanflow_like_ddp(tmp_path):
    """MeanFlow under FSDP runs its JVP on the whole batch (every process must gather the weights for
    the same forwards; DDP runs it on the r != t rows only) through FSDP's hooks, with guidance trained
    in. Targets of the same rows computed in batches of different sizes differ by float32 rounding, a
    few ulps of a value of order 1, which the loss and weights carry through 4 steps as 1 and 2 DDP
    processes' summation differences do: the same bounds (`assert_same_after_adam`)."""
    steps = ["--max-steps", "4", "--ckpt-every", "4", "--objective", "meanflow", "--meanflow-omega", "2.0",
             "--meanflow-ratio", "0.5"]
    torchrun(tmp_path, *steps, "--results-dir", str(tmp_path / "ddp"))
    torchrun(tmp_path, *steps, "--results-dir", str(tmp_path / "fsdp"), "--fsdp")
    ddp, fsdp = tmp_path / "ddp" / "run", tmp_path / "fsdp" / "run"
    assert len(losses(fsdp)) == 4
    assert losses(fsdp) == pytest.approx(losses(ddp), rel=1e-5)
    ddp_state, fsdp_state = final_state(ddp), final_state(fsdp)
    for key in ddp_state["model"]:
        assert_same_after_adam(fsdp_state["model"][key], ddp_state["model"][key], key, steps=4)


def test_fsdp_posthoc_ema_is_gathered_like_the_ema(tmp_path):
    """Under FSDP each process averages its own shards; the checkpoint and the snapshots hold the
    gathered averages with plain names, which match DDP's within the FSDP-vs-DDP bound above."""
    flags = ["--max-steps", "4", "--ckpt-every", "4", "--posthoc-ema", "--posthoc-every", "2"]
    torchrun(tmp_path, *flags, "--results-dir", str(tmp_path / "ddp"))
    torchrun(tmp_path, *flags, "--results-dir", str(tmp_path / "fsdp"), "--fsdp")
    ddp, fsdp = final_state(tmp_path / "ddp" / "run"), final_state(tmp_path / "fsdp" / "run")
    for sharded, replicated in zip(fsdp["posthoc_ema"], ddp["posthoc_ema"], strict=True):
        assert sharded.keys() == replicated.keys() == ddp["ema"].keys()
        for key in replicated:
            torch.testing.assert_close(sharded[key], replicated[key], rtol=1e-5, atol=1e-6, msg=key)
    snapshot = tmp_path / "fsdp" / "run" / "posthoc_ema" / "0000004-sigma0.1.safetensors"
    assert_same_tensors(load_file(snapshot), fsdp["posthoc_ema"][1])
    load_model(snapshot)


def test_fsdp_bf16_keeps_times_and_the_residual_stream_float32_as_ddp_autocast_does(tmp_path):
    """FSDP2's mixed precision casts each unit's forward inputs to bf16 by default: the flow time t (129
    values in [0.5, 1]), MeanFlow's gap and the residual stream between blocks, where DDP under autocast
    keeps them float32 and rounds only what enters a matmul. The sharded model must see float32 there
    (one process's gloo group shards as N processes do)."""
    import torch.distributed as dist

    from fastdit.models import LIGHTNINGDIT_BLOCKS, build_model
    from fastdit.precision import autocast
    from fastdit.train.setup import shard_model

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        model = build_model("DiT-T/2", input_size=8, in_channels=1, num_classes=10, depth=2, hidden_size=64,
                            num_heads=2, time_gap_embedding=True, **LIGHTNINGDIT_BLOCKS)
        shard_model(model, "bf16")
        seen = {}

        def record(name):
            def hook(module, args):
                seen.setdefault(name, args[0].dtype)
            return hook

        model.t_embedder.register_forward_pre_hook(record("t"))
        model.gap_embedder.register_forward_pre_hook(record("gap"))
        model.blocks[1].register_forward_pre_hook(record("residual stream"))
        with autocast(torch.device("cpu"), "bf16"):
            model(torch.randn(2, 1, 8, 8), torch.rand(2), torch.tensor([1, 2]), gap=torch.rand(2))
        assert seen == {"t": torch.float32, "gap": torch.float32, "residual stream": torch.float32}
        assert model.pos_embed.dtype == torch.float32  # the root keeps float32 weights, as DDP's autocast reads them
    finally:
        dist.destroy_process_group()


def test_fsdp_trains_in_bf16_like_ddp(tmp_path):
    flags = ["--precision", "bf16", "--objective", "flow", "--max-steps", "4", "--ckpt-every", "4"]
    torchrun(tmp_path, *flags, "--results-dir", str(tmp_path / "ddp"))
    torchrun(tmp_path, *flags, "--results-dir", str(tmp_path / "fsdp"), "--fsdp")
    ddp, fsdp = tmp_path / "ddp" / "run", tmp_path / "fsdp" / "run"
    # Both runs round the same float32 weights and activations to bf16 where a matmul reads them; they
    # differ in how the two processes' float32 gradients are summed (a few u = 2^-24 of each entry, the
    # 1e-5 bound of the fp32 test above). Such a difference flips a later bf16 rounding only for an
    # activation within ~1e-7 relative of a rounding boundary (2^-8 apart): a few of the ~10^3 per
    # sample at most, each moving the mean loss by ~2^-8 / 10^3 ≈ 4e-6 relative; 2e-5 bounds it. FSDP's
    # default casts (bf16 times and residual stream) changed the losses by 8.5e-5 relative here.
    assert losses(fsdp) == pytest.approx(losses(ddp), rel=2e-5)


# ----------------------------------------------------------------------------------------------
# communication at scale: DDP's buckets and bf16 gradients, FSDP's hybrid sharding
# ----------------------------------------------------------------------------------------------


def test_ddp_bucket_size_changes_no_bit(tmp_path):
    # Each gradient entry is the sum of the two processes' values whatever bucket carries it (a + b is
    # exact in either order): the buckets change how many all-reduces run, not one bit of the result.
    steps = ["--max-steps", "3", "--ckpt-every", "3"]
    torchrun(tmp_path, *steps, "--results-dir", str(tmp_path / "default"))
    small = torchrun(tmp_path, *steps, "--results-dir", str(tmp_path / "small"), "--ddp-bucket-mb", "1")
    assert "(DDP: 1 MiB buckets)" in small.stdout
    a, b = final_state(tmp_path / "default" / "run"), final_state(tmp_path / "small" / "run")
    for part in ("model", "ema"):
        assert_same_tensors(a[part], b[part])


def test_ddp_bf16_gradients_train_like_float32_ones_within_their_rounding(tmp_path):
    steps = ["--max-steps", "4", "--ckpt-every", "4"]
    torchrun(tmp_path, *steps, "--results-dir", str(tmp_path / "fp32"))
    compressed = torchrun(tmp_path, *steps, "--results-dir", str(tmp_path / "bf16"), "--ddp-bf16-grads")
    assert "bf16 gradient all-reduce" in compressed.stdout
    # Each process's gradient is rounded to bf16 (2^-9 relative per entry) before the sum. The first
    # step's loss is computed before any update: equal. Adam's step m/sqrt(v) is invariant to the
    # gradient's scale, and a 2^-9 relative error of the gradient moves each step by at most ~2^-8 of
    # lr: after 3 updates the losses agree to ~1e-3 relative, and every weight stays within Adam's bound.
    fp32, bf16 = losses(tmp_path / "fp32" / "run"), losses(tmp_path / "bf16" / "run")
    assert bf16[0] == fp32[0]
    assert bf16 == pytest.approx(fp32, rel=1e-3)
    a, b = final_state(tmp_path / "fp32" / "run"), final_state(tmp_path / "bf16" / "run")
    most = 2 * 4 * 1e-3 * (1 - 0.9) / (1 - 0.999) ** 0.5  # twice the most Adam moves a weight in 4 steps
    assert all(((a["model"][k] - b["model"][k]).abs() <= most).all() for k in a["model"])
    assert any(not torch.equal(a["model"][k], b["model"][k]) for k in a["model"])  # the option does something


def torchrun4(tmp_path, *args):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "4",
               "-m", "fastdit", "train", *TINY, "--device", "cpu", "--run-name", "run", "--micro-batch-size", "4", *args]
    result = subprocess.run(command, env=torchrun_env(), cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_hybrid_sharding_trains_like_ddp(tmp_path):
    """4 processes as 2 nodes of 2: parameters sharded within each pair, replicated across the pairs."""
    steps = ["--max-steps", "4", "--ckpt-every", "4", "--global-batch-size", "16"]
    torchrun4(tmp_path, *steps, "--results-dir", str(tmp_path / "ddp"))
    hybrid = torchrun4(tmp_path, *steps, "--results-dir", str(tmp_path / "hsdp"), "--fsdp", "--fsdp-shard-size", "2")
    assert "HSDP: sharded within groups of 2 processes, replicated across them" in hybrid.stdout
    ddp, hsdp = tmp_path / "ddp" / "run", tmp_path / "hsdp" / "run"
    # As FSDP against DDP above: the sums of the four processes' gradients differ in order only.
    assert losses(hsdp) == pytest.approx(losses(ddp), rel=1e-5)
    a, b = final_state(ddp), final_state(hsdp)
    assert b["model"].keys() == a["model"].keys()  # plain names, gathered from the 2-D mesh
    for key in a["model"]:
        assert_same_after_adam(b["model"][key], a["model"][key], key, steps=4)
        assert_same_after_adam(b["ema"][key], a["ema"][key], key, steps=4)


@pytest.mark.parametrize("flags, message", [
    (["--fsdp-shard-size", "2"], "--fsdp-shard-size sets how --fsdp shards; add --fsdp"),
    (["--fsdp", "--ddp-bf16-grads"], "--ddp-bf16-grads reduces DDP's gradients"),
])
def test_communication_settings_that_do_not_fit_are_one_line(tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit):
        main(["train", *TINY, "--results-dir", str(tmp_path / "runs"), "--max-steps", "1", *flags])
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
