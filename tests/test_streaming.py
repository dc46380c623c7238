"""Streaming (`stream: true`, OpenAI's image-streaming Server-Sent Events) and the page at `/`, over real
HTTP through one real Ray Serve app (tiny model, CPU) shared by every test here: the SSE events' order and
shape (checked against the `openai` package's own event types), partial_images 0-3, n > 1 batched in one
DiT forward, an edit stream, 4xx JSON before any stream, a client that disconnects mid-stream, the final
image equal to the non-streamed one; OpenAI's SDK iterating a stream; the README's streaming examples as
written; and the page driven in a real Chromium through Playwright (skipped only where no Chromium is
installed, and never in CI: .ci/run installs it and sets SERVE_APP_REQUIRE_BROWSER)."""

import base64
import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from serve_app.engines.previews import preview_steps
from tests.tiny_server import BASE, PORT

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def server(tiny_server):
    """The shared root tiny app at "/" (tests/tiny_server.py): the page is its "/"."""
    from ray import serve

    return serve


def parse_sse(lines) -> list[tuple[str, dict]]:
    """(event name, data) per SSE block."""
    out, event, data = [], None, []
    for line in lines:
        if line == "":
            if data:
                out.append((event, json.loads("\n".join(data))))
            event, data = None, []
        elif line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].strip())
    if data:
        out.append((event, json.loads("\n".join(data))))
    return out


def stream(body: dict, path="/v1/images/generations", **kw) -> tuple[httpx.Response, list[tuple[str, dict]]]:
    with httpx.stream("POST", BASE + path, json=body, timeout=120, **kw) as r:
        if r.status_code != 200:
            r.read()
            return r, []
        return r, parse_sse(r.iter_lines())


def stream_edit(data: dict, files: dict) -> tuple[httpx.Response, list[tuple[str, dict]]]:
    with httpx.stream("POST", BASE + "/v1/images/edits", data=data, files=files, timeout=120) as r:
        if r.status_code != 200:
            r.read()
            return r, []
        return r, parse_sse(r.iter_lines())


