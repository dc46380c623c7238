"""Operations and security against the shared tiny server: Prometheus metrics on Ray's endpoint, request
ids (the client's kept when safe, else a fresh one; in the header, error bodies and the access log), the
JSON access log, and API keys through OpenAI's own SDK."""

from __future__ import annotations

import glob
import json
import os
import time

import httpx
import pytest

from tests.tiny_server import BASE, METRICS_PORT, tiny_args

METRICS = f"http://127.0.0.1:{METRICS_PORT}/metrics"


def scrape() -> dict[tuple, float]:
    """Every sample of our metrics on Ray's endpoint: (name, sorted tags without Ray's per-process ones) ->
    value, summed over replicas."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[tuple, float] = {}
    for family in text_string_to_metric_families(httpx.get(METRICS, timeout=10).text):
        for s in family.samples:
            if not s.name.startswith("ray_zimage_"):
                continue
            tags = tuple(sorted((k, v) for k, v in s.labels.items() if k in ("route", "status", "stage", "batch_size", "application", "le")))
            out[(s.name, tags)] = out.get((s.name, tags), 0.0) + s.value
    return out


def value(samples: dict, name: str, **tags) -> float:
    """Sum of the samples of `name` whose tags include `tags`."""
    want = set(tags.items())
    return sum(v for (n, t), v in samples.items() if n == name and want <= set(t))


def poll(cond, timeout: float, what: str):
    """Ray exports metrics (and flushes logs) with a delay: poll until `cond()` is truthy; the deadline only
    guards against a hang."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = cond()
        if last:
            return last
        time.sleep(0.5)
    raise AssertionError(f"never: {what} (last: {last})")


def generate(body: dict, headers: dict | None = None, base: str = BASE) -> httpx.Response:
    return httpx.post(f"{base}/v1/images/generations", json={"size": "64x64", "num_inference_steps": 2, **body},
                      headers=headers, timeout=120)


def test_metrics_count_requests_images_and_stages(tiny_server):
    gen = "/v1/images/generations"

    def warmed_up():  # the readiness warm-up's image went through every stage: its metrics are out
        now = scrape()
        seen = [value(now, "ray_zimage_images_total", application="z-image", route=gen), value(now, "ray_zimage_dit_batch_size_count"),
                *(value(now, "ray_zimage_stage_batches_total", stage=s) for s in ("text_encoder", "denoiser", "vae_decode"))]
        return now if min(seen) >= 1 else None

    before = poll(warmed_up, 60, "the warm-up's metrics on Ray's endpoint")
    assert generate({"prompt": "a fox", "seed": 1}).status_code == 200
    assert generate({"prompt": "a fox", "seed": 2, "n": 2}).status_code == 200
    assert generate({"prompt": "a fox", "size": "65x64"}).status_code == 400

    def counted():
        now = scrape()
        d = lambda name, **tags: value(now, name, application="z-image", **tags) - value(before, name, application="z-image", **tags)  # noqa: E731
        got = {
            "ok": d("ray_zimage_requests_total", route=gen, status="200"),
            "bad": d("ray_zimage_requests_total", route=gen, status="400"),
            "images": d("ray_zimage_images_total", route=gen),
            **{stage: d("ray_zimage_latency_seconds_count", stage=stage) for stage in ("queue", "text_encoder", "denoiser", "vae", "encode", "total")},
            "dit_batches": d("ray_zimage_dit_batch_size_count"),
            "forwards": d("ray_zimage_dit_forwards_total"),
            "te_batches": d("ray_zimage_stage_batches_total", stage="text_encoder"),
            "vae_batches": d("ray_zimage_stage_batches_total", stage="vae_decode"),
        }
        want = {"ok": 2, "bad": 1, "images": 3, **dict.fromkeys(("queue", "text_encoder", "denoiser", "vae", "encode", "total"), 3)}
        done = all(got[k] == v for k, v in want.items()) and min(got["dit_batches"], got["te_batches"], got["vae_batches"]) >= 1
        return got if done else None

    got = poll(counted, 90, "the requests' metrics on Ray's endpoint")
    # 2 steps an image: the DiT ran between 2 (the three images in one batch) and 6 forwards, in 1 to 3 batches
    assert 2 <= got["forwards"] <= 6 and got["dit_batches"] <= 3 and got["te_batches"] <= 2, got
    now = scrape()
    # gauges exist (at 0 once the requests are answered); GPU memory only on GPU stages
    assert ("ray_zimage_inflight_images", (("application", "z-image"),)) in now
    assert any(n == "ray_zimage_dit_queued_requests" for n, _ in now)
    assert value(now, "ray_zimage_compiles_while_serving_total") == 0  # CPU: nothing compiles


