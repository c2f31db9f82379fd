"""The download path, against a real HTTP server on 127.0.0.1."""

import http.server
import threading
from pathlib import Path

import pytest

from fastdit import checkpoint, hub
from fastdit.errors import DownloadError

PAYLOAD = bytes(range(256)) * 4096  # 1 MiB


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 - the http.server API
        if self.path.endswith("/broken.bin"):
            # Announce the whole file, send half of it, then drop the connection.
            self.send_response(200)
            self.send_header("Content-Length", str(len(PAYLOAD)))
            self.end_headers()
            self.wfile.write(PAYLOAD[: len(PAYLOAD) // 2])
            self.wfile.flush()
            self.connection.close()
            return
        if self.path.endswith("/missing.bin"):
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(PAYLOAD)))
        self.end_headers()
        self.wfile.write(PAYLOAD)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_cache_dir_follows_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTDIT_CACHE", str(tmp_path / "c"))
    assert hub.cache_dir() == tmp_path / "c"
    monkeypatch.delenv("FASTDIT_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert hub.cache_dir() == tmp_path / "xdg" / "fastdit"


def test_download_then_cached(server, capsys):
    path = hub.download(f"{server}/files/weights.bin", "weights.bin", subdir="dit")
    assert path == hub.cache_dir() / "dit" / "weights.bin"
    assert path.read_bytes() == PAYLOAD
    assert not list(path.parent.glob("*.part"))
    assert "downloading weights.bin" in capsys.readouterr().err
    # Cached: a second call does not need the server at all.
    again = hub.download("http://127.0.0.1:9/unreachable", "weights.bin", subdir="dit")
    assert again == path


def test_interrupted_download_leaves_nothing(server):
    with pytest.raises(DownloadError, match="broken.bin") as info:
        hub.download(f"{server}/broken.bin", "broken.bin", progress=False)
    assert str(hub.cache_dir() / "broken.bin") in str(info.value)
    assert not (hub.cache_dir() / "broken.bin").exists()
    assert not list(hub.cache_dir().glob("*.part"))


def test_http_error_and_offline_messages(server):
    with pytest.raises(DownloadError, match="missing.bin.*Not Found|404"):
        hub.download(f"{server}/missing.bin", "missing.bin", progress=False)
    with pytest.raises(DownloadError) as info:
        hub.download("http://127.0.0.1:9/DiT-XL-2-256x256.pt", "DiT-XL-2-256x256.pt", hint="pass --ckpt PATH")
    message = str(info.value)
    assert "could not download DiT-XL-2-256x256.pt" in message
    assert "put it at" in message and "--ckpt PATH" in message


def test_official_name_resolves_through_the_download(server, monkeypatch):
    monkeypatch.setattr(hub, "OFFICIAL_DIT_URL", server + "/DiT/models/{name}")
    path = checkpoint.resolve_official("DiT-XL-2-256x256.pt")
    assert path == hub.cache_dir() / "dit" / "DiT-XL-2-256x256.pt"
    assert Path(path).read_bytes() == PAYLOAD
    assert checkpoint.resolve_official("my-model.pt") is None


def test_every_official_checkpoint_name_is_the_one_its_model_and_size_give():
    # `official_dit_name` is how `sample --model DiT-XL/2 --image-size 256` finds the release file.
    for filename, (model, image_size) in hub.OFFICIAL_CHECKPOINTS.items():
        assert hub.official_dit_name(model, image_size) == filename
