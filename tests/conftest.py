import http.server
import math
import os
import threading
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

FIXTURES = Path(__file__).parent / "fixtures" / "official-dit"
IMAGE_SIZE = 16

# fastdit's jobs pick their CPU threads from the load they see at start-up (fastdit.cpu_threads). Tests
# compare runs bit for bit across processes (a killed-and-resumed CLI run against an in-process one), and
# a kernel's float rounding may depend on its thread count: every job a test starts, in this process or
# a child, gets this process's count (tests/test_cpu_threads.py clears it to test the choice).
os.environ.setdefault("OMP_NUM_THREADS", str(torch.get_num_threads()))


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Never touch the user's cache (or the network) from a test."""
    monkeypatch.setenv("FASTDIT_CACHE", str(tmp_path_factory.mktemp("cache")))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    return FIXTURES


def load_fixture(name: str):
    return torch.load(FIXTURES / name, weights_only=True)


def recipe_state_dict(model: torch.nn.Module) -> dict:
    """The fixtures' portable weights (tests/fixtures/official-dit/README.md): per key, float64 standard
    normals from numpy's PCG64 seeded with crc32(key), scaled by 1/sqrt(fan-in) (>= 2 dims) or 0.02
    (1 dim), cast to float32; pos_embed keeps its sin-cos value. numpy's draws are the same on every
    CPU, unlike torch.randn's float32 values, which depend on the kernels' vector width."""
    state = {}
    for key, value in model.state_dict().items():
        if key == "pos_embed":
            state[key] = value.clone()
            continue
        rng = np.random.Generator(np.random.PCG64(zlib.crc32(key.encode("utf-8"))))
        weight = rng.standard_normal(tuple(value.shape))
        weight = weight / math.sqrt(np.prod(value.shape[1:])) if weight.ndim >= 2 else weight * 0.02
        state[key] = torch.from_numpy(weight).float()
    return state


def pytest_collection_modifyitems(config, items):
    has_cuda = torch.cuda.is_available()
    network = os.environ.get("FASTDIT_NETWORK_TESTS") == "1"
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA device"))
        if "network" in item.keywords and not network:
            item.add_marker(pytest.mark.skip(reason="needs the network (set FASTDIT_NETWORK_TESTS=1)"))


def tiny_vae_config() -> dict:
    """A tiny AutoencoderKL config (8x downsampling, 4 latent channels) : a VAE to test with, offline."""
    return {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ["DownEncoderBlock2D"] * 4,
        "up_block_types": ["UpDecoderBlock2D"] * 4,
        "block_out_channels": [8, 8, 8, 8],
        "layers_per_block": 1,
        "latent_channels": 4,
        "norm_num_groups": 4,
        "sample_size": 32,
    }


def save_tiny_vae(folder, seed):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    AutoencoderKL(**tiny_vae_config()).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="session")
def tiny_vae(tmp_path_factory):
    return save_tiny_vae(tmp_path_factory.mktemp("vae"), seed=0)


def make_image_folder(root, classes=("cat", "dog", "eel"), per_class=4):
    rng = np.random.default_rng(0)
    for name in classes:
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            height, width = rng.integers(IMAGE_SIZE, 3 * IMAGE_SIZE, size=2)
            Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(root / name / f"{i}.png")
    return root


class _FileServer(http.server.ThreadingHTTPServer):
    files: dict[str, bytes]
    requests: list[str]


class _FileHandler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 - the http.server API
        self.server.requests.append(self.path)
        body = self.server.files.get(self.path)
        if body is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def file_server():
    """An HTTP server on 127.0.0.1 serving `file_server.files` ({path: bytes}; others are 404) and
    recording `file_server.requests`: the stand-in for the hosts weights are downloaded from."""
    httpd = _FileServer(("127.0.0.1", 0), _FileHandler)
    httpd.files, httpd.requests = {}, []
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()
