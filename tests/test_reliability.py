"""Issue 18 over real HTTP on a real local Ray Serve (CPU, tiny model): failures isolated in batches,
readiness apart from liveness and from the stages' queues, one OpenAI-shaped error contract with a body
limit and a schema that states the limits, a bound port refused at start."""

import concurrent.futures
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.tiny_server import BASE, tiny_args, wait_until

ROOT = Path(__file__).resolve().parents[1]
_wait = wait_until


@pytest.fixture(scope="module")
def serve_app(tiny_server):
    from ray import serve

    return serve


def _post(body, base=BASE, timeout=120):
    # json.dumps escapes a lone surrogate as \ud800, which JSON allows and Python decodes back to one
    return httpx.post(base + "/v1/images/generations", content=json.dumps(body), headers={"content-type": "application/json"},
                      timeout=timeout)


def _assert_openai_error(r, status, code=None, param="unset"):
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert body["error"]["message"]
    if code is not None:
        assert body["error"]["code"] == code, body
    if param != "unset":
        assert body["error"]["param"] == param, body
    for leak in ("Traceback", "pid=", "ip=", "actor_id", "\x1b[", "object at 0x"):
        assert leak not in r.text, r.text
    assert r.headers.get("x-request-id")  # Serve's request id, which a 500's message carries
    return body["error"]


def test_poison_prompts_fail_alone_in_a_concurrent_batch(serve_app):
    from serve_app.config import AppConfig
    from serve_app.prompt_limits import PromptLimits

    limits = PromptLimits(AppConfig.model_validate(tiny_args(serve_app_tiny_dir())))
    assert limits.max_tokens == 224  # the tiny DiT's RoPE: axes_lens[0] = 256, captions padded to 32
    long_prompt = "a red fox in the snow, " * 40  # ~900 characters, far inside max_prompt_chars=4000
    assert len(long_prompt) < 4000 and limits.count_tokens(long_prompt, "prompt") > limits.max_tokens
    poison = [{"prompt": long_prompt}, {"prompt": "a cat \ud800 on a mat"}, {"prompt": "x", "negative_prompt": long_prompt, "guidance_scale": 2}]
    good = [{"prompt": f"good prompt {i}", "seed": i} for i in range(7)]
    before = httpx.get(BASE + "/v1/stats", timeout=30).json()["denoiser"]["batch_sizes"]
    for p in poison:  # each poison with seven good requests at once (8: the ingress's max_inflight_images)
        bodies = [("bad", {**p, "size": "64x64", "num_inference_steps": 2, "seed": 1})]
        bodies += [("good", {**g, "size": "64x64", "num_inference_steps": 2}) for g in good]
        with concurrent.futures.ThreadPoolExecutor(len(bodies)) as pool:
            results = list(pool.map(lambda kb: (kb[0], _post(kb[1])), bodies))
        for kind, r in results:
            if kind == "good":
                assert r.status_code == 200, r.text
            else:
                err = _assert_openai_error(r, 400)
                assert err["param"] in ("prompt", "negative_prompt") and err["code"] in ("prompt_too_long", "invalid_value"), err
    after = httpx.get(BASE + "/v1/stats", timeout=30).json()["denoiser"]["batch_sizes"]
    assert any(int(k) > 1 and after[k] > before.get(k, 0) for k in after), (before, after)  # the good ones did batch
    # a prompt exactly at the limit still works
    at_limit = "a"
    while limits.count_tokens(at_limit + " a", "prompt") <= limits.max_tokens:
        at_limit += " a"
    assert _post({"prompt": at_limit, "size": "64x64", "num_inference_steps": 1}).status_code == 200


_TINY_DIR = {}


def serve_app_tiny_dir():
    return _TINY_DIR["dir"]


@pytest.fixture(autouse=True)
def _remember_tiny_dir(tiny_dir):
    _TINY_DIR["dir"] = tiny_dir


def test_every_error_is_openai_shaped(serve_app):
    _assert_openai_error(httpx.get(BASE + "/no/such/route"), 404, "not_found")
    _assert_openai_error(httpx.get(BASE + "/v1/images/generations"), 405, "method_not_allowed")
    _assert_openai_error(httpx.post(BASE + "/v1/images/generations", content=b"{nope", headers={"content-type": "application/json"}),
                         400, "invalid_json")
    _assert_openai_error(httpx.post(BASE + "/v1/images/generations", content=b"[1, 2]", headers={"content-type": "application/json"}), 400)
    _assert_openai_error(_post({"prompt": "x", "n": "three"}), 400, "invalid_value", "n")
    _assert_openai_error(_post({"prompt": "x", "user": "u" * 300}), 400, "invalid_value", "user")
    _assert_openai_error(_post({"prompt": "x", "size": "4096x4096"}), 400, "invalid_value", "size")
    # the body limit (server.max_body_bytes = 64 KiB here): declared length, and a chunked body
    _assert_openai_error(_post({"prompt": "x", "user": "u" * 200_000}), 413, "request_too_large")

    def chunks():
        yield b'{"prompt": "x", "user": "'
        for _ in range(100):
            yield b"u" * 1000
        yield b'"}'

    _assert_openai_error(httpx.post(BASE + "/v1/images/generations", content=chunks(), headers={"content-type": "application/json"}),
                         413, "request_too_large")
    # a multipart upload may be larger than max_body_bytes (a 1024² PNG is megabytes): room for an image and
    # a mask of server.max_upload_bytes each; its fields still go through the same validation
    import io

    import numpy as np
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (200, 200, 3), dtype=np.uint8)).save(buf, "PNG")
    assert 65536 < len(buf.getvalue()) < 150_000  # over max_body_bytes, under max_upload_bytes
    edit = httpx.post(BASE + "/v1/images/edits", files={"image": ("big.png", buf.getvalue(), "image/png")},
                      data={"prompt": "x", "size": "64x64", "num_inference_steps": "1"}, timeout=120)
    assert edit.status_code == 200, edit.text
    # the server still serves
    assert _post({"prompt": "after", "size": "64x64", "num_inference_steps": 1}).status_code == 200


