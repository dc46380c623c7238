"""The Serve application over real HTTP on a real local Ray cluster (CPU, tiny model)."""

import base64
import concurrent.futures
import io
import time

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.tiny_server import BASE, tiny_args, wait_until  # noqa: F401  (tiny_args: other files import it from here)


@pytest.fixture(scope="module")
def serve_app(tiny_server):
    from ray import serve

    return serve


def _post(body, base=BASE, timeout=120):
    return httpx.post(base + "/v1/images/generations", json=body, timeout=timeout)


def _pixels(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))


def _stats(base=BASE):
    return httpx.get(base + "/v1/stats", timeout=30).json()


def test_openai_client_generates_images_that_match_the_pipeline(serve_app, tiny_dir):
    import torch
    from openai import OpenAI

    from serve_app.config import AppConfig
    from serve_app.pipeline import StagedPipeline

    client = OpenAI(base_url=BASE + "/v1", api_key="unused")
    kw = dict(model="z-image-turbo", prompt="a lighthouse at dawn", size="128x64", response_format="b64_json",
              extra_body={"seed": 1234, "num_inference_steps": 3})
    a = client.images.generate(**kw)
    b = client.images.generate(**kw)
    assert len(a.data) == 1
    img = Image.open(io.BytesIO(base64.b64decode(a.data[0].b64_json)))
    assert img.size == (128, 64) and img.format == "PNG"
    assert a.data[0].b64_json == b.data[0].b64_json  # same seed, same bytes

    # The replicas run with one CPU thread (Ray sets OMP_NUM_THREADS=1 for a fractional num_cpus), and
    # CPU kernels reduce in a thread-count-dependent order: with 2 threads a pixel now and then lands one
    # uint8 level away. Same threads, same arithmetic: the reference must then be bit-identical.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        pipe = StagedPipeline(AppConfig.model_validate(tiny_args(tiny_dir)))
        [ref] = pipe.generate(["a lighthouse at dawn"], [1234], height=64, width=128, steps=3)
    finally:
        torch.set_num_threads(threads)
    assert np.array_equal(_pixels(a.data[0].b64_json), ref.pixels.numpy())


def test_n_fans_out_with_consecutive_seeds_and_formats(serve_app):
    r = _post({"prompt": "a cat", "n": 3, "seed": 10, "size": "64x64", "num_inference_steps": 2, "output_format": "jpeg"})
    assert r.status_code == 200, r.text
    data = r.json()["data"]
    assert [d["seed"] for d in data] == [10, 11, 12]
    assert all(Image.open(io.BytesIO(base64.b64decode(d["b64_json"]))).format == "JPEG" for d in data)
    assert len({d["b64_json"] for d in data}) == 3
    t = data[0]["timings"]
    assert {"text_encoder_s", "denoiser_s", "vae_s", "encode_s", "queue_s", "total_s"} <= set(t)
    # the three images waited for each other (DenoiseRequest.companions) and shared each DiT forward
    assert [d["timings"]["denoiser_batch"] for d in data] == [3, 3, 3]
    r = _post({"prompt": "a cat", "size": "64x64", "num_inference_steps": 2, "output_format": "webp"})
    assert Image.open(io.BytesIO(base64.b64decode(r.json()["data"][0]["b64_json"]))).format == "WEBP"


def test_concurrent_requests_batch_and_shapes_never_mix(serve_app):
    steps = 3
    before = _stats()["denoiser"]
    bodies = [{"prompt": f"prompt number {i}", "seed": i, "size": "64x64", "num_inference_steps": steps} for i in range(4)]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        codes = [r.status_code for r in pool.map(_post, bodies)]
    assert codes == [200] * 4
    after = _stats()["denoiser"]
    forwards = after["forwards"] - before["forwards"]
    assert forwards < 4 * steps, (before, after)  # fewer than 4 forwards per step: requests shared forwards

    mixed = [{"prompt": "x", "seed": i, "size": "64x64" if i % 2 else "128x64", "num_inference_steps": steps} for i in range(4)]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        assert [r.status_code for r in pool.map(_post, mixed)] == [200] * 4
    assert _stats()["denoiser"]["mixed_shape_forwards"] == 0


