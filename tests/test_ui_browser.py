"""The web UI in a real browser: Debian's headless Chromium driven by Playwright against a local server.

On the tiny random model with random LoRAs that carry the toy model's trigger and concept words. With
LORACOMPOSE_UI_SCREENSHOT set, on the built-in toy model and its LoRAs instead, so the README's
screenshot shows two LoRAs composed rather than noise.
"""

from __future__ import annotations

import os
import shutil
import socket
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import gradio as gr
import pytest
import uvicorn
from fastapi import FastAPI
from playwright import sync_api

from pipelines.loading import load_pipeline
from pipelines.tiny import tiny_pipeline, write_random_lora
from ui import LoraLibrary
from ui.app import CSS, ComposeApp

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


def served_model(tmp_path_factory):
    """(pipeline, model name, LoRA folder): the toy model for the screenshot, else the tiny random one."""
    if SCREENSHOT:
        import toyworld

        return load_pipeline(str(toyworld.default_model_path())), "toyworld", toyworld.default_lora_path()
    pipe = tiny_pipeline()
    folder = tmp_path_factory.mktemp("ui-library")
    for seed, (trigger, concept) in enumerate([("sks", "square"), ("zwx", "circle"), ("qpl", "style")], start=1):
        write_random_lora(pipe, folder / f"{trigger}.safetensors", seed, trigger=trigger, concept=concept)
    return pipe, "tiny", folder


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    pipe, model, folder = served_model(tmp_path_factory)
    pipe.set_progress_bar_config(disable=True)
    library = LoraLibrary([folder], tmp_path_factory.mktemp("ui-uploads"), pipe=pipe)
    output_dir, preview_dir = tmp_path_factory.mktemp("ui-out"), tmp_path_factory.mktemp("ui-previews")
    app = ComposeApp(pipe, library, model, output_dir=output_dir, preview_dir=preview_dir)
    app.previews.join()  # the library shows its previews from the first page on
    # Served with uvicorn directly: gr.launch gives up when its own 3 s reachability probe is slow.
    port = free_port()
    fastapi = gr.mount_gradio_app(FastAPI(), app.blocks, path="", css=CSS)
    server = uvicorn.Server(uvicorn.Config(fastapi, "127.0.0.1", port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.1)
    assert server.started, "the UI server did not start within 60 s"
    yield SimpleNamespace(url=f"http://127.0.0.1:{port}/", library=library)
    server.should_exit = True
    thread.join(timeout=10)


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM),
            args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"],
        )
        sync_api.expect.set_options(timeout=30_000)  # every event is a round trip to a server on a busy machine
        yield browser
        browser.close()


@pytest.fixture()
def page(browser, server):
    page = browser.new_page(viewport={"width": 1400, "height": 1300})
    page.goto(server.url)
    yield page
    page.close()


def choose(page, name: str) -> None:
    page.locator("#lora-select input").click()
    page.get_by_role("option", name=name, exact=True).click()


def set_number(page, selector: str, value: str) -> None:
    field = page.locator(f"{selector} input[type=number]")
    field.fill(value)
    field.press("Enter")


def test_two_loras_generate_an_image_and_a_missing_trigger_is_reported(page):
    start = time.perf_counter()
    choose(page, "sks")
    choose(page, "zwx")
    page.locator("#lora-select input").press("Escape")
    sync_api.expect(page.locator("#prompt textarea")).to_have_value("a sks square and a zwx circle")
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
    print(f"first image {time.perf_counter() - start:.1f} s after the page opened")

    page.locator("#prompt textarea").fill("a sks square and a circle")
    page.locator("#generate").click()
    sync_api.expect(page.get_by_text("needs its trigger word 'zwx' in the prompt").first).to_be_visible(timeout=20_000)


def test_an_example_fills_the_form_and_small_images_stay_sharp(page, tmp_path):
    sync_api.expect(page.locator("#example-1")).to_be_visible()  # the style example: qpl is in the library
    page.locator("#example-0").click()
    prompt = "a sks square on the left and a zwx circle on the right"
    sync_api.expect(page.locator("#prompt textarea")).to_have_value(prompt)
    sync_api.expect(page.locator("#method input[value=regional]")).to_be_checked()
    sync_api.expect(page.locator("#region-1 input")).to_be_checked()
    page.get_by_role("tab", name="Use it in Python").click()
    sync_api.expect(page.locator("#code")).to_contain_text("region=(0.2, 0.55, 0.8, 0.95)")
    sync_api.expect(page.locator("#code")).to_contain_text("method='regional'")
    page.get_by_role("tab", name="Image").click()

    page.locator("#generate").click()
    sync_api.expect(page.locator("#output img").first).to_be_visible(timeout=120_000)
    sync_api.expect(page.locator("#status")).to_contain_text("regional")
    for images in ("#output img", "#library img", "#regions img"):
        rendering = page.locator(images).first.evaluate("image => getComputedStyle(image).imageRendering")
        assert rendering == "pixelated", images
    page.screenshot(path=SCREENSHOT or str(tmp_path / "ui.png"), full_page=True)


def test_an_upload_appears_on_every_page(page, browser, server, tmp_path):
    """Another visitor's page, opened after the upload, offers it without a rescan."""
    upload = tmp_path / "my style.safetensors"
    shutil.copy(server.library.folders[0] / "sks.safetensors", upload)  # a LoRA that fits the served model
    with page.expect_file_chooser() as chooser:
        page.locator("#upload").click()
    chooser.value.set_files(str(upload))
    sync_api.expect(page.get_by_text("added LoRA 'my_style'").first).to_be_visible()
    other = browser.new_page()
    other.goto(server.url)
    other.locator("#lora-select input").click()
    sync_api.expect(other.get_by_role("option", name="my_style", exact=True)).to_be_visible()
    other.close()
