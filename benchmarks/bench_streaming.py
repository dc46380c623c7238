"""What streaming costs, on one device, in one run: each preview kind alone, then one Serve app driven over
HTTP with and without `stream: true`.

  previews    in this process, before the server starts, at --size: the `latent_rgb` projection of one x0
              estimate on the DiT's device (serve_app/engines/previews.py; median of --preview-reps, device
              synchronised), the VAE decode of it (`vae` kind: the VAE engine of the config, its compile
              included in the warm-up), and on the CPU the ingress's part: scaling a preview to the image's
              size and encoding it (--format)
  server      one app from --config; for each mode (--modes, default: plain, stream0, stream3, stream3-vae;
              streamP = stream with partial_images P, latent_rgb previews unless -vae), --c1-requests at
              concurrency 1 and --cn-requests at --concurrency (default 20): latency median / p90 to the
              completed image, time to the first partial image, images / s. plain is the non-streamed
              request: what it costs is what the server costs without this feature (it does no preview work)

Everything goes to one JSON (--out), rewritten after every part.

    python benchmarks/bench_streaming.py --config configs/random-full-1gpu.yaml --out X.json
    python benchmarks/bench_streaming.py --config configs/tiny-cpu.yaml --size 256x256 --steps 4 --c1-requests 2 \\
        --cn-requests 4 --concurrency 2 --preview-reps 2 --port 19180 --out /tmp/streaming.json   # CPU smoke
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
for p in (HERE, HERE.parent):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import compare  # noqa: E402  (config loading, environment, timing helpers)

PROMPT = "a lighthouse on a cliff at dawn, waves, soft light, detailed"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", default="configs/random-full-1gpu.yaml")
    p.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE")
    p.add_argument("--size", default="1024x1024")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--format", default="jpeg", choices=["png", "jpeg", "webp"], help="output_format of every request")
    p.add_argument("--modes", default="plain,stream0,stream3,stream3-vae")
    p.add_argument("--preview-reps", type=int, default=20)
    p.add_argument("--skip-previews", action="store_true")
    p.add_argument("--warmup", type=int, default=2, help="requests per mode before it is measured")
    p.add_argument("--c1-requests", type=int, default=10)
    p.add_argument("--concurrency", type=int, default=20)
    p.add_argument("--cn-requests", type=int, default=60)
    p.add_argument("--port", type=int, default=None)
    p.add_argument("--server-start-timeout", type=float, default=900.0)
    p.add_argument("--commit", default=None)
    p.add_argument("--out", default=None)
    return p.parse_args(argv)


def _median_ms(times: list[float]) -> dict:
    s = sorted(times)
    return {"n": len(s), "median_ms": 1e3 * statistics.median(s), "min_ms": 1e3 * s[0], "max_ms": 1e3 * s[-1]}


def run_previews(app_args: dict, a) -> dict:
    import torch

    from serve_app.config import AppConfig
    from serve_app.engines.devices import resolve_device
    from serve_app.engines.previews import LatentRGB
    from serve_app.engines.vae import VaeEngine
    from serve_app.streaming import encode_preview

    cfg = AppConfig.model_validate(app_args)
    width, height = compare.parse_size(a.size)
    device = resolve_device(cfg.model)
    x0 = torch.randn(1, 16, height // 8, width // 8, device=device)
    out: dict = {"latent_hw": [height // 8, width // 8]}

    def timed(fn, reps):
        times = []
        for i in range(reps + 2):
            compare._sync(device)
            t = time.perf_counter()
            r = fn()
            compare._sync(device)
            if i >= 2:
                times.append(time.perf_counter() - t)
        return r, times

    project = LatentRGB(16, device)
    rgb, times = timed(lambda: project(x0).cpu(), a.preview_reps)
    out["latent_rgb_on_device"] = _median_ms(times)
    _, times = timed(lambda: encode_preview(rgb[0], width, height, a.format, cfg.server), a.preview_reps)
    out["latent_rgb_scale_and_encode_cpu"] = _median_ms(times)
    vae = VaeEngine(cfg.model, cfg.vae)
    try:
        for _ in range(3):  # compile / kernel selection for this shape
            vae.decode([x0[0].cpu()])
        pixels, times = timed(lambda: vae.decode([x0[0].cpu()])[0], a.preview_reps)
        out["vae_decode"] = _median_ms(times)
        _, times = timed(lambda: encode_preview(pixels, width, height, a.format, cfg.server), a.preview_reps)
        out["vae_encode_cpu"] = _median_ms(times)
    finally:
        del vae
        compare.free_memory()
    return out


def _request(base: str, a, mode: str, seed: int) -> dict:
    """One request; returns seconds to the completed image, to the first partial image, and the events."""
    import httpx

    body = {"prompt": PROMPT, "size": a.size, "num_inference_steps": a.steps, "seed": seed, "output_format": a.format}
    t = time.perf_counter()
    if mode == "plain":
        r = httpx.post(base + "/v1/images/generations", json=body, timeout=600)
        r.raise_for_status()
        return {"total_s": time.perf_counter() - t, "first_partial_s": None, "partials": 0,
                "timings": r.json()["data"][0]["timings"]}
    partial_images = int(mode.removeprefix("stream").removesuffix("-vae"))
    body.update(stream=True, partial_images=partial_images, preview_kind="vae" if mode.endswith("-vae") else "latent_rgb")
    first, partials, timings = None, 0, None
    with httpx.stream("POST", base + "/v1/images/generations", json=body, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data:"):
                continue
            kind = line[5:90].lstrip()  # `type` is each event's first key
            if kind.startswith('{"type":"image_generation.partial_image"'):
                partials += 1
                first = first or time.perf_counter() - t
            elif kind.startswith('{"type":"image_generation.completed"'):
                timings = json.loads(line[5:])["timings"]
            elif kind.startswith('{"type":"error"'):
                raise RuntimeError(line[:500])
    return {"total_s": time.perf_counter() - t, "first_partial_s": first, "partials": partials, "timings": timings}


def _summary(results: list[dict], wall: float | None = None) -> dict:
    totals = sorted(r["total_s"] for r in results)
    firsts = sorted(r["first_partial_s"] for r in results if r["first_partial_s"] is not None)
    out = {"n": len(totals), "median_s": statistics.median(totals), "p90_s": totals[min(len(totals) - 1, int(0.9 * len(totals)))],
           "partials_per_request": statistics.fmean(r["partials"] for r in results),
           "denoiser_s_median": statistics.median(r["timings"]["denoiser_s"] for r in results if r["timings"])}
    if firsts:
        out["first_partial_median_s"] = statistics.median(firsts)
    if wall is not None:
        out["wall_s"], out["images_per_s"] = wall, len(totals) / wall
    return out


def run_server(serve_cfg: dict, a, out: dict, save) -> dict:
    import asyncio

    import httpx
    import ray
    from ray import serve

    import bench_serving
    from serve_app.app import build_app

    port = a.port or serve_cfg["port"] or 8000
    base = f"http://127.0.0.1:{port}"
    ray.init(address="local", include_dashboard=False, log_to_driver=False)  # its own cluster, never one already running
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        t0 = time.perf_counter()
        serve.run(build_app(serve_cfg["args"]), name=serve_cfg["name"], route_prefix=serve_cfg["route_prefix"], blocking=False)
        if not asyncio.run(bench_serving.wait_ready(base, a.server_start_timeout)):
            raise TimeoutError(f"{base}/health not 200")
        out["start_to_healthy_s"] = time.perf_counter() - t0
        for mode in [m for m in a.modes.split(",") if m]:
            try:
                for i in range(a.warmup):
                    _request(base, a, mode, 1000 + i)
                c1 = [_request(base, a, mode, i) for i in range(a.c1_requests)]
                t = time.perf_counter()
                with ThreadPoolExecutor(a.concurrency) as pool:
                    cn = list(pool.map(lambda i: _request(base, a, mode, i), range(a.cn_requests)))
                out[mode] = {"c1": _summary(c1), f"c{a.concurrency}": _summary(cn, time.perf_counter() - t)}
            except Exception:
                out[mode] = {"error": traceback.format_exc()[-2000:]}
            save()
        out["denoiser_stats"] = {k: v for k, v in httpx.get(base + "/v1/stats", timeout=30).json()["denoiser"].items()
                                 if k in ("forwards", "batches", "requests", "forward_batch_sizes", "streams", "engine")}
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
    return out


def main(argv=None) -> dict:
    a = parse_args(argv)
    serve_cfg = compare.load_serve_config(a.config, a.set)
    result: dict = {"what": __doc__.split("\n\n")[0], "args": vars(a), "commit": compare.git_commit(a.commit),
                    "environment": compare.environment()}
    out = Path(a.out or HERE / "results" / f"streaming-{time.strftime('%Y%m%d-%H%M%S')}.json")

    def save():
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2, default=str))

    if not a.skip_previews:
        try:
            result["previews"] = run_previews(serve_cfg["args"], a)
        except Exception:
            result["previews"] = {"error": traceback.format_exc()[-2000:]}
        save()
    result["server"] = {}
    try:
        run_server(serve_cfg, a, result["server"], save)
    except Exception:
        result["server"]["error"] = traceback.format_exc()[-2000:]
    save()
    print(json.dumps({k: v for k, v in result.items() if k not in ("environment", "args")}, indent=2, default=str))
    print(f"wrote {out}", file=sys.stderr)
    return result


if __name__ == "__main__":
    main()
