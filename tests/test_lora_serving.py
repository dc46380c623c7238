"""LoRA adapters over real HTTP through a real Ray Serve app (tiny model, CPU, two denoiser replicas, one
server start for the module): GET /v1/loras, an adapter's image equal to the in-process pipeline's, two
concurrent requests with different adapters each getting the image it gets alone, Serve's multiplexed
routing (a second request for an adapter goes to the replica that loaded it), edits with adapters, the
README's example, and every bad name a 400 naming `lora`. The app runs next to the shared tiny app
(tests/tiny_server.py), deployed once for the module."""

import base64
import concurrent.futures
import io
import os
import re
import shutil
import subprocess
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.tiny_server import BASE as ROOT_BASE
from tests.tiny_server import tiny_args as shared_args

APP = "lora"  # next to the shared root app, at /lora (tests/tiny_server.py)
BASE = f"{ROOT_BASE}/{APP}"
README = Path(__file__).resolve().parents[1] / "README.md"
PROMPT = "a lighthouse at dawn"


def tiny_args(tiny_dir, lora_dir) -> dict:
    return shared_args(
        tiny_dir,
        lora={"enabled": True, "dir": str(lora_dir), "max_loaded": 4, "max_rank": 16},
        # two replicas: multiplexing decides which one gets a request for an adapter
        denoiser_deployment={"num_replicas": 2, "batch_wait_timeout_s": 0.0},
        # one item per text-encoder and VAE forward: the concurrency test compares images bit for bit, and on
        # CPU a batch of several may round one pixel differently (oneDNN picks its kernel by batch size; a
        # loaded CI machine put concurrent requests in one VAE batch); the DiT, which the adapters change,
        # batches as configured
        text_encoder_deployment={"max_batch_size": 1},
        vae_deployment={"max_batch_size": 1},
        # a request for an adapter waits up to this for a replica that holds it (Serve's default 1-2 s, on a
        # loaded 2-core CI machine, could send it elsewhere before the router hears of the load); the router
        # runs in the ingress's process
        ingress_deployment={"ray_actor_options": {"num_cpus": 0.1, "runtime_env": {"env_vars": {
            "RAY_SERVE_MULTIPLEXED_MODEL_ID_MATCHING_TIMEOUT_S": "10"}}}},
    )


@pytest.fixture(scope="module")
def lora_dir(tiny_dir, tmp_path_factory):
    from serve_app.engines.model_configs import TINY_TRANSFORMER_CONFIG
    from serve_app.engines.tiny_model import DEMO_ADAPTER, build_lora_adapter, ensure_tiny_loras

    folder = tmp_path_factory.mktemp("served-loras")
    for i, name in enumerate(["ink", "oil", "route"]):
        build_lora_adapter(folder, name, TINY_TRANSFORMER_CONFIG, rank=4, seed=20 + i)
    shutil.copy(ensure_tiny_loras(tiny_dir) / f"{DEMO_ADAPTER}.safetensors", folder)  # what tiny-cpu.yaml serves
    outside = tmp_path_factory.mktemp("elsewhere") / "secret.safetensors"
    shutil.copy(folder / "ink.safetensors", outside)
    os.symlink(outside, folder / "escape.safetensors")  # a symlink out of the folder: never an adapter
    return folder


@pytest.fixture(scope="module")
def server(tiny_server, tiny_dir, lora_dir):
    """The LoRA app, deployed once for the module in the shared Ray + Serve."""
    with tiny_server.app(APP, tiny_args(tiny_dir, lora_dir)) as base:
        yield base


def generate(lora=None, seed=7, **extra):
    body = {"prompt": PROMPT, "size": "64x64", "seed": seed, "num_inference_steps": 3, **extra}
    if lora is not None:
        body["lora"] = lora
    return httpx.post(BASE + "/v1/images/generations", json=body, timeout=120)


def pixels(response) -> np.ndarray:
    assert response.status_code == 200, response.text
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(response.json()["data"][0]["b64_json"]))).convert("RGB"))


def reference(tiny_dir, lora_dir, lora, seed=7) -> np.ndarray:
    """The same generation in this process, one CPU thread as the replicas run (tests/test_serving.py)."""
    import torch

    from serve_app.config import AppConfig
    from serve_app.pipeline import StagedPipeline

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        pipe = StagedPipeline(AppConfig.model_validate(tiny_args(tiny_dir, lora_dir)))
        [ref] = pipe.generate([PROMPT], [seed], height=64, width=64, steps=3, lora=lora)
    finally:
        torch.set_num_threads(threads)
    return ref.pixels.numpy()