@pytest.mark.parametrize(
    "body,param",
    [
        ({"prompt": ""}, "prompt"),
        ({"prompt": "x" * 5000}, "prompt"),
        ({"prompt": "x", "size": "100x64"}, "size"),
        ({"prompt": "x", "size": "64x4096"}, "size"),
        ({"prompt": "x", "size": "big"}, "size"),
        ({"prompt": "x", "n": 0}, "n"),
        ({"prompt": "x", "n": 9}, "n"),
        ({"prompt": "x", "n": "three"}, "n"),
        ({"prompt": "x", "num_inference_steps": 0}, "num_inference_steps"),
        ({"prompt": "x", "num_inference_steps": 1000}, "num_inference_steps"),
        ({"prompt": "x", "model": "dall-e-3"}, "model"),
        ({"prompt": "x", "response_format": "url"}, "response_format"),
        ({"prompt": "x", "output_format": "gif"}, "output_format"),
        ({"prompt": "x", "guidance_scale": -1}, "guidance_scale"),
        ({"prompt": 42}, "prompt"),
        ({}, "prompt"),
        ({"prompt": "x", "seed": -5}, "seed"),
        ({"prompt": "x", "bogus": 1}, "bogus"),
    ],
)
def test_bad_input_gets_400_naming_the_field(serve_app, body, param):
    r = _post(body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["message"] and err["type"] == "invalid_request_error"


def test_malformed_json_is_400(serve_app):
    r = httpx.post(BASE + "/v1/images/generations", content=b"{nope", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"


def test_overload_is_rejected_then_server_recovers(tiny_server, tiny_dir):
    from ray import serve

    # 10 images may be in flight in the ingress (then 429); the denoiser takes 2 ongoing + 1 queued (then 503).
    # The text encoder collects its batch for 1 s, so all 14 requests are in flight at the ingress at once
    # (4 of them 429) before any 503 frees a slot.
    args = tiny_args(tiny_dir, server={"max_inflight_images": 10, "request_timeout_s": 300},
                     text_encoder_deployment={"max_batch_size": 16, "batch_wait_timeout_s": 1.0},
                     denoiser_deployment={"max_batch_size": 2, "max_ongoing_requests": 2, "max_queued_requests": 1})
    # next to the root app, ready at its prefix; the VAE is the root app's (this app's settings are elsewhere)
    base = tiny_server.deploy("overload", "/overload", args, shared=("VaeDecoder",))
    # the 429s and 503s come from all 14 arriving at once (the text encoder's 1 s batch), not from long work:
    # the three that run are small
    bodies = [{"prompt": f"load {i}", "seed": i, "size": "256x256", "num_inference_steps": 20} for i in range(14)]
    with concurrent.futures.ThreadPoolExecutor(14) as pool:
        responses = list(pool.map(lambda b: _post(b, base=base), bodies))
    codes = [r.status_code for r in responses]
    assert set(codes) <= {200, 429, 503}, codes
    assert 429 in codes and 503 in codes and 200 in codes, codes
    for r in responses:
        if r.status_code != 200:
            assert r.json()["error"]["code"] in ("rate_limit_exceeded", "overloaded")
    r = _post({"prompt": "after the storm", "size": "64x64", "num_inference_steps": 2}, base=base)
    assert r.status_code == 200
    assert httpx.get(base + "/health").status_code == 200
    serve.delete("overload")


def test_handle_api_matches_http(serve_app):
    from ray import serve

    handle = serve.get_app_handle("z-image")
    result = handle.generate.remote("a red fox in snow", seed=77, size="64x64", num_inference_steps=2).result()
    r = _post({"prompt": "a red fox in snow", "seed": 77, "size": "64x64", "num_inference_steps": 2})
    assert result["data"][0]["image"] == base64.b64decode(r.json()["data"][0]["b64_json"])
    assert result["data"][0]["seed"] == 77 and result["data"][0]["width"] == 64

    from serve_app.openai_api import APIError

    with pytest.raises(APIError) as e:
        handle.generate.remote("x", n=0).result()
    assert e.value.status == 400 and e.value.param == "n"


def test_models_health_and_openapi(serve_app):
    assert httpx.get(BASE + "/v1/models").json()["data"][0]["id"] == "z-image-turbo"
    assert httpx.get(BASE + "/health").json() == {"status": "ok"}
    schema = httpx.get(BASE + "/openapi.json").json()
    assert "/v1/images/generations" in schema["paths"]


def test_stats_report_each_stage_platform_and_the_engine_choice(serve_app):
    stats = _stats()
    for stage in ("text_encoder", "denoiser", "vae"):
        assert stats[stage]["platform"]["vendor"] == "cpu", stats[stage]
        startup = stats[stage]["startup_s"]  # where the replica's start went
        assert set(startup) == {"build", "warmup", "compile"} and startup["build"] > 0 and startup["warmup"] > 0, startup
        assert startup["compile"] == 0 == stats[stage]["startup_compiles"]  # of it compiling: nothing on CPU
        # nothing compiles on CPU, and nothing compiled on the request path
        assert stats[stage]["compile"]["compiles_while_serving"] == 0 == stats[stage]["compile"]["recompile_limit_hits"]
    engine = stats["denoiser"]["engine"]  # what the DiT builder applied
    assert engine["attention"] == {"noise_refiner": "native", "context_refiner": "native", "layers": "native"}
    assert (engine["fp8_dtype"], engine["compile"], engine["sp"]) == (None, False, None)
    assert stats["text_encoder"]["cuda_graphs"] == 0 and stats["text_encoder"]["norms_compiled"] is False  # on CPU: eager


def test_request_timeout_gives_504_and_frees_the_server(tiny_server, tiny_dir):
    with tiny_server.front_door("timeouts", tiny_args(tiny_dir, server={"request_timeout_s": 0.5})) as base:
        _timeout_then_free(base)


def _timeout_then_free(base: str) -> None:
    r = _post({"prompt": "slow", "size": "512x512", "num_inference_steps": 20}, base=base)  # ~2.5 s of DiT: past 0.5 s
    assert r.status_code == 504 and r.json()["error"]["code"] == "timeout"
    # A batch already running on the DiT finishes its steps (only queued work is dropped), so the
    # server is back once that batch is done: within the slow request's own compute time.
    deadline = time.time() + 60
    while time.time() < deadline:
        r = _post({"prompt": "fast", "size": "64x64", "num_inference_steps": 1}, base=base)
        if r.status_code == 200:
            break
        assert r.status_code == 504
        time.sleep(0.2)
    assert r.status_code == 200


SCALING_SHARES = ("TextEncoder", "VaeDecoder")  # the root app's: only the denoiser and the ingress are this app's


def test_denoiser_autoscales_up_then_an_upgrade_downscales_without_losing_requests(tiny_server, tiny_dir):
    from ray import serve

    from tests.tiny_server import build_sharing

    autoscaling = {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 1, "metrics_interval_s": 0.5,
                   "look_back_period_s": 1.0, "upscale_delay_s": 0.5, "downscale_delay_s": 2.0}
    args = tiny_args(tiny_dir, denoiser_deployment={"autoscaling_config": autoscaling, "max_batch_size": 1, "max_ongoing_requests": 2,
                                                    "max_queued_requests": 64, "batch_wait_timeout_s": 0.0},
                     server={"max_inflight_images": 64})
    base = tiny_server.deploy("scaling", "/scaling", args, shared=SCALING_SHARES)

    def replicas():
        dep = serve.status().applications["scaling"].deployments["Denoiser"]
        return dep.replica_states.get("RUNNING", 0)

    assert replicas() == 1
    stop = time.time() + 90
    results, peak = [], 1
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        while time.time() < stop and peak < 2:
            batch = [pool.submit(_post, {"prompt": f"load {i}", "size": "128x128", "num_inference_steps": 6}, base) for i in range(6)]
            results += [f.result().status_code for f in batch]
            peak = max(peak, replicas())
    assert peak == 2, "denoiser never scaled to 2 replicas"
    assert results and set(results) == {200}, results  # nothing lost or refused while scaling

    # An upgrade that also downscales, as a RayService applies a new config: both autoscaled denoiser
    # replicas busy, then the app redeployed with one fixed replica (and a changed ingress config, so the
    # ingress is replaced too) while the requests are in flight. Serve stops the old replicas only after
    # they finish their work (graceful_shutdown_timeout_s, serve_app/config.py): every request completes.
    # 384² x 12 steps: 2-4 s an image on a 2-core runner, so all four stay in flight for several polls.
    fixed = {k: v for k, v in args["denoiser_deployment"].items() if k != "autoscaling_config"}
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        inflight = [pool.submit(_post, {"prompt": f"upgrade {i}", "size": "384x384", "num_inference_steps": 12, "seed": i}, base, 300)
                    for i in range(4)]
        # asked of the ingress itself: /v1/stats would also wait for a slot on the busy denoisers
        ingress = serve.get_deployment_handle("Ingress", app_name="scaling")
        wait_until(lambda: ingress.inflight.remote().result() == 4, 60, "four in flight")
        serve.run(build_sharing({**args, "server": {**args["server"], "max_inflight_images": 63},
                                 "denoiser_deployment": {**fixed, "num_replicas": 1}}, SCALING_SHARES),
                  name="scaling", route_prefix="/scaling", blocking=False)
        codes = [f.result().status_code for f in inflight]
    assert codes == [200] * 4, codes
    wait_until(lambda: replicas() == 1 and serve.status().applications["scaling"].status == "RUNNING", 120, "downscaled")
    assert _post({"prompt": "after the upgrade", "size": "64x64", "num_inference_steps": 1}, base=base).status_code == 200
    serve.delete("scaling")


def test_disconnected_client_frees_its_queued_work(serve_app):
    # A occupies the DiT; B queues behind it, then its client goes away. B's denoise must never run.
    before = _stats()["denoiser"]
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        # two 512² images x 20 steps: ~5 s of DiT on a 2-core runner (~0.12 s a step), far longer than B's 1 s patience
        a = pool.submit(_post, {"prompt": "long one", "n": 2, "size": "512x512", "num_inference_steps": 20})
        wait_until(lambda: _stats()["denoiser"]["forwards"] > before["forwards"], 60, "A on the DiT")
        with pytest.raises(httpx.TimeoutException):
            httpx.post(BASE + "/v1/images/generations", json={"prompt": "impatient", "size": "128x128", "num_inference_steps": 2},
                       timeout=1.0)
        assert a.result().status_code == 200
    # C, sent after B's client left: the DiT takes its queue in order, so B would have run by the time C is done
    assert _post({"prompt": "after", "size": "64x64", "num_inference_steps": 1}).status_code == 200
    assert _stats()["denoiser"]["requests"] - before["requests"] == 3  # A's two images and C, never B