def test_openapi_states_400_and_every_limit(serve_app):
    schema = httpx.get(BASE + "/openapi.json").json()
    text = json.dumps(schema)
    assert '"422"' not in text and "HTTPValidationError" not in text
    post = schema["paths"]["/v1/images/generations"]["post"]["responses"]
    assert {"200", "400", "413", "429", "503", "504"} <= set(post)
    assert post["400"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/Error"}
    props = schema["components"]["schemas"]["ImageGenerationRequest"]["properties"]
    args = tiny_args(serve_app_tiny_dir())["server"]
    assert props["prompt"]["maxLength"] == 4000 and props["prompt"]["minLength"] == 1
    assert "224 tokens" in props["prompt"]["description"]
    assert (props["n"]["minimum"], props["n"]["maximum"]) == (1, 8)
    steps = next(b for b in props["num_inference_steps"]["anyOf"] if b["type"] == "integer")
    assert (steps["minimum"], steps["maximum"]) == (1, 50)
    assert f"between 64 and {args['max_size']}" in props["size"]["description"]
    for f in ("user", "model", "quality", "style"):
        assert next(b for b in props[f]["anyOf"] if b["type"] == "string")["maxLength"] == 256
    assert schema["info"]["x-limits"]["max_body_bytes"] == 65536 and schema["info"]["x-limits"]["max_prompt_tokens"] == 224


def test_ready_stays_ready_at_twice_capacity(serve_app):
    # capacity: 8 images in flight at the ingress (max_inflight_images); drive 16 at once, continuously
    stop = False
    codes = []

    def load(i):
        while not stop:
            codes.append(_post({"prompt": f"load {i}", "size": "128x128", "num_inference_steps": 8}, timeout=300).status_code)

    probes = []
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        futures = [pool.submit(load, i) for i in range(16)]
        _wait(lambda: 429 in codes, 300, "at capacity")  # 8 images in flight, the rest turned away
        # each probe waits behind the turned-away loaders' 429s: 8 already span several DiT batches
        while len(probes) < 8:
            r = httpx.get(BASE + "/health/ready", timeout=10)  # a probe queued behind generation would time out here
            probes.append(r.status_code)
            assert httpx.get(BASE + "/health/live", timeout=10).status_code == 200
        stop = True
        for f in futures:
            f.result()
    assert probes == [200] * 8, probes
    assert set(codes) <= {200, 429}, codes
    assert 200 in codes


def test_wedged_denoiser_turns_unready_then_recovers(serve_app, tiny_dir):
    from ray import serve

    from tests.tiny_server import build_sharing

    # readiness off within 3 x (health_check_period_s + health_check_timeout_s) + health_refresh_s = 5.5 s here
    args = tiny_args(tiny_dir, denoiser_deployment={"health_check_period_s": 0.5, "health_check_timeout_s": 1.0},
                     server={"health_refresh_s": 1.0})
    serve.run(build_sharing(args, ("TextEncoder", "VaeDecoder")), name="wedge", route_prefix="/wedge")  # the root app's TE and VAE
    base = BASE + "/wedge"
    _wait(lambda: httpx.get(base + "/health/ready", timeout=10).status_code == 200, 240, "wedge app ready")
    pid = httpx.get(base + "/v1/stats", timeout=30).json()["denoiser"]["pid"]
    os.kill(pid, signal.SIGSTOP)  # the DiT replica stops answering (as a hung GPU or rank would)
    try:
        _wait(lambda: httpx.get(base + "/health/ready", timeout=10).status_code == 503, 60, "unready after the wedge")
        r = httpx.get(base + "/health/ready", timeout=10)
        _assert_openai_error(r, 503, "not_ready")
        assert httpx.get(base + "/health/live", timeout=10).status_code == 200  # alive, just not ready
    finally:
        try:
            os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:
            pass
    # Serve replaces the unhealthy replica; the app is ready again and serves
    _wait(lambda: httpx.get(base + "/health/ready", timeout=10).status_code == 200, 240, "ready again")
    assert _post({"prompt": "after", "size": "64x64", "num_inference_steps": 1}, base=base).status_code == 200
    serve.delete("wedge")


def test_serve_run_refuses_a_port_another_server_holds(tmp_path):
    import yaml

    other = socket.socket()
    other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)  # as a Ray Serve proxy binds
    other.bind(("127.0.0.1", 0))
    other.listen()
    port = other.getsockname()[1]
    cfg = yaml.safe_load((ROOT / "configs/tiny-cpu.yaml").read_text())
    cfg["http_options"].update(host="127.0.0.1", port=port)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    try:
        p = subprocess.run([sys.executable, "-m", "serve_app.serve_run", str(path)], cwd=ROOT, capture_output=True, text=True,
                           timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    finally:
        other.close()
    assert p.returncode != 0
    assert f"127.0.0.1:{port} is already bound by another server" in p.stderr + p.stdout

