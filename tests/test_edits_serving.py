"""POST /v1/images/edits over real HTTP through a real Ray Serve app (tiny model, CPU): OpenAI's SDK, the
README's curl and SDK examples as written, a batch of edits with different strengths, every bad upload,
and the server serving normally after each."""

import base64
import concurrent.futures
import io
import re
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.test_uploads import encode as png
from tests.tiny_server import BASE, PORT, tiny_args

MAX_UPLOAD_BYTES = 150_000  # the root app's server.max_upload_bytes (tests/tiny_server.py)
README = Path(__file__).resolve().parents[1] / "README.md"


def photo(w=100, h=70) -> Image.Image:
    y, x = np.mgrid[0:h, 0:w]
    return Image.fromarray(np.stack([x * 255 // w, y * 255 // h, (x * y) % 256], -1).astype(np.uint8), "RGB")


def mask_png(w=100, h=70) -> bytes:
    alpha = np.full((h, w), 255, np.uint8)
    alpha[10:45, 20:70] = 0  # transparent: paint here
    return png(Image.fromarray(np.dstack([np.zeros((h, w, 3), np.uint8), alpha]), "RGBA"))


def pixels(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))


def edit(files: dict, data: dict, timeout=120):
    return httpx.post(BASE + "/v1/images/edits", files=files, data=data, timeout=timeout)


def denoiser_stats():
    return httpx.get(BASE + "/v1/stats", timeout=30).json()["denoiser"]


@pytest.fixture(scope="module")
def server(tiny_server):
    from ray import serve

    return serve


def reference(tiny_dir, prompt, seed, pixels_, strength, steps, mask=None):
    """The same edit in this process, one CPU thread as the replicas run (tests/test_serving.py says why)."""
    import torch

    from serve_app.config import AppConfig
    from serve_app.pipeline import StagedPipeline

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        pipe = StagedPipeline(AppConfig.model_validate(tiny_args(tiny_dir)))
        [ref] = pipe.edit([prompt], [seed], pixels_, strength, mask=mask, steps=steps)
    finally:
        torch.set_num_threads(threads)
    return ref.pixels.numpy()


def test_openai_sdk_edit_with_a_mask_matches_the_pipeline(server, tiny_dir, tmp_path):
    from openai import OpenAI

    from serve_app.config import ServerConfig
    from serve_app.uploads import load_edit_inputs

    (tmp_path / "photo.png").write_bytes(png(photo()))
    (tmp_path / "mask.png").write_bytes(mask_png())
    client = OpenAI(base_url=BASE + "/v1", api_key="unused")
    result = client.images.edit(image=open(tmp_path / "photo.png", "rb"), mask=open(tmp_path / "mask.png", "rb"),
                                prompt="a red fox in the snow", extra_body={"strength": 0.8, "seed": 7, "num_inference_steps": 4})
    assert len(result.data) == 1
    got = pixels(result.data[0].b64_json)
    assert got.shape == (64, 96, 3)  # 100x70 fitted: rounded down to multiples of 16

    server_cfg = ServerConfig.model_validate(tiny_args(tiny_dir)["server"])
    inputs = load_edit_inputs(png(photo()), mask_png(), 96, 64, server_cfg)
    assert np.array_equal(got, reference(tiny_dir, "a red fox in the snow", 7, inputs.pixels, 0.8, 4, inputs.mask))

    # without a mask, with the SDK's own fields: img2img at the default strength (0.6), n=2 with consecutive seeds
    plain = client.images.edit(image=open(tmp_path / "photo.png", "rb"), prompt="a red fox", n=2, size="64x64",
                               extra_body={"seed": 3, "num_inference_steps": 4})
    assert [d.model_extra["seed"] for d in plain.data] == [3, 4]
    inputs = load_edit_inputs(png(photo()), None, 64, 64, server_cfg)
    ref = reference(tiny_dir, "a red fox", 4, inputs.pixels, 0.6, 4)
    # the two images share DiT forwards (batch 2) where the reference ran alone: tests/test_parity.py's batch bound
    assert np.abs(pixels(plain.data[1].b64_json).astype(int) - ref.astype(int)).max() <= 1


def _readme_block(marker: str) -> str:
    text = README.read_text()
    m = re.search(rf"<!-- {marker}:.*?-->\s*```\w+\n(.*?)```", text, re.S)
    assert m, marker
    return m.group(1).replace("localhost:8000", f"127.0.0.1:{PORT}")


def test_readme_curl_and_sdk_examples_run_as_written(server, tmp_path):
    (tmp_path / "photo.png").write_bytes(png(photo()))
    (tmp_path / "mask.png").write_bytes(mask_png())
    curl = subprocess.run(["bash", "-c", _readme_block("edits-curl")], cwd=tmp_path, capture_output=True, text=True, timeout=180)
    assert curl.returncode == 0, curl.stderr
    assert curl.stdout.split() == ["96", "64", "7"]
    from_curl = (tmp_path / "edited.png").read_bytes()
    (tmp_path / "edited.png").unlink()
    sdk = subprocess.run([sys.executable, "-c", _readme_block("edits-sdk")], cwd=tmp_path, capture_output=True, text=True, timeout=180)
    assert sdk.returncode == 0, sdk.stderr
    assert (tmp_path / "edited.png").read_bytes() == from_curl  # same fields, same seed: the same image


def test_handle_edit_matches_http(server):
    from ray import serve

    handle = serve.get_app_handle("z-image")
    via_handle = handle.edit.remote(png(photo()), "a cat", strength=0.5, seed=11, num_inference_steps=4).result(timeout_s=120)
    r = edit({"image": ("p.png", png(photo()), "image/png")}, {"prompt": "a cat", "strength": "0.5", "seed": "11", "num_inference_steps": "4"})
    assert r.status_code == 200, r.text
    assert base64.b64decode(r.json()["data"][0]["b64_json"]) == via_handle["data"][0]["image"]


def test_a_batch_of_edits_with_different_strengths(server):
    """Five concurrent requests of one size and 4 steps: a generation and edits at strengths 1.0, 0.6, 0.6
    and 0.3 (4, 4, 3, 3 and 2 forwards alone). They may batch only where the timesteps are the same, so the
    DiT runs at most the 16 forwards of five lone requests and at least the 4 + 3 + 2 of the three distinct
    first steps, never a forward of mixed shapes; each image is the one the request gets alone."""
    image = ("p.png", png(photo(64, 64)), "image/png")
    jobs = [("gen", None)] + [("edit", s) for s in (1.0, 0.6, 0.6, 0.3)]

    def run(i, kind, strength):
        data = {"prompt": "a harbour at night", "seed": str(100 + i), "num_inference_steps": "4", "size": "64x64"}
        if kind == "gen":
            return httpx.post(BASE + "/v1/images/generations", json={**data, "seed": 100 + i, "num_inference_steps": 4}, timeout=120)
        return edit({"image": image}, {**data, "strength": str(strength)})

    before = denoiser_stats()
    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        batched = list(pool.map(lambda a: run(a[0], *a[1]), enumerate(jobs)))
    after = denoiser_stats()
    assert all(r.status_code == 200 for r in batched), [r.text for r in batched]
    assert 4 + 3 + 2 <= after["forwards"] - before["forwards"] <= 4 + 4 + 3 + 3 + 2
    assert after["requests"] - before["requests"] == 5 and after["mixed_shape_forwards"] == 0
    for i, (kind, strength) in enumerate(jobs):
        alone = run(i, kind, strength)
        a, b = pixels(batched[i].json()["data"][0]["b64_json"]), pixels(alone.json()["data"][0]["b64_json"])
        assert np.abs(a.astype(int) - b.astype(int)).max() <= 1  # tests/test_parity.py's batch bound


def _truncated() -> bytes:
    data = png(photo())
    return data[: len(data) // 2]


def _bomb() -> bytes:
    from tests.test_uploads import png_header_only

    return png_header_only(40_000, 40_000)


def _big() -> bytes:
    return png(Image.fromarray(np.random.default_rng(0).integers(0, 255, (300, 300, 3), dtype=np.uint8)))


BAD = [
    ("not an image", lambda: {"image": ("x.png", b"hello, not an image", "image/png")}, {}, 400, "image"),
    ("truncated", lambda: {"image": ("x.png", _truncated(), "image/png")}, {}, 400, "image"),
    ("bomb", lambda: {"image": ("x.png", _bomb(), "image/png")}, {}, 400, "image"),
    ("bomb with a size", lambda: {"image": ("x.png", _bomb(), "image/png")}, {"size": "64x64"}, 400, "image"),
    ("over the byte limit", lambda: {"image": ("x.png", _big(), "image/png")}, {}, 413, "image"),
    ("gif", lambda: {"image": ("x.gif", png(photo(), "GIF"), "image/gif")}, {}, 400, "image"),
    ("no image", lambda: {"mask": ("m.png", mask_png(), "image/png")}, {}, 400, "image"),
    ("mask of another size", lambda: {"image": ("x.png", png(photo()), "image/png"), "mask": ("m.png", mask_png(50, 50), "image/png")}, {}, 400, "mask"),
    ("mask without alpha", lambda: {"image": ("x.png", png(photo()), "image/png"), "mask": ("m.png", png(photo()), "image/png")}, {}, 400, "mask"),
    ("mask not an image", lambda: {"image": ("x.png", png(photo()), "image/png"), "mask": ("m.png", b"junk", "image/png")}, {}, 400, "mask"),
    ("strength 0", lambda: {"image": ("x.png", png(photo()), "image/png")}, {"strength": "0"}, 400, "strength"),
    ("strength 1.5", lambda: {"image": ("x.png", png(photo()), "image/png")}, {"strength": "1.5"}, 400, "strength"),
    ("strength text", lambda: {"image": ("x.png", png(photo()), "image/png")}, {"strength": "lots"}, 400, "strength"),
    ("strength too small for the steps", lambda: {"image": ("x.png", png(photo()), "image/png")}, {"strength": "1e-17", "num_inference_steps": "4"}, 400, "strength"),
    ("bad size", lambda: {"image": ("x.png", png(photo()), "image/png")}, {"size": "70x70"}, 400, "size"),
    ("n", lambda: {"image": ("x.png", png(photo()), "image/png")}, {"n": "0"}, 400, "n"),
]


@pytest.mark.parametrize("name, files, extra, status, param", BAD, ids=[b[0] for b in BAD])
def test_bad_uploads_get_4xx_naming_the_field_and_the_server_serves_on(server, name, files, extra, status, param):
    data = {"prompt": "a cat", "num_inference_steps": "2", **extra}
    r = edit(files(), data)
    assert r.status_code == status, (name, r.status_code, r.text)
    err = r.json()["error"]
    assert err["param"] == param and set(err) == {"message", "type", "param", "code"}, err
    ok = edit({"image": ("x.png", png(photo(64, 64)), "image/png")}, {"prompt": "a cat", "num_inference_steps": "2", "seed": "1"})
    assert ok.status_code == 200, ok.text
    assert httpx.get(BASE + "/health", timeout=60).status_code == 200


def _animated() -> bytes:
    frames = [Image.new("RGB", (96, 64), c) for c in ((250, 0, 0), (0, 250, 0))]
    return png(frames[0], save_all=True, append_images=frames[1:])


def _rotated_jpeg() -> bytes:
    img = photo(96, 64)
    exif = img.getexif()
    exif[0x0112] = 6  # shown rotated: 64 wide, 96 high
    return png(img, "JPEG", exif=exif)


CONVERTED = [
    ("animated png: first frame", _animated, (96, 64)),
    ("cmyk jpeg", lambda: png(photo(96, 64).convert("CMYK"), "JPEG"), (96, 64)),
    ("16-bit grayscale", lambda: png(Image.fromarray(np.asarray(photo(96, 64).convert("L")).astype(np.uint16) * 257)), (96, 64)),
    ("palette", lambda: png(photo(96, 64).convert("P")), (96, 64)),
    ("rgba", lambda: png(photo(96, 64).convert("RGBA")), (96, 64)),
    ("webp", lambda: png(photo(96, 64), "WEBP"), (96, 64)),
    ("exif orientation", _rotated_jpeg, (64, 96)),
]


@pytest.mark.parametrize("name, make, size", CONVERTED, ids=[c[0] for c in CONVERTED])
def test_unusual_but_valid_uploads_are_converted(server, name, make, size):
    r = edit({"image": ("x", make(), "application/octet-stream")}, {"prompt": "a cat", "num_inference_steps": "2", "seed": "1"})
    assert r.status_code == 200, (name, r.text)
    d = r.json()["data"][0]
    assert (d["width"], d["height"]) == size and pixels(d["b64_json"]).shape == (size[1], size[0], 3)