def test_request_ids_header_error_body_and_access_log(tiny_server):
    import ray

    ok = generate({"prompt": "a fox", "seed": 3}, headers={"X-Request-Id": "client-id.42:a_b"})
    assert ok.status_code == 200 and ok.headers["x-request-id"] == "client-id.42:a_b"
    bad = generate({"prompt": "a fox", "n": 99}, headers={"X-Request-Id": "client-400"})
    assert bad.status_code == 400 and bad.headers["x-request-id"] == "client-400"
    err = bad.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["param"] == "n" and "request id client-400" in err["message"]
    for unsafe in ("x" * 129, "has space", "semi;colon", "ünï"):
        r = httpx.get(f"{BASE}/v1/models", headers={"X-Request-Id": unsafe.encode()}, timeout=30)
        rid = r.headers["x-request-id"]
        assert r.status_code == 200 and rid != unsafe and rid.startswith("req_") and len(rid) <= 128, rid
    fresh = httpx.get(f"{BASE}/v1/models", timeout=30).headers["x-request-id"]
    assert fresh

    logs = os.path.join(ray._private.worker._global_node.get_session_dir_path(), "logs")

    def access_lines():
        found = {}
        for path in glob.glob(os.path.join(logs, "worker-*.err")):
            with open(path, errors="replace") as f:
                for line in f:
                    if '"request_id":"client-' in line:
                        rec = json.loads(line[line.index("{"):])
                        found[rec["request_id"]] = rec
        return found if {"client-id.42:a_b", "client-400"} <= set(found) else None

    found = poll(access_lines, 60, "the access-log lines in the ingress's log")
    line = found["client-id.42:a_b"]
    assert line["route"] == "/v1/images/generations" and line["status"] == 200 and line["method"] == "POST"
    assert line["n"] == 1 and line["steps"] == 2 and line["size"] == "64x64" and line["bytes"] > 0
    assert set(line["timings"]) == {"text_encoder_s", "denoiser_s", "vae_s", "encode_s", "queue_s", "total_s", "lora_load_s"}
    assert found["client-400"]["status"] == 400 and "prompt" not in found["client-400"]


@pytest.fixture(scope="module")
def keyed(tiny_server, tiny_dir, tmp_path_factory):
    """An app with API keys, from a file and from the environment variable (set through the ingress's
    runtime_env, as a Kubernetes Secret would set it on the pod)."""
    keys = tmp_path_factory.mktemp("keys") / "api-keys"
    keys.write_text("# one key a line\nsk-from-file\n")
    args = tiny_args(tiny_dir, server={"api_keys_file": str(keys), "require_api_keys": True})
    args["ingress_deployment"]["ray_actor_options"]["runtime_env"] = {"env_vars": {"SERVE_APP_API_KEYS": "sk-env-1, sk-env-2"}}
    with tiny_server.front_door("keyed", args) as base:  # its readiness probe answered without a key
        yield base


def test_api_keys_with_openai_sdk(keyed):
    import openai

    for key in ("sk-from-file", "sk-env-2"):
        client = openai.OpenAI(base_url=f"{keyed}/v1", api_key=key, max_retries=0)
        img = client.images.generate(model="z-image-turbo", prompt="a fox", size="64x64", extra_body={"seed": 1, "num_inference_steps": 1})
        assert img.data[0].b64_json
    wrong = openai.OpenAI(base_url=f"{keyed}/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        wrong.images.generate(prompt="a fox", size="64x64")
    assert e.value.status_code == 401 and e.value.code == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()

    r = httpx.post(f"{keyed}/v1/images/generations", json={"prompt": "a fox"}, timeout=30)  # no key at all
    body = r.json()
    assert r.status_code == 401 and set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["code"] == "invalid_api_key" and r.headers["www-authenticate"].startswith("Bearer")
    assert r.headers["x-request-id"] in body["error"]["message"]
    schema = httpx.get(f"{keyed}/openapi.json", headers={"Authorization": "Bearer sk-env-1"}, timeout=30).json()
    gen = schema["paths"]["/v1/images/generations"]["post"]
    assert gen["security"] == [{"bearer": []}] and "401" in gen["responses"] and "security" not in schema["paths"]["/health/ready"]["get"]
    for probe in ("/health/live", "/health/ready", "/health"):
        assert httpx.get(keyed + probe, timeout=30).status_code == 200, probe
    assert httpx.get(f"{BASE}/v1/models", timeout=30).status_code == 200  # the root app has no keys


def test_readme_handle_example_runs_as_written(tiny_server, tmp_path):
    """README's Python handle block, as a user runs it on a machine of the cluster (RAY_ADDRESS names
    this session's Ray, as `ray.init(address="auto")` would find a lone local one)."""
    import re
    import subprocess
    import sys
    from pathlib import Path

    import ray
    from PIL import Image

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    m = re.search(r"<!-- handle-python:.*?-->\s*```python\n(.*?)```", readme, re.S)
    assert m
    code = m.group(1).replace("1024x1024", "64x64")  # the tiny server's sizes
    Image.new("RGB", (64, 64), (200, 80, 40)).save(tmp_path / "photo.png")
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    p = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    seed, timings = p.stdout.strip().splitlines()[-1].split(" ", 1)
    assert seed == "7" and "total_s" in timings
