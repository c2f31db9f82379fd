"""`fastdit app` in a real browser: headless Chromium (Debian's package; nothing is downloaded) drives
the page served by a `fastdit app` process on a free local port.

The screenshots are test artifacts, written to $FASTDIT_TEST_ARTIFACTS (default: the test's tmp dir).
"""

import os
import shutil
import subprocess
import sys
import time
from io import BytesIO
from pathlib import Path

import pytest
from PIL import Image

from test_app import tiny_digits_run

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install 'fastdit[app]')")
pytest.importorskip("gradio", reason="gradio is not installed (pip install 'fastdit[app]')")

pytestmark = pytest.mark.slow


def chromium_executable() -> str | None:
    # Debian's /usr/bin/chromium is a wrapper script; the browser itself is under /usr/lib/chromium.
    for candidate in ("/usr/lib/chromium/chromium", shutil.which("chromium"), shutil.which("chromium-browser")):
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return candidate
    return None


@pytest.fixture
def app_url(tmp_path):
    tiny_digits_run(tmp_path / "demo")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(Path.cwd()), os.environ.get("PYTHONPATH")])),
           "GRADIO_ANALYTICS_ENABLED": "False"}
    server = subprocess.Popen([sys.executable, "-m", "fastdit", "app", "--demo-out", str(tmp_path / "demo"), "--device", "cpu"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=tmp_path)
    try:
        deadline, url = time.monotonic() + 120, None
        while url is None and time.monotonic() < deadline:
            line = server.stdout.readline()
            if not line and server.poll() is not None:
                break
            if "serving on" in line:
                url = line.split("serving on ", 1)[1].split()[0]
        assert url, f"fastdit app did not start (exit {server.poll()})"
        yield url
    finally:
        server.terminate()
        server.wait(timeout=30)


def choose_only_class(page, label):
    """Clear the classes field (the digits page starts with all ten), then choose one class."""
    if page.locator("#classes .remove-all").count():
        page.locator("#classes .remove-all").click()
    page.locator("#classes input").click()
    page.get_by_role("option", name=label, exact=True).click()
    page.keyboard.press("Escape")


def test_generate_digits_and_show_errors_in_the_page(app_url, tmp_path):
    executable = chromium_executable()
    if executable is None:
        pytest.skip("no Chromium found (Debian: apt-get install chromium); the browser test needs one")
    artifacts = Path(os.environ.get("FASTDIT_TEST_ARTIFACTS") or tmp_path)
    artifacts.mkdir(parents=True, exist_ok=True)
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, headless=True)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto(app_url)
        status = page.locator("#status")
        sync_api.expect(status).to_contain_text("Model:", timeout=60_000)  # the digits demo was found and read
        assert page.locator("#classes .token").count() == 10  # the digits page opens with every digit chosen
        choose_only_class(page, "7")
        page.locator("#steps input").fill("4")
        page.locator("#per-class input").fill("3")
        page.locator("#generate").click()
        sync_api.expect(status).to_contain_text("Done: 3 images", timeout=120_000)
        page.screenshot(path=str(artifacts / "app-digits.png"), full_page=True)
        print(f"screenshot: {artifacts / 'app-digits.png'}")

        src = page.locator("#grid img").get_attribute("src")
        png = page.request.get(src if src.startswith("http") else app_url.rstrip("/") + "/" + src.lstrip("/")).body()
        assert png[:8] == b"\x89PNG\r\n\x1a\n"
        assert Image.open(BytesIO(png)).size == (2 + 3 * (8 + 2), 2 + 8 + 2)  # one class: a row of three 8x8 digits
        assert "--class-labels 7 7 7" in page.locator("#command textarea").input_value()

        # A bad value: a message in the page, and the server still serves the next request.
        page.locator("#interval textarea").fill("abc")
        page.locator("#generate").click()
        sync_api.expect(status).to_contain_text("Error: guidance interval 'abc' should be two numbers", timeout=60_000)
        page.screenshot(path=str(artifacts / "app-error.png"), full_page=True)
        page.locator("#interval textarea").fill("")

        # Gradio-side values (an emptied number field, zero images, a negative seed): the same status
        # line, in the page's words, with the last picture and command still there and no "Done".
        command = page.locator("#command textarea").input_value()
        for field, value, message, good in [("#per-class", "", "the Images per class field is empty", "3"),
                                            ("#per-class", "0", "the Images per class field should be a whole number >= 1", "3"),
                                            ("#seed", "-1", "the Seed field should be a whole number", "0")]:
            page.locator(f"{field} input").fill(value)
            page.locator("#generate").click()
            sync_api.expect(status).to_contain_text(message, timeout=60_000)
            assert "Done" not in status.inner_text() and "unexpected" not in status.inner_text()
            assert page.locator("#grid img").get_attribute("src") == src
            assert page.locator("#command textarea").input_value() == command
            page.locator(f"{field} input").fill(good)

        # Stop: a long request (64 images x 250 steps, about ten seconds here) streams previews, stops
        # from the page, and the last finished picture comes back.
        page.locator("#per-class input").fill("64")
        page.locator("#steps input").fill("250")
        page.locator("#generate").click()
        sync_api.expect(status).to_contain_text("Sampling:", timeout=60_000)
        preview_src = page.locator("#grid img").get_attribute("src")
        page.screenshot(path=str(artifacts / "app-preview.png"), full_page=True)
        page.locator("#stop").click()
        sync_api.expect(status).to_contain_text("Stopped.", timeout=30_000)
        assert preview_src != src
        restored = page.locator("#grid img").get_attribute("src")
        restored_png = page.request.get(restored if restored.startswith("http") else app_url.rstrip("/") + "/" + restored.lstrip("/")).body()
        assert Image.open(BytesIO(restored_png)).size == (2 + 3 * (8 + 2), 2 + 8 + 2)  # the three 7s again
        page.locator("#per-class input").fill("3")
        page.locator("#steps input").fill("4")

        # Two users at once: the queue serves both, each page gets its own picture and command.
        other = browser.new_context().new_page()
        other.goto(app_url)
        sync_api.expect(other.locator("#status")).to_contain_text("Model:", timeout=60_000)
        choose_only_class(other, "3")
        other.locator("#steps input").fill("4")
        page.locator("#generate").click()
        other.locator("#generate").click()
        sync_api.expect(status).to_contain_text("Done: 3 images", timeout=120_000)
        sync_api.expect(other.locator("#status")).to_contain_text("Done: 1 image.", timeout=120_000)
        assert "--class-labels 7 7 7 " in page.locator("#command textarea").input_value()
        assert "--class-labels 3 " in other.locator("#command textarea").input_value()

        # A pasted checkpoint path is taken when the field loses focus, without Enter.
        ckpt = next((tmp_path / "demo").rglob("*-ema.safetensors"))
        page.locator("#model input").click()
        page.get_by_role("option", name="local checkpoint").click()
        page.locator("#path textarea").fill(str(ckpt))
        page.locator("#cfg input").click()  # focus elsewhere
        sync_api.expect(status).to_contain_text(f"Model: {ckpt}", timeout=60_000)

        # The largest seed `fastdit sample --seed` takes, 2^64 - 1 (beyond the integers a float holds):
        # the page samples with it, and its command says it.
        choose_only_class(page, "7")
        page.locator("#steps input").fill("4")
        page.locator("#seed input").fill(str(2**64 - 1))
        page.locator("#generate").click()
        sync_api.expect(status).to_contain_text("Done: 3 images", timeout=120_000)
        assert f"--seed {2**64 - 1} " in page.locator("#command textarea").input_value()
        browser.close()


