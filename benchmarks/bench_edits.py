"""Image-to-image on one device, in one run: diffusers' `ZImageImg2ImgPipeline` (built from our components,
eager, the config's dtype) against our server's POST /v1/images/edits, bf16 and FP8 DiT, on the same
image, prompt, seed, strength and steps (default: 1024², strength 0.6, 8 steps: 5 DiT forwards).

  diffusers   median seconds of --runs img2img calls (after --warmup), output_type=pil
  server-*    one Serve app per variant (`--variants`, default bf16,fp8: denoiser.fp8 false / true), driven
              over HTTP (multipart, PNG upload) at concurrency 1 (--c1-requests) and at --concurrency
              (--cn-requests): latency median / p90, throughput; and the server's image for the first
              seed against diffusers' (mean absolute difference, PSNR): bf16 should match to rounding,
              FP8 by less

Everything goes to one JSON (--out), rewritten after every part.

    python benchmarks/bench_edits.py --config configs/random-full-1gpu.yaml \
        --out benchmarks/results/edits-h200-1024-s0.6-<commit>.json
    python benchmarks/bench_edits.py --config /tmp/tiny-cpu.yaml --size 64x64 --steps 2 --runs 1 --warmup 0 \
        --c1-requests 2 --cn-requests 2 --concurrency 2 --port 18804 --out /tmp/edits.json   # CPU smoke
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import statistics
import sys
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
for p in (HERE, HERE.parent):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import compare  # noqa: E402  (config loading, environment, timing helpers)

PROMPT = "a watercolour painting of a harbour at dawn, boats, soft light"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", default="configs/random-full-1gpu.yaml")
    p.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE")
    p.add_argument("--variants", default="bf16,fp8", help="server variants: bf16 (denoiser.fp8=false), fp8 (true)")
    p.add_argument("--skip-diffusers", action="store_true")
    p.add_argument("--size", default="1024x1024")
    p.add_argument("--strength", type=float, default=0.6)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--c1-requests", type=int, default=10)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--cn-requests", type=int, default=32)
    p.add_argument("--port", type=int, default=None)
    p.add_argument("--server-start-timeout", type=float, default=900.0)
    p.add_argument("--commit", default=None)
    p.add_argument("--out", default=None)
    return p.parse_args(argv)


def input_image(width: int, height: int) -> bytes:
    """A deterministic photo-like PNG: colour ramps, a few discs, mild noise."""
    from PIL import Image

    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    img = np.stack([255 * x / width, 255 * y / height, 128 + 90 * np.sin((x + y) / 40)], -1)
    for cx, cy, r in ((0.3, 0.4, 0.12), (0.7, 0.6, 0.18)):
        img[(x - cx * width) ** 2 + (y - cy * height) ** 2 < (r * width) ** 2] = (230, 200, 60)
    img += np.random.default_rng(0).normal(0, 6, img.shape)
    buf = io.BytesIO()
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB").save(buf, format="PNG")
    return buf.getvalue()


def run_diffusers(app_args: dict, a, image_png: bytes) -> tuple[dict, np.ndarray]:
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImageImg2ImgPipeline
    from PIL import Image

    from serve_app.config import AppConfig
    from serve_app.engines.devices import resolve_device, resolve_dtype
    from serve_app.engines.model_sources import load_scheduler_config, load_text_encoder, load_tokenizer, load_transformer, load_vae

    mc = AppConfig.model_validate(app_args).model
    device = resolve_device(mc)
    dtype = resolve_dtype(mc, device)
    pipe = ZImageImg2ImgPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler.from_config(load_scheduler_config(mc)), vae=load_vae(mc, device, dtype),
        text_encoder=load_text_encoder(mc, device, dtype), tokenizer=load_tokenizer(mc), transformer=load_transformer(mc, device, dtype),
    )
    pipe.set_progress_bar_config(disable=True)
    image = Image.open(io.BytesIO(image_png)).convert("RGB")
    times, first = [], None
    try:
        for i in range(a.warmup + a.runs):
            compare._sync(device)
            t = time.perf_counter()
            out = pipe(prompt=PROMPT, image=image, strength=a.strength, num_inference_steps=a.steps, guidance_scale=0.0,
                       generator=torch.Generator("cpu").manual_seed(a.seed), output_type="pil").images[0]
            compare._sync(device)
            if i >= a.warmup:
                times.append(time.perf_counter() - t)
            first = np.asarray(out) if first is None else first
            print(f"[diffusers] run {i + 1}: {time.perf_counter() - t:.3f} s", file=sys.stderr, flush=True)
        peak = compare._peak_and_reset(device)
    finally:
        del pipe
        compare.free_memory()
    return {"what": "diffusers ZImageImg2ImgPipeline, eager", "dtype": str(dtype), "peak_memory_bytes": peak,
            **compare._timing_summary(times)}, first


def _edit(base: str, image_png: bytes, a, seed: int):
    import httpx

    data = {"prompt": PROMPT, "strength": str(a.strength), "num_inference_steps": str(a.steps), "seed": str(seed), "size": a.size}
    t = time.perf_counter()
    r = httpx.post(base + "/v1/images/edits", files={"image": ("in.png", image_png, "image/png")}, data=data, timeout=600)
    r.raise_for_status()
    return time.perf_counter() - t, r.json()["data"][0]


def _latency(times: list[float]) -> dict:
    s = sorted(times)
    return {"n": len(s), "median_s": statistics.median(s), "p90_s": s[min(len(s) - 1, int(0.9 * len(s)))], "mean_s": statistics.fmean(s)}


def run_server(serve_cfg: dict, a, image_png: bytes, reference: np.ndarray | None) -> dict:
    import asyncio

    import ray
    from PIL import Image
    from ray import serve

    import bench_serving
    from serve_app.app import build_app

    port = a.port or serve_cfg["port"] or 8000
    base = f"http://127.0.0.1:{port}"
    ray.init(include_dashboard=False, log_to_driver=False)
    out: dict = {}
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        t0 = time.perf_counter()
        serve.run(build_app(serve_cfg["args"]), name=serve_cfg["name"], route_prefix=serve_cfg["route_prefix"], blocking=False)
        if not asyncio.run(bench_serving.wait_ready(base, a.server_start_timeout)):
            raise TimeoutError(f"{base}/health not 200")
        out["start_to_healthy_s"] = time.perf_counter() - t0
        for i in range(a.warmup):  # the edit path's first calls (VAE encode shapes, the DiT's 5-step schedule)
            _edit(base, image_png, a, a.seed + 1000 + i)
        dt, first = _edit(base, image_png, a, a.seed)
        c1 = [dt] + [_edit(base, image_png, a, a.seed + i)[0] for i in range(1, a.c1_requests)]
        out["c1"] = _latency(c1)
        t = time.perf_counter()
        with ThreadPoolExecutor(a.concurrency) as pool:
            cn = list(pool.map(lambda i: _edit(base, image_png, a, a.seed + i)[0], range(a.cn_requests)))
        wall = time.perf_counter() - t
        out["cN"] = {"concurrency": a.concurrency, **_latency(cn), "wall_s": wall, "images_per_s": a.cn_requests / wall}
        ours = np.asarray(Image.open(io.BytesIO(base64.b64decode(first["b64_json"]))).convert("RGB"))
        out["first_image"] = {"width": first["width"], "height": first["height"], "timings": first["timings"]}
        if reference is not None and reference.shape == ours.shape:
            mse = float(np.mean((ours.astype(np.float64) - reference.astype(np.float64)) ** 2))
            out["vs_diffusers"] = {"mean_abs_diff": float(np.mean(np.abs(ours.astype(int) - reference.astype(int)))),
                                   "max_abs_diff": int(np.max(np.abs(ours.astype(int) - reference.astype(int)))),
                                   "psnr_db": float("inf") if mse == 0 else float(10 * np.log10(255 ** 2 / mse))}
        import httpx

        out["denoiser_stats"] = {k: v for k, v in httpx.get(base + "/v1/stats", timeout=30).json()["denoiser"].items()
                                 if k in ("forwards", "batches", "requests", "forward_batch_sizes", "engine")}
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
    return out


def main(argv=None) -> dict:
    a = parse_args(argv)
    serve_cfg = compare.load_serve_config(a.config, a.set)
    width, height = compare.parse_size(a.size)
    image_png = input_image(width, height)
    result = {"what": __doc__.split("\n\n")[0], "args": vars(a), "commit": compare.git_commit(a.commit),
              "environment": compare.environment(), "forwards_per_edit": a.steps - int(a.steps - a.steps * a.strength)}
    out = Path(a.out or HERE / "results" / f"edits-{time.strftime('%Y%m%d-%H%M%S')}.json")

    def save():
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2, default=str))

    reference = None
    if not a.skip_diffusers:
        try:
            result["diffusers"], reference = run_diffusers(serve_cfg["args"], a, image_png)
        except Exception:
            result["diffusers"] = {"error": traceback.format_exc()[-2000:]}
        save()
    for variant in [v for v in a.variants.split(",") if v]:
        cfg = dict(serve_cfg, args=compare.apply_overrides(serve_cfg["args"], [f"denoiser.fp8={'true' if variant == 'fp8' else 'false'}"]))
        try:
            result[f"server-{variant}"] = run_server(cfg, a, image_png, reference)
        except Exception:
            result[f"server-{variant}"] = {"error": traceback.format_exc()[-2000:]}
        save()
        d, s = result.get("diffusers", {}).get("median_s"), result[f"server-{variant}"].get("c1", {}).get("median_s")
        if d and s:
            result[f"server-{variant}"]["c1_speedup_vs_diffusers"] = d / s
            save()
    print(json.dumps({k: v for k, v in result.items() if k not in ("environment", "args")}, indent=2, default=str))
    print(f"wrote {out}", file=sys.stderr)
    return result


if __name__ == "__main__":
    main()
