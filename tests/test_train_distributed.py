"""Two processes under torchrun (DDP over gloo, CPU) train like one process at the same global batch."""

import os
import subprocess
import sys
from pathlib import Path

import torch

from fastdit.train.loop import train
from test_train import TINY, final_state, tiny_config

REPO = Path(__file__).resolve().parents[1]


def torchrun(tmp_path, *args):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "fastdit", "train", *args]
    return subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)


def test_two_processes_match_one_process(tmp_path):
    result = torchrun(tmp_path, *TINY, "--max-steps", "4", "--ckpt-every", "4", "--device", "cpu",
                      "--results-dir", str(tmp_path / "two"), "--micro-batch-size", "4")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("saved") == 1  # only rank 0 writes and logs

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as torchrun runs each process: the same float summation order
    try:
        one = train(tiny_config(tmp_path / "one", max_steps=4, ckpt_every=4))
    finally:
        torch.set_num_threads(threads)
    two_state, one_state = final_state(tmp_path / "two" / one.run_dir.name), final_state(one.run_dir)
    assert two_state["position"] == one_state["position"]
    for key in one_state["model"]:
        torch.testing.assert_close(two_state["model"][key], one_state["model"][key], rtol=1e-5, atol=1e-6, msg=key)
        torch.testing.assert_close(two_state["ema"][key], one_state["ema"][key], rtol=1e-5, atol=1e-6, msg=key)


def test_batch_not_divisible_by_processes(tmp_path):
    result = torchrun(tmp_path, *TINY, "--global-batch-size", "15", "--max-steps", "1", "--device", "cpu",
                      "--results-dir", str(tmp_path / "runs"))
    assert result.returncode != 0
    assert "global batch size 15 is not divisible by the 2 processes" in result.stderr
    assert not (tmp_path / "runs").exists()