def test_preset_fills_the_fields_in_the_page(tmp_path):
    """`fastdit app --preset dit-xl2-256`: the page opens on the official DiT-XL/2 256 (described without
    loading it, so nothing is downloaded) with DiT's sample_ddp.py values in its fields."""
    from test_app import start_app

    executable = chromium_executable()
    if executable is None:
        pytest.skip("no Chromium found (Debian: apt-get install chromium); the browser test needs one")
    server, port = start_app(tmp_path, "--preset", "dit-xl2-256")
    try:
        assert port, f"fastdit app did not start (exit {server.poll()})"
        with sync_api.sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=executable, headless=True)
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(f"http://127.0.0.1:{port}")
            status = page.locator("#status")
            sync_api.expect(status).to_contain_text("settings from preset dit-xl2-256", timeout=60_000)
            assert "Model: DiT-XL/2" in status.inner_text()
            assert "DiT-XL/2 256px" in page.locator("#model input").input_value()
            assert "preset dit-xl2-256" in page.locator("#intro").inner_text()
            assert page.locator("#sampler input").input_value() == "ddpm"
            assert page.locator("#steps input").input_value() == "250"
            assert page.locator("#cfg input").input_value() == "1.5"
            assert page.locator("#time-shift input").input_value() == "1"
            assert page.locator("#official-guidance input").is_checked()
            browser.close()
    finally:
        server.terminate()
        server.wait(timeout=30)
