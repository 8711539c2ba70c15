"""The web UI in a real browser: Debian's headless Chromium driven by Playwright against a local server."""

from __future__ import annotations

import os
import shutil
import socket
import threading
import time
from pathlib import Path

import gradio as gr
import pytest
import uvicorn
from fastapi import FastAPI
from playwright import sync_api

from pipelines.tiny import tiny_pipeline
from ui import LoraLibrary, build_app

CHROMIUM = Path("/usr/bin/chromium")
# The README's screenshot is refreshed only on request, so a test run leaves the checkout as it was.
SCREENSHOT = os.environ.get("LORACOMPOSE_UI_SCREENSHOT")  # e.g. docs/images/ui.png

pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(), reason="needs Debian's headless Chromium at /usr/bin/chromium (apt-get install chromium)"
)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def server(loras, tmp_path_factory):
    folder = tmp_path_factory.mktemp("ui-library")
    for name in ("cat", "dog"):
        shutil.copy(loras[name], folder / f"{name}.safetensors")
    pipe = tiny_pipeline()
    pipe.set_progress_bar_config(disable=True)
    library = LoraLibrary([folder], tmp_path_factory.mktemp("ui-uploads"), pipe=pipe)
    app = build_app(pipe, library, "tiny", output_dir=tmp_path_factory.mktemp("ui-out"))
    # Served with uvicorn directly: gr.launch gives up when its own 3 s reachability probe is slow.
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(gr.mount_gradio_app(FastAPI(), app, path=""), "127.0.0.1", port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.1)
    assert server.started, "the UI server did not start within 60 s"
    yield f"http://127.0.0.1:{port}/"
    server.should_exit = True
    thread.join(timeout=10)


@pytest.fixture(scope="module")
def page(server):
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM),
            args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"],
        )
        page = browser.new_page(viewport={"width": 1400, "height": 1300})
        page.goto(server)
        yield page
        browser.close()


def choose(page, name: str) -> None:
    page.locator("#lora-select input").click()
    page.get_by_role("option", name=name, exact=True).click()


def set_number(page, selector: str, value: str) -> None:
    field = page.locator(f"{selector} input[type=number]")
    field.fill(value)
    field.press("Enter")


def test_two_loras_generate_an_image_and_a_missing_trigger_is_reported(page, tmp_path):
    sync_api.expect.set_options(timeout=30_000)  # every event is a round trip to a server on a busy machine
    start = time.perf_counter()
    choose(page, "cat")
    choose(page, "dog")
    page.locator("#lora-select input").press("Escape")
    sync_api.expect(page.locator("#prompt textarea")).to_have_value("a sks cat and a zwx dog")
    set_number(page, "#weight-0", "0.8")
    set_number(page, "#weight-1", "0.6")
    set_number(page, "#steps", "3")
    page.locator("#region-0 input").check()
    page.locator("#region-1 input").check()
    page.get_by_role("tab", name="Use it in Python").click()
    sync_api.expect(page.locator("#code")).to_contain_text("region=(0.0, 0.5, 1.0, 1.0)")  # the code follows the form
    sync_api.expect(page.locator("#code")).to_contain_text("weight=0.6")
    page.get_by_role("tab", name="Image").click()

    page.locator("#generate").click()
    sync_api.expect(page.locator("#output img").first).to_be_visible(timeout=60_000)
    sync_api.expect(page.locator("#status")).to_contain_text("3 steps")
    page.screenshot(path=SCREENSHOT or str(tmp_path / "ui.png"), full_page=True)
    print(f"first image {time.perf_counter() - start:.1f} s after the page opened")

    page.locator("#prompt textarea").fill("a sks cat and a dog")
    page.locator("#generate").click()
    sync_api.expect(page.get_by_text("needs its trigger word 'zwx' in the prompt").first).to_be_visible(timeout=20_000)
