"""The web page at ``/`` in a real browser (Debian's headless Chromium driven by Playwright): submit a
prompt, watch the progress bar move and the step previews change, see the image appear in the gallery
with its settings, paint a brush layer over it in the editor; leave a screenshot (in the test's tmp
folder, and at $VELODIFF_SCREENSHOT if set).

Skipped when Chromium or Playwright is missing, unless $VELODIFF_REQUIRE_BROWSER is set (CI sets it:
.ci/run installs chromium)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from serve_fixtures import httpx, running_server

FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-dev-shm-usage",
]


def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        path = None
    if path is None:
        why = "needs Debian's chromium (apt-get install chromium) and playwright (velodiff[serve])"
        if os.environ.get("VELODIFF_REQUIRE_BROWSER"):
            pytest.fail(f"browser test required but unavailable: {why}")
        pytest.skip(why)
    return path


def test_page_submits_shows_progress_and_the_image(tmp_path):
    exe = chromium()
    from playwright.sync_api import sync_playwright

    reports = Path(__file__).resolve().parents[1] / "bench" / "serve"  # the page lists bench reports
    with running_server(tmp_path, max_batch=1, reports=reports) as (url, _), sync_playwright() as p:
        browser = p.chromium.launch(executable_path=exe, headless=True, args=FLAGS)
        try:
            page = browser.new_page(viewport={"width": 900, "height": 700})
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            requests: list[str] = []
            page.on("request", lambda r: requests.append(r.url))
            page.goto(url + "/")
            page.wait_for_function("document.getElementById('model').options.length > 0")
            assert page.input_value("#model") == "default"
            page.fill("#prompt", "a red circle above a blue square")
            page.fill("#steps", "60")
            page.fill("#seed", "11")
            # record every value the progress bar and the preview take
            page.evaluate("""() => {
                window.seen = []; window.previews = new Set();
                const bar = document.getElementById('progress'), img = document.getElementById('preview');
                new MutationObserver(() => window.seen.push(Number(bar.value)))
                    .observe(bar, {attributes: true});
                new MutationObserver(() => window.previews.add(img.src)).observe(img, {attributes: true});
            }""")
            page.click("#generate")
            page.wait_for_selector("#gallery figure.result img", timeout=120_000)
            page.wait_for_function(
                "document.querySelector('#gallery figure.result img').naturalWidth === 64", timeout=30_000
            )
            seen = page.evaluate("window.seen")
            moved = [v for v in seen if 0 < v < 60]
            assert len(set(moved)) >= 3, seen  # the bar moved through intermediate steps
            assert seen == sorted(seen) and seen[-1] == 60
            assert page.evaluate("window.previews.size") >= 3  # step previews changed
            caption = page.inner_text("#gallery figure.result figcaption")
            assert "seed 11" in caption and "60 steps" in caption and "dpmpp_2m" in caption
            assert page.inner_text("#progress-text") == "done"
            # the settings inside that image, loaded back into the form (what A1111's PNG Info does)
            src = page.get_attribute("#gallery figure.result img", "src")
            made = httpx.get(src if src.startswith("http") else url + src).content
            page.fill("#prompt", "something else")
            page.fill("#seed", "3")
            page.fill("#steps", "5")
            page.set_input_files("#load", files=[{"name": "made.png", "mimeType": "image/png",
                                                  "buffer": made}])
            page.wait_for_function("document.getElementById('load-info').textContent.includes('loaded')")
            assert page.input_value("#prompt") == "a red circle above a blue square"
            assert (page.input_value("#seed"), page.input_value("#steps")) == ("11", "60")
            assert page.input_value("#solver") == "dpmpp_2m" and page.input_value("#grid") == "karras"
            page.fill("#seed", "4")  # a gallery image's own button does the same
            page.click("#gallery figure.result button.reuse")
            page.wait_for_function("document.getElementById('seed').value === '11'")
            assert page.locator("#reports li").count() >= 3  # bench/serve's README, JSON, screenshot
            # the brush editor: paint a stroke over the new image, apply it as a layer
            page.click("#gallery figure.result button.brush-open")
            page.wait_for_selector("#brush-section:not([hidden])")
            page.wait_for_function(
                "document.getElementById('brush-info').textContent.startsWith('ready')", timeout=120_000
            )
            page.wait_for_function("document.getElementById('brush-canvas').toDataURL().length > 2000")
            canvas_png = "document.getElementById('brush-canvas').toDataURL()"
            before = page.evaluate(canvas_png)
            box = page.locator("#brush-canvas").bounding_box()
            page.mouse.move(box["x"] + 20, box["y"] + 20)
            page.mouse.down()
            page.mouse.move(box["x"] + 110, box["y"] + 230, steps=12)
            page.mouse.up()
            assert page.evaluate(canvas_png) != before  # the stroke shows
            page.fill("#brush-prompt", "a blue square")
            page.click("#brush-apply")
            page.wait_for_function(
                "document.getElementById('brush-info').textContent.includes('network calls')", timeout=120_000
            )
            info = page.inner_text("#brush-info")
            assert int(info.split()[0]) < 60 and "(a generation: 60)" in info, info  # a fraction of the steps
            assert page.locator("#brush-layers li").count() == 1
            page.wait_for_function(f"{canvas_png} !== {before!r}")
            # a layout by collage: the count from the prompt, no brush on its image
            page.fill("#prompt", "two red circles")
            page.fill("#steps", "8")
            page.select_option("#layout_mode", "collage")
            page.click("#generate")
            page.wait_for_function("document.querySelectorAll('#gallery figure.result').length === 2",
                                   timeout=120_000)
            newest = page.locator("#gallery figure.result").first
            assert "layout collage" in newest.locator("figcaption").inner_text()
            assert newest.locator("button.brush-open").count() == 0
            assert not errors
            assert all(r.startswith(url) or r.startswith("data:") for r in requests)  # no CDN
            shot = tmp_path / "page.png"
            page.screenshot(path=str(shot), full_page=True)
            assert shot.stat().st_size > 1000
            if os.environ.get("VELODIFF_SCREENSHOT"):
                shutil.copy(shot, Path(os.environ["VELODIFF_SCREENSHOT"]))
        finally:
            browser.close()


def test_loading_an_a1111_image_keeps_the_forms_model_and_sets_one_image(tmp_path):
    """The page's loader on another tool's image: a model this server does not serve leaves the model as
    it was, A1111's sampler label becomes a choice, n goes back to 1 (no Batch size); an image without
    settings says so."""
    import io

    from PIL import Image

    from velodiff.infotext import format_infotext, save_options

    exe = chromium()
    from playwright.sync_api import sync_playwright

    text = format_infotext("a lighthouse", None, {"Steps": 7, "Sampler": "DPM++ 2M Karras", "CFG scale": 6,
                                                  "Seed": 5, "Size": "64x64", "Model": "v1-5-pruned"})
    a1111, plain = io.BytesIO(), io.BytesIO()
    Image.new("RGB", (8, 8)).save(a1111, format="PNG", **save_options("PNG", text))
    Image.new("RGB", (8, 8)).save(plain, format="PNG")
    with running_server(tmp_path, max_batch=1) as (url, _), sync_playwright() as p:
        browser = p.chromium.launch(executable_path=exe, headless=True, args=FLAGS)
        try:
            page = browser.new_page()
            page.goto(url + "/")
            page.wait_for_function("document.getElementById('model').options.length > 0")
            page.fill("#n", "3")
            page.set_input_files("#load", files=[{"name": "a.png", "mimeType": "image/png",
                                                  "buffer": a1111.getvalue()}])
            page.wait_for_function("document.getElementById('load-info').textContent.includes('loaded')")
            assert (page.input_value("#prompt"), page.input_value("#seed"), page.input_value("#n")) == (
                "a lighthouse", "5", "1")
            assert page.input_value("#model") == "default"
            assert page.input_value("#solver") == "DPM++ 2M Karras"
            page.set_input_files("#load", files=[{"name": "plain.png", "mimeType": "image/png",
                                                  "buffer": plain.getvalue()}])
            page.wait_for_function("document.getElementById('load-info').textContent.startsWith('no gen')")
        finally:
            browser.close()


def test_an_a1111_images_noise_source_is_set_and_sent(tmp_path):
    """Loading an A1111 image sets the page's noise to its source (its GPU default: a1111-nv), and the job
    the page then submits asks for it (the job's PNG says RNG: NV)."""
    import io

    from PIL import Image

    from velodiff.infotext import format_infotext, image_infotext, parse_infotext, save_options

    exe = chromium()
    from playwright.sync_api import sync_playwright

    text = format_infotext("a red circle", None, {"Steps": 2, "Sampler": "euler", "CFG scale": 2.5, "Seed": 5,
                                                  "Size": "64x64", "Version": "v1.10.1"})
    a1111 = io.BytesIO()
    Image.new("RGB", (8, 8)).save(a1111, format="PNG", **save_options("PNG", text))
    with running_server(tmp_path, max_batch=1) as (url, _), sync_playwright() as p:
        browser = p.chromium.launch(executable_path=exe, headless=True, args=FLAGS)
        try:
            page = browser.new_page()
            page.goto(url + "/")
            page.wait_for_function("document.getElementById('model').options.length > 0")
            assert page.input_value("#noise") == "velodiff"
            page.set_input_files("#load", files=[{"name": "a.png", "mimeType": "image/png",
                                                  "buffer": a1111.getvalue()}])
            page.wait_for_function("document.getElementById('load-info').textContent.includes('loaded')")
            assert page.input_value("#noise") == "a1111-nv"
            page.click("#generate")
            page.wait_for_selector("#gallery img", timeout=60_000)
            src = page.get_attribute("#gallery img", "src")
        finally:
            browser.close()
        made = Image.open(io.BytesIO(httpx.get(url + src, timeout=30).content))
        assert parse_infotext(image_infotext(made))["RNG"] == "NV"