def photo_png(w=96, h=64) -> bytes:
    y, x = np.mgrid[0:h, 0:w]
    buf = io.BytesIO()
    Image.fromarray(np.stack([x * 255 // w, y * 255 // h, (x * y) % 256], -1).astype(np.uint8), "RGB").save(buf, format="PNG")
    return buf.getvalue()


def check_stream(events, prefix: str, n: int, steps: int, partial_images: int) -> list[dict]:
    """Order and shape of one request's events; returns its completed events, by image index."""
    from openai.types import ImageEditCompletedEvent, ImageEditPartialImageEvent, ImageGenCompletedEvent, ImageGenPartialImageEvent

    partial_cls, completed_cls = {"image_generation": (ImageGenPartialImageEvent, ImageGenCompletedEvent),
                                  "image_edit": (ImageEditPartialImageEvent, ImageEditCompletedEvent)}[prefix]
    for name, data in events:
        assert name == data["type"] and name.startswith(prefix + "."), (name, data.get("type"))
    kinds = [d["type"].split(".", 1)[1] for _, d in events]
    first_completed = kinds.index("completed")
    assert set(kinds[first_completed:]) == {"completed"} and kinds.count("completed") == n  # the completed images come last
    expected_previews = preview_steps(steps, partial_images)
    assert len(expected_previews) == min(partial_images, steps - 1)
    for i in range(n):
        mine = [d for _, d in events if d.get("image_index") == i]
        progress = [d for d in mine if d["type"].endswith(".progress")]
        assert [p["stage"] for p in progress] == ["encoding", "queued"] + ["denoising"] * steps + ["decoding"]
        assert [p["step"] for p in progress if p["stage"] == "denoising"] == list(range(1, steps + 1))
        assert all(p["steps"] == steps for p in progress[1:])
        assert isinstance(progress[1]["queue_position"], int) and progress[1]["queue_position"] >= 0
        partials = [d for d in mine if d["type"].endswith(".partial_image")]
        assert [p["partial_image_index"] for p in partials] == list(range(len(expected_previews)))
        assert [p["step"] for p in partials] == list(expected_previews)
        for p in partials:
            partial_cls.model_validate(p)  # every field OpenAI's type requires, of its type
            # a preview comes right after the progress event of its step
            k = mine.index(p)
            assert mine[k - 1]["type"].endswith(".progress") and mine[k - 1]["step"] == p["step"]
            w, h = map(int, p["size"].split("x"))
            assert Image.open(io.BytesIO(base64.b64decode(p["b64_json"]))).size == (w, h)
        [done] = [d for d in mine if d["type"].endswith(".completed")]
        completed_cls.model_validate(done)
    completed = sorted((d for _, d in events if d["type"].endswith(".completed")), key=lambda d: d["image_index"])
    assert [d["image_index"] for d in completed] == list(range(n))
    return completed


def test_sse_order_and_shape_for_partial_images_0_to_3(server):
    for p in range(4):
        r, events = stream({"prompt": "a red fox in the snow", "stream": True, "partial_images": p, "seed": 5, "num_inference_steps": 4})
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        [done] = check_stream(events, "image_generation", n=1, steps=4, partial_images=p)
        assert done["seed"] == 5 and done["size"] == "64x64" and done["output_format"] == "png"
        assert set(done["timings"]) >= {"denoiser_s", "vae_s", "total_s"}


def test_n_images_batched_in_one_forward_each_get_their_events(server):
    r, events = stream({"prompt": "a lighthouse", "stream": True, "partial_images": 2, "seed": 40, "n": 3, "num_inference_steps": 5,
                        "output_format": "jpeg"})
    assert r.status_code == 200
    completed = check_stream(events, "image_generation", n=3, steps=5, partial_images=2)
    assert [d["seed"] for d in completed] == [40, 41, 42]
    assert all(d["timings"]["denoiser_batch"] == 3 for d in completed)  # one DiT batch, three streams of events
    assert len({d["b64_json"] for d in completed}) == 3
    partial_seeds = {d["image_index"]: d["seed"] for _, d in events if d["type"].endswith(".partial_image")}
    assert partial_seeds == {0: 40, 1: 41, 2: 42}


def test_streamed_final_image_equals_the_non_streamed_one(server):
    body = {"prompt": "a bowl of ramen", "seed": 77, "num_inference_steps": 4, "size": "96x64", "style_preset": "Watercolor"}
    plain = httpx.post(BASE + "/v1/images/generations", json=body, timeout=120)
    assert plain.status_code == 200, plain.text
    _, events = stream({**body, "stream": True, "partial_images": 3})
    [done] = check_stream(events, "image_generation", n=1, steps=4, partial_images=3)
    assert done["b64_json"] == plain.json()["data"][0]["b64_json"]
    assert done["revised_prompt"] == plain.json()["data"][0]["revised_prompt"] == "a bowl of ramen, watercolor painting, soft washes, paper texture, delicate"
    # the VAE preview kind: the same final image, previews the VAE's decode of the estimate
    _, events = stream({**body, "stream": True, "partial_images": 1, "preview_kind": "vae"})
    [done] = check_stream(events, "image_generation", n=1, steps=4, partial_images=1)
    assert done["b64_json"] == plain.json()["data"][0]["b64_json"]


def test_edit_stream(server):
    files = {"image": ("photo.png", photo_png(), "image/png")}
    data = {"prompt": "a harbour at night", "strength": "0.6", "seed": "9", "num_inference_steps": "5"}
    plain = httpx.post(BASE + "/v1/images/edits", data=data, files=files, timeout=120)
    assert plain.status_code == 200, plain.text
    r, events = stream_edit({**data, "stream": "true", "partial_images": "2"}, files)
    assert r.status_code == 200
    steps = 5 - int(5 - 0.6 * 5)  # strength 0.6 of 5 steps: the last 3 run
    [done] = check_stream(events, "image_edit", n=1, steps=steps, partial_images=2)
    assert done["size"] == "96x64" and done["b64_json"] == plain.json()["data"][0]["b64_json"]


def test_bad_input_while_streaming_is_a_plain_json_4xx(server):
    cases = [({"prompt": "", "stream": True}, "prompt"), ({"prompt": "x", "stream": True, "partial_images": 4}, "partial_images"),
             ({"prompt": "x", "stream": True, "style_preset": "Vaporwave"}, "style_preset"),
             ({"prompt": "x", "stream": True, "size": "100x100"}, "size"), ({"prompt": "x", "stream": True, "n": 99}, "n"),
             ({"prompt": "x", "stream": True, "preview_kind": "taesd"}, "preview_kind")]
    for body, param in cases:
        r = httpx.post(BASE + "/v1/images/generations", json=body, timeout=60)
        assert r.status_code == 400 and r.headers["content-type"].startswith("application/json"), (body, r.status_code, r.text)
        assert r.json()["error"]["param"] == param and r.json()["error"]["type"] == "invalid_request_error", r.text
    r = httpx.post(BASE + "/v1/images/edits", data={"prompt": "x", "stream": "true", "strength": "0"},
                   files={"image": ("p.png", photo_png(), "image/png")}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "strength"
    r = httpx.post(BASE + "/v1/images/edits", data={"prompt": "x", "stream": "true"}, files={"image": ("p.png", b"not an image", "image/png")}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "image"


def test_styles_listed_with_their_templates(server):
    styles = httpx.get(BASE + "/v1/styles", timeout=30).json()["data"]
    assert [s["name"] for s in styles] == ["None", "Photorealistic", "Cinematic", "Anime", "Digital Art", "Oil Painting", "Watercolor",
                                           "3D Render", "Fantasy", "Sci-Fi"]
    assert all("{prompt}" in s["template"] for s in styles)


def stats() -> dict:
    return httpx.get(BASE + "/v1/stats", timeout=30).json()


def test_a_client_disconnecting_mid_stream_frees_its_work(server):
    """A long stream L holds the DiT; a stream S of another size queues behind it, and its client goes
    away once S is queued. S never runs on the DiT (only L's request is counted there) and the ingress
    holds nothing in flight once L is done."""
    before = stats()["denoiser"]["requests"]
    with httpx.Client(timeout=120) as client:
        with client.stream("POST", BASE + "/v1/images/generations",
                           json={"prompt": "a long one", "stream": True, "size": "512x512", "num_inference_steps": 16, "seed": 1}) as long_r:
            lines = long_r.iter_lines()
            for line in lines:  # until L's first step: L's batch is running on the DiT
                if line.startswith("data:") and '"stage":"denoising"' in line:
                    break
            with httpx.stream("POST", BASE + "/v1/images/generations",
                              json={"prompt": "a short one", "stream": True, "size": "64x64", "num_inference_steps": 4}, timeout=120) as short_r:
                for line in short_r.iter_lines():
                    if line.startswith("data:") and '"stage":"queued"' in line:
                        assert json.loads(line[5:])["queue_position"] >= 1  # L runs ahead of it
                        break
            # S's client has gone (its response closed); L runs to its end
            rest = parse_sse(lines)
            assert rest[-1][1]["type"] == "image_generation.completed"
    after = stats()
    assert after["denoiser"]["requests"] - before == 1
    # the ingress freed S when its client left (L is done, so nothing is in flight); a new request still runs
    assert after["ingress"]["inflight_images"] == 0
    assert httpx.post(BASE + "/v1/images/generations", json={"prompt": "after", "num_inference_steps": 2}, timeout=120).status_code == 200


def test_openai_sdk_iterates_the_stream(server):
    from openai import OpenAI
    from openai.types import ImageGenCompletedEvent, ImageGenPartialImageEvent

    client = OpenAI(base_url=BASE + "/v1", api_key="unused")
    sdk_events = list(client.images.generate(model="z-image-turbo", prompt="a red fox in the snow", stream=True, partial_images=2,
                                             extra_body={"seed": 3, "num_inference_steps": 4}))
    _, raw = stream({"model": "z-image-turbo", "prompt": "a red fox in the snow", "stream": True, "partial_images": 2, "seed": 3,
                     "num_inference_steps": 4})
    assert [e.type for e in sdk_events] == [d["type"] for _, d in raw]  # every event, ours included, passed through
    partials = [e for e in sdk_events if e.type == "image_generation.partial_image"]
    assert len(partials) == 2 and all(isinstance(e, ImageGenPartialImageEvent) for e in partials)
    [done] = [e for e in sdk_events if e.type == "image_generation.completed"]
    assert isinstance(done, ImageGenCompletedEvent) and done.b64_json == raw[-1][1]["b64_json"]
    progress = [e for e in sdk_events if e.type == "image_generation.progress"]
    assert [getattr(e, "step", None) for e in progress if getattr(e, "stage", None) == "denoising"] == [1, 2, 3, 4]

    edits = list(client.images.edit(image=("photo.png", photo_png(), "image/png"), prompt="a harbour", stream=True, partial_images=1,
                                    extra_body={"seed": 2, "num_inference_steps": 4, "strength": 0.8}))
    assert [e.type for e in edits if not e.type.endswith(".progress")] == ["image_edit.partial_image", "image_edit.completed"]


def _readme_block(marker: str) -> str:
    m = re.search(rf"<!-- {marker}:.*?-->\s*```\w+\n(.*?)```", README.read_text(), re.S)
    assert m, marker
    return m.group(1).replace("localhost:8000", f"127.0.0.1:{PORT}")


def test_readme_streaming_examples_run_as_written(server, tmp_path):
    curl = subprocess.run(["bash", "-c", _readme_block("stream-curl")], cwd=tmp_path, capture_output=True, text=True, timeout=180)
    assert curl.returncode == 0, curl.stderr
    names = [line.split(":", 1)[1].strip() for line in curl.stdout.splitlines() if line.startswith("event:")]
    assert names.count("image_generation.partial_image") == 2 and names[-1] == "image_generation.completed"
    sdk = subprocess.run([sys.executable, "-c", _readme_block("stream-sdk")], cwd=tmp_path, capture_output=True, text=True, timeout=180)
    assert sdk.returncode == 0, sdk.stderr
    assert Image.open(tmp_path / "fox.png").size == (256, 256)
    assert (tmp_path / "fox-partial-1.png").exists()


# ---- the page, in a real browser -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None and not os.environ.get("SERVE_APP_REQUIRE_BROWSER"):
        pytest.skip("no Chromium installed here (apt-get install -y chromium chromium-driver); CI installs it")
    if not os.environ.get("SERVE_APP_REQUIRE_BROWSER"):
        pytest.importorskip("playwright", reason="playwright is not installed (pip install '.[test]')")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM or "/usr/bin/chromium", args=["--no-sandbox"])
        yield b
        b.close()


@pytest.fixture
def page(server, browser):
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.set_default_timeout(120_000)
    seen = []
    page.on("request", lambda req: seen.append(req.url))
    page.goto(BASE + "/")
    page.wait_for_function("document.querySelectorAll('#style_preset option').length === 10")
    yield page
    external = [u for u in seen if not (u.startswith(BASE + "/") or u.startswith("data:") or u.startswith("blob:"))]
    assert external == [], external  # nothing but this server: the page works offline
    context.close()


def generate_in(page, prompt="a red fox in the snow", size="256x256", steps=4, seed=None):
    page.fill("#prompt", prompt)
    page.select_option("#size", size)
    page.eval_on_selector("#steps", f"(e) => {{ e.value = {steps}; e.dispatchEvent(new Event('input')); }}")
    if seed is None:
        page.check("#seed-random")
    else:
        page.check("#seed-fixed")
        page.fill("#seed", str(seed))
    page.click("#go")
    page.wait_for_function("document.getElementById('status').textContent.startsWith('Done in') || document.getElementById('err-general').textContent || document.querySelector('[aria-invalid=true]')")


def result_images(page) -> list[dict]:
    return page.eval_on_selector_all(".gallery .card img", "els => els.map(e => ({src: e.src, w: e.naturalWidth, h: e.naturalHeight, seed: e.dataset.seed}))")


def test_page_generates_with_progress_previews_and_a_reproducible_seed(page, tmp_path):
    sizes = page.eval_on_selector_all("#size optgroup", "gs => gs.map(g => [g.label, g.children.length])")
    assert sizes == [["Small", 4], ["Standard", 1]]  # max_size 1024: of the Space's sizes only 1024x1024 fits
    generate_in(page, size="768x512", steps=4, seed=123)
    [img] = result_images(page)
    assert (img["w"], img["h"]) == (768, 512) and img["seed"] == "123"
    previews = page.eval_on_selector_all("#previews img", "els => els.map(e => +e.dataset.step)")
    assert previews == [3]  # partial_images 2 of 4 steps: previews after steps 1 and 3, the last one shown
    assert page.eval_on_selector("#progress", "e => e.value") == 1
    assert "Seed 123" in page.text_content(".card .seed-line")
    if os.environ.get("SERVE_APP_SCREENSHOT"):
        page.screenshot(path=os.environ["SERVE_APP_SCREENSHOT"], full_page=True)
    generate_in(page, size="768x512", steps=4, seed=123)
    [again] = result_images(page)
    assert again["src"] == img["src"]  # the same seed: the same image
    assert len(page.query_selector_all("#history li")) == 2


def test_page_random_seed_is_shown_and_reused_in_one_click(page):
    generate_in(page, size="256x256", steps=4)
    [img] = result_images(page)
    assert int(img["seed"]) < 2**53  # a drawn seed survives JavaScript's numbers
    page.click(".card .reuse")
    assert page.is_checked("#seed-fixed") and page.input_value("#seed") == img["seed"]
    page.keyboard.press("Control+Enter")  # Ctrl+Enter generates
    page.wait_for_function("document.querySelectorAll('#history li').length === 2")
    [again] = result_images(page)
    assert again["src"] == img["src"]


def test_page_style_preset_changes_the_prompt_sent(page):
    page.select_option("#style_preset", "anime")
    with page.expect_request(lambda r: r.url.endswith("/v1/images/generations")) as req:
        generate_in(page, prompt="a cat on a roof", size="256x256", steps=4, seed=1)
    body = req.value.post_data_json
    assert body["style_preset"] == "anime" and body["prompt"] == "a cat on a roof" and body["stream"] is True
    assert page.text_content(".card .revised") == "Prompt sent: a cat on a roof, anime style, cel shading, vibrant colors, clean line art"


def test_page_shows_the_servers_error_next_to_its_field(page):
    generate_in(page, prompt="   ", size="256x256", steps=4)
    assert page.text_content("#err-prompt").startswith("prompt must not be empty")  # then the request id
    assert page.get_attribute("#prompt", "aria-invalid") == "true"
    assert page.text_content("#err-general") == ""


def test_page_transforms_an_uploaded_image(page, tmp_path):
    (tmp_path / "photo.png").write_bytes(photo_png(200, 120))
    page.click("#tab-transform")
    page.set_input_files("#image", str(tmp_path / "photo.png"))
    page.eval_on_selector("#strength", "(e) => { e.value = 0.5; e.dispatchEvent(new Event('input')); }")
    with page.expect_request(lambda r: r.url.endswith("/v1/images/edits")):
        generate_in(page, prompt="a watercolour harbour", size="512x512", steps=4, seed=4)
    [img] = result_images(page)
    assert (img["w"], img["h"]) == (512, 512) and img["seed"] == "4"


def test_page_fits_a_phone_and_docs_work_offline(server, browser):
    context = browser.new_context(viewport={"width": 375, "height": 800})
    page = context.new_page()
    seen = []
    page.on("request", lambda r: seen.append(r.url))
    page.goto(BASE + "/")
    page.wait_for_function("document.querySelectorAll('#style_preset option').length === 10")
    assert page.evaluate("document.documentElement.scrollWidth") <= 375  # no sideways scrolling
    labels = page.evaluate("[...document.querySelectorAll('input, select, textarea')].filter(e => !e.labels || !e.labels.length).map(e => e.id)")
    assert labels == []  # every control has a label
    page.goto(BASE + "/docs")
    page.wait_for_selector("h2:has-text('/v1/images/generations')")
    assert all(u.startswith(BASE + "/") or u.startswith("data:") for u in seen), seen
    context.close()