def test_lists_the_adapters_of_the_folder(server):
    r = httpx.get(BASE + "/v1/loras", timeout=30)
    assert r.status_code == 200
    assert [d["id"] for d in r.json()["data"]] == ["ink", "oil", "route", "tiny-demo"]  # not the symlink out


def test_an_adapter_gives_the_in_process_image_and_scale_zero_none(server, tiny_dir, lora_dir):
    with_ink = pixels(generate([{"name": "ink", "scale": 0.8}]))
    assert np.array_equal(with_ink, reference(tiny_dir, lora_dir, (("ink", 0.8),)))
    none = pixels(generate())
    assert np.abs(with_ink.astype(int) - none.astype(int)).max() > 10
    assert np.array_equal(pixels(generate([{"name": "ink", "scale": 0.0}])), none)


def test_concurrent_requests_with_different_adapters_get_their_own_images(server):
    jobs = [("ink", 11), ("oil", 11), (None, 11), ([{"name": "ink", "scale": 1.0}, {"name": "oil", "scale": 0.5}], 11)]
    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        together = list(pool.map(lambda j: pixels(generate(j[0], seed=j[1])), jobs))
    for (lora, seed), got in zip(jobs, together):
        alone = pixels(generate(lora, seed=seed))
        # never in one forward with another adapter set, so each computes what it computes alone; the two
        # replicas run the same kernels on one thread each
        assert np.array_equal(got, alone)
    assert len({g.tobytes() for g in together}) == len(jobs)


def test_a_second_request_for_an_adapter_goes_to_the_replica_that_loaded_it(server):
    """`route` is used by no other test: the first request loads it on one replica (lora_load_s > 0); with
    Serve's multiplexing every later one reaches that replica, which holds it (lora_load_s == 0). Routed at
    random over the two replicas, five would all hit it with probability 1/32."""
    first = generate("route", seed=1)
    assert first.status_code == 200, first.text
    assert first.json()["data"][0]["timings"]["lora_load_s"] > 0
    for seed in range(2, 7):
        r = generate("route", seed=seed)
        assert r.status_code == 200, r.text
        assert r.json()["data"][0]["timings"]["lora_load_s"] == 0.0
    assert generate(seed=1).json()["data"][0]["timings"]["lora_load_s"] == 0.0  # no adapter, nothing to load
    loras = httpx.get(BASE + "/v1/stats", timeout=30).json()["denoiser"]["lora"]
    assert {"loaded", "loads", "max_rank"} <= set(loras)


def test_an_edit_takes_an_adapter_as_a_form_field(server):
    from tests.test_uploads import encode as png

    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8), "RGB")
    files = {"image": ("p.png", png(image), "image/png")}
    data = {"prompt": PROMPT, "seed": "3", "num_inference_steps": "3", "size": "64x64"}
    plain = httpx.post(BASE + "/v1/images/edits", files=files, data=data, timeout=120)
    named = httpx.post(BASE + "/v1/images/edits", files=files, data={**data, "lora": "ink"}, timeout=120)
    listed = httpx.post(BASE + "/v1/images/edits", files=files, data={**data, "lora": '[{"name": "ink", "scale": 1.0}]'}, timeout=120)
    assert np.array_equal(pixels(named), pixels(listed))
    assert not np.array_equal(pixels(named), pixels(plain))
    bad = httpx.post(BASE + "/v1/images/edits", files=files, data={**data, "lora": "../ink"}, timeout=120)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "lora"


@pytest.mark.parametrize("lora", [
    "nope", "../ink", "/etc/passwd", str(Path("/tmp") / "ink"), "escape", "ink.safetensors", "..", "",
    [{"name": "ink"}, {"name": "ink"}], [{"name": "ink", "scale": 100}], [{"name": "ink", "weight": 1}],
    [{"scale": 1}], 5, {"name": "ink"}, ["ink"] * 9, "x" * 300,
])
def test_bad_adapters_are_a_400_naming_lora(server, lora_dir, lora):
    r = generate(lora)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == "lora" and err["type"] == "invalid_request_error"
    assert str(lora_dir) not in err["message"]  # nothing of the server's filesystem


def test_readme_example_runs_as_written(server, tmp_path):
    text = README.read_text()
    m = re.search(r"<!-- lora-curl:.*?-->\s*```\w+\n(.*?)```", text, re.S)
    assert m
    out = subprocess.run(["bash", "-c", m.group(1).replace("http://localhost:8000", BASE).replace("localhost:8000", BASE)], cwd=tmp_path,
                         capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr
    assert "tiny-demo" in out.stdout and (tmp_path / "fox-lora.png").stat().st_size > 0
