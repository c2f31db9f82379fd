"""Two processes under torchrun (gloo, CPU) write the same store as one process."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fastdit.cli import main
from conftest import make_image_folder, save_tiny_vae
from test_extract import IMAGE_SIZE, assert_same_store

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("extra", [[], ["--with-images"]], ids=["latents", "with-images"])
def test_two_processes_write_the_same_store_as_one(tmp_path, extra):
    images = make_image_folder(tmp_path / "images", per_class=5)  # 15 images: 4 shards of 4, the last of 3
    vae = save_tiny_vae(tmp_path / "vae", seed=0)
    common = ["--data-path", str(images), "--image-size", str(IMAGE_SIZE), "--vae", vae, "--batch-size", "3",
              "--shard-size", "4", "--num-workers", "0", "--dtype", "float32", "--no-progress", *extra]

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    result = subprocess.run(
        [*torchrun, "-m", "fastdit", "extract", "--features-path", str(tmp_path / "two"), "--device", "cpu", *common],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=180,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    # Printed once, by rank 0, with the image count summed over both processes.
    assert result.stdout.count("latent store") == 1 and "15 encoded" in result.stdout, result.stdout

    assert main(["extract", "--features-path", str(tmp_path / "one"), *common]) == 0
    # torchrun runs each process with one thread; a different thread count may reorder float sums.
    assert_same_store(tmp_path / "one", tmp_path / "two", atol=1e-5)
    assert load_file(tmp_path / "two" / "shard-00003.safetensors")["source"].tolist() == [12, 13, 14]
    if extra:  # the crops are bytes: equal exactly, whichever process wrote them
        for shard in range(4):
            one, two = (load_file(tmp_path / name / f"shard-{shard:05d}.safetensors") for name in ("one", "two"))
            assert torch.equal(one["image_png"], two["image_png"])
