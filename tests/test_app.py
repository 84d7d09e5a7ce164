"""The web app as visitors and API clients meet it: `python app.py` on a free port, driven in
headless Chromium (Debian's /usr/bin/chromium through playwright) and through gradio_client.

Uses the embedded model when it is installed (as CI does), else the tiny random pipeline.
Leaves a screenshot in artifacts/app.png.
"""

import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from PIL import Image
from tiny_pipeline import build_tiny_pipeline

from dalle_mini.hub import embedded_folder

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--no-first-run",
    "--disable-default-apps",
    "--metrics-recording-only",
    "--mute-audio",
]
PROMPT = "a red circle on a blue background"
START_TIMEOUT_S = 300


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def app_model(tmp_path_factory) -> str:
    if (embedded_folder("dallebart") / "flax_model.msgpack").is_file():
        return "embedded"
    return str(build_tiny_pipeline(tmp_path_factory.mktemp("tiny")))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`python app.py` in a subprocess; yields (url, model, log path) once it answers."""
    model, port = app_model(tmp_path_factory), free_port()
    logs = tmp_path_factory.mktemp("app")
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "GRADIO_ANALYTICS_ENABLED": "False",
        "GRADIO_TEMP_DIR": str(logs / "gradio"),
    }
    env.pop("SPACE_ID", None)
    command = [sys.executable, "app.py", "--model", model, "--port", str(port)]
    with open(logs / "app.log", "w") as log:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=log)
        try:
            url = wait_until_serving(process, port, logs / "app.log")
            yield url, model, logs / "app.log"
        finally:
            process.terminate()
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()


def wait_until_serving(process: subprocess.Popen, port: int, log: Path) -> str:
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + START_TIMEOUT_S
    while process.poll() is None:
        try:
            urllib.request.urlopen(url, timeout=2).close()
            return url
        except OSError:
            if time.monotonic() > deadline:
                pytest.fail(f"app.py did not answer in {START_TIMEOUT_S} s:\n{read(log)}")
            time.sleep(1)
    pytest.fail(f"app.py exited with status {process.returncode}:\n{read(log)}")


def read(path: Path) -> str:
    return path.read_text()[-4000:]


def test_a_visitor_generates_nine_ranked_images(server, tmp_path):
    from playwright.sync_api import sync_playwright

    url, model, _ = server
    screenshot = ROOT / "artifacts" / "app.png"
    screenshot.unlink(missing_ok=True)  # a failed run must not leave an old one looking current
    screenshot.parent.mkdir(exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1100})
            page.goto(url)
            page.wait_for_selector("#prompt textarea")
            assert f"Model: {model}:" in page.inner_text("body")  # the model is named
            assert "Limits and biases" in page.inner_text("body")
            page.fill("#prompt textarea", PROMPT)
            for slider, value in [
                ("temperature", "0.8"),
                ("top-k", "40"),
                ("top-p", "0.95"),
                ("condition-scale", "8"),
                ("candidates", "24"),
            ]:
                page.locator(f"#{slider} input[type=range]").fill(value)
            page.fill("#seed input", "11")
            # the gallery may render after the prompt box on a slow machine
            page.wait_for_selector("#gallery", state="attached", timeout=60_000)
            page.evaluate(WATCH_CAPTIONS)
            page.click("#generate")
            page.wait_for_function(NINE_SCORED, timeout=120_000)
            captions = page.locator("#gallery .caption-label").all_inner_texts()
            assert captions[0].startswith("#1 · CLIP ") and captions[8].startswith("#9 · CLIP ")
            scores = [float(c.rsplit(" ", 1)[1]) for c in captions]
            assert scores == sorted(scores, reverse=True)
            assert page.evaluate("window.seenCaptions").count("sampling") >= 1  # previews came
            with page.expect_download() as download_info:
                page.click("#download-grid")
            grid_path = tmp_path / "grid.png"
            download_info.value.save_as(grid_path)
            side = Image.open(grid_path).size[0] // 3
            assert Image.open(grid_path).size == (3 * side, 3 * side) and side >= 32
            page.locator("#gallery button.thumbnail-item").nth(4).click()
            page.wait_for_function("document.querySelector('#settings').innerText.includes('seed')")
            shown = page.inner_text("#settings")
            for text in ("image_index", "11", "0.8", "40", "0.95", PROMPT):
                assert text in shown  # the knobs the visitor set, for image 5
            page.keyboard.press("Escape")
            page.screenshot(path=str(screenshot), full_page=True)
        finally:
            browser.close()


def test_a_visitor_sees_a_clear_message_for_a_blank_prompt(server):
    from playwright.sync_api import sync_playwright

    url, _, log = server
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1100})
            page.goto(url)
            page.wait_for_selector("#prompt textarea")
            page.fill("#prompt textarea", "   \n  ")
            page.click("#generate")
            page.wait_for_function(
                "document.body.innerText.includes('the prompt is empty')", timeout=30_000
            )
            assert "Traceback" not in page.inner_text("body")
        finally:
            browser.close()
    assert "Traceback" not in read(log)


# Records every caption the gallery shows, so the test can tell previews appeared.
WATCH_CAPTIONS = """() => {
  window.seenCaptions = [];
  const gallery = document.querySelector('#gallery');
  new MutationObserver(() => {
    for (const label of gallery.querySelectorAll('.caption-label'))
      window.seenCaptions.push(label.textContent.split(' ')[0]);
  }).observe(gallery, {subtree: true, childList: true, characterData: true});
}"""
NINE_SCORED = """() => {
  const labels = [...document.querySelectorAll('#gallery .caption-label')];
  return labels.length === 9 && labels.every(label => label.textContent.includes('CLIP'));
}"""


def test_the_api_answers_and_explains_bad_values(server):
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    url, _, log = server
    client = Client(url, verbose=False)
    gallery, status, _, files = client.predict(
        PROMPT, 1.0, 50, 1.0, 10.0, 24, 5, api_name="/generate"
    )
    assert len(gallery) == 9 and all("CLIP" in item["caption"] for item in gallery)
    assert "9 best of 24 candidates, seed 5" in status
    (result_json,) = [f for f in files if f.endswith("result.json")]
    result = json.loads(Path(result_json).read_text())
    assert [image["settings"]["seed"] for image in result["images"]] == [5] * 9
    assert sorted(Path(f).name for f in files)[:2] == ["grid.png", "image_01.png"]
    bad_values = [
        (("", 1.0, 50, 1.0, 10.0, 24, 5), "the prompt is empty"),
        ((PROMPT, -1.0, 50, 1.0, 10.0, 24, 5), "temperature=-1.0 is out of range"),
        ((PROMPT, 1.0, 50, 7.0, 10.0, 24, 5), "top_p=7.0 is out of range"),
        ((PROMPT, 1.0, 50, 1.0, 10.0, 5000, 5), "num_candidates=5000 is out of range"),
        ((PROMPT, "hot", 50, 1.0, 10.0, 24, 5), "temperature must be a number"),
        ((PROMPT, 1.0, 50, 1.0, 10.0, 24, -3), "seed=-3 is out of range"),
    ]
    for inputs, message in bad_values:
        with pytest.raises(AppError, match=message) as error:
            client.predict(*inputs, api_name="/generate")
        assert "Traceback" not in str(error.value)
    # Still serving after the bad requests.
    gallery, *_ = client.predict("a purple star", 1.0, 0, 0.9, 10.0, 20, 1, api_name="/generate")
    assert len(gallery) == 9


def test_concurrent_requests_share_batches_and_keep_their_pixels(server):
    """Several people at once: their requests are sampled together, and each gets exactly the
    images the same request gets alone."""
    from concurrent.futures import ThreadPoolExecutor

    from gradio_client import Client

    url, _, log = server
    mine = (PROMPT, 0.9, 50, 1.0, 10.0, 16, 21)
    others = [("a purple star", 1.2, 0, 0.9, 4.0, 12, s) for s in range(3)]

    def call(inputs):
        return Client(url, verbose=False).predict(*inputs, api_name="/generate")

    alone = call(mine)
    with ThreadPoolExecutor(4) as pool:
        crowd = list(pool.map(call, [*others, mine]))
    assert all(len(gallery) == 9 for gallery, *_ in crowd)
    seeds = [inputs[-1] for inputs in [*others, mine]]
    for (_, status, *_), seed in zip(crowd, seeds, strict=True):
        assert f"seed {seed}." in status  # each answer went to the one who asked
    for (image, _), (again, _) in zip(images_of(alone), images_of(crowd[-1]), strict=True):
        assert (image == again).all()
    batch_sizes = [int(n) for n in re.findall(r"sampling (\d+) request", log.read_text())]
    assert max(batch_sizes) >= 2  # at least two of them shared a sampler batch


def images_of(prediction):
    import numpy as np

    gallery, *_ = prediction
    return [(np.asarray(Image.open(item["image"])), item["caption"]) for item in gallery]


def test_only_result_files_are_served(server, tmp_path_factory):
    url, model, _ = server
    folder = embedded_folder("dallebart") if model == "embedded" else Path(model) / "dallebart"
    for path in ("/etc/passwd", str(folder / "config.json"), str(ROOT / "app.py")):
        with pytest.raises(urllib.error.HTTPError) as error:
            urllib.request.urlopen(f"{url}gradio_api/file={path}", timeout=5)
        assert error.value.code in (403, 404)


def test_listens_on_loopback_only(server):
    url, _, log = server
    assert "Running on local URL:  http://127.0.0.1:" in read(log)
