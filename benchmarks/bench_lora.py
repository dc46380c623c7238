"""What LoRA adapters cost on one device, in one run: the server at concurrency 1 with a random rank-R
adapter (default 64) on every attention and MLP linear of the DiT against no adapter, with a bf16 and an
FP8 DiT, and what the first request that loads an adapter costs.

Per variant (`--variants`, default bf16,fp8: denoiser.fp8 false / true):

  off         a server with LoRA off (`lora.enabled` false: no side paths in the DiT), c=1 latency
  on          a server with LoRA on (`lora.max_rank` = R), in this order:
    first     the first request naming the adapter (it is read on the replica: `timings.lora_load_s`)
    none      c=1 requests without an adapter (the side paths compute zeros: their cost with nothing on)
    adapter   c=1 requests with the adapter
    switch    c=1 requests alternating two adapters (each request writes the other into the side paths)
    compiles  torch.compile work while serving, from /v1/stats (must stay 0: switching changes no graph)

The adapters are built here, in diffusers' LoRA format (serve_app.engines.tiny_model.build_lora_adapter:
seeded random A and B, alpha = 2 x rank), into a temporary `lora.dir`. One Ray cluster and Serve instance
for the whole run, one app at a time (deleted, its replicas and their device memory gone, before the next).
Everything goes to one JSON (--out), rewritten after every part.

    python benchmarks/bench_lora.py --config configs/random-full-1gpu.yaml \
        --out benchmarks/results/lora-h200-1024-r64-<commit>.json
    python benchmarks/bench_lora.py --config configs/tiny-cpu.yaml --size 64x64 --steps 2 --rank 4 \
        --c1-requests 2 --warmup 1 --variants bf16 --port 19240 --out /tmp/lora.json   # CPU smoke
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
for p in (HERE, HERE.parent):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import compare  # noqa: E402  (config loading, environment, the serving() context manager)

PROMPT = "a watercolour painting of a harbour at dawn, boats, soft light"
ADAPTERS = ("bench-a", "bench-b")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", default="configs/random-full-1gpu.yaml")
    p.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE")
    p.add_argument("--variants", default="bf16,fp8", help="bf16 (denoiser.fp8=false), fp8 (true)")
    p.add_argument("--skip-off", action="store_true", help="no LoRA-off server (the side paths' cost with nothing on is then unmeasured)")
    p.add_argument("--size", default="1024x1024")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--std", type=float, default=0.01, help="std of the random A and B")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--warmup", type=int, default=2, help="untimed requests before each timed c=1 part")
    p.add_argument("--c1-requests", type=int, default=10)
    p.add_argument("--port", type=int, default=None)
    p.add_argument("--server-start-timeout", type=float, default=900.0)
    p.add_argument("--ray-num-cpus", type=int, default=None)
    p.add_argument("--ray-logs", action="store_true")
    p.add_argument("--commit", default=None)
    p.add_argument("--out", default=None)
    return p.parse_args(argv)


def build_adapters(app_args: dict, folder: Path, rank: int, std: float, seed: int) -> dict:
    import torch

    from serve_app.config import AppConfig
    from serve_app.engines.model_sources import load_transformer_config
    from serve_app.engines.tiny_model import LORA_TARGETS, build_lora_adapter

    tcfg = load_transformer_config(AppConfig.model_validate(app_args).model)
    t = time.perf_counter()
    sizes = {}
    for i, name in enumerate(ADAPTERS):
        path = build_lora_adapter(folder, name, tcfg, rank=rank, seed=seed + i, std=std, targets=LORA_TARGETS, dtype=torch.bfloat16)
        sizes[name] = path.stat().st_size
    return {"rank": rank, "targets": LORA_TARGETS, "file_bytes": sizes, "build_s": time.perf_counter() - t}


def _generate(base: str, a, seed: int, lora=None) -> tuple[float, dict]:
    import httpx

    body = {"prompt": PROMPT, "size": a.size, "seed": seed, "num_inference_steps": a.steps, "output_format": "jpeg"}
    if lora is not None:
        body["lora"] = lora
    t = time.perf_counter()
    r = httpx.post(base + "/v1/images/generations", json=body, timeout=600)
    r.raise_for_status()
    return time.perf_counter() - t, r.json()["data"][0]


def _c1(base: str, a, lora_for) -> dict:
    """--warmup untimed, then --c1-requests timed requests, one at a time; `lora_for(i)` is request i's."""
    for i in range(a.warmup):
        _generate(base, a, a.seed + 1000 + i, lora_for(i))
    times, timings = [], []
    for i in range(a.c1_requests):
        dt, item = _generate(base, a, a.seed + i, lora_for(i))
        times.append(dt)
        timings.append(item["timings"])
    s = sorted(times)
    return {"n": len(s), "median_s": statistics.median(s), "p90_s": s[min(len(s) - 1, int(0.9 * len(s)))],
            "mean_s": statistics.fmean(s), "runs_s": times,
            "denoiser_median_s": statistics.median(t["denoiser_s"] for t in timings),
            "lora_load_s_max": max(t.get("lora_load_s", 0.0) for t in timings)}


def _denoiser_stats(base: str) -> dict:
    import httpx

    d = httpx.get(base + "/v1/stats", timeout=30).json()["denoiser"]
    return {k: d.get(k) for k in ("compile", "lora", "peak_memory_bytes", "memory_in_use_bytes", "engine")}


@contextlib.contextmanager
def cluster(a, port: int):
    """One Ray cluster and one Serve instance (HTTP on `port`) for every variant."""
    import ray
    from ray import serve

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    kw = {"include_dashboard": False, "log_to_driver": a.ray_logs}
    if a.ray_num_cpus:
        kw["num_cpus"] = a.ray_num_cpus
    ray.init(**kw)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        yield f"http://127.0.0.1:{port}"
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()


@contextlib.contextmanager
def serving(serve_cfg: dict, a, base: str):
    """The app running (healthy) in the cluster; deleted on the way out."""
    import asyncio

    from ray import serve

    import bench_serving
    from serve_app.app import build_app

    t0 = time.perf_counter()
    serve.run(build_app(serve_cfg["args"]), name=serve_cfg["name"], route_prefix=serve_cfg["route_prefix"], blocking=False)
    try:
        if not asyncio.run(bench_serving.wait_ready(base, a.server_start_timeout)):
            raise TimeoutError(f"{base}/health not 200 within {a.server_start_timeout} s")
        started = {"start_to_healthy_s": time.perf_counter() - t0}
        print(f"[server] healthy after {started['start_to_healthy_s']:.1f} s", file=sys.stderr, flush=True)
        yield started
    finally:
        serve.delete(serve_cfg["name"])  # waits until its replicas are gone


def run_variant(serve_cfg: dict, a, base: str, lora: bool) -> dict:
    out: dict = {}
    with serving(serve_cfg, a, base) as started:
        out["server"] = started
        if not lora:
            out["none"] = _c1(base, a, lambda i: None)
        else:
            dt, item = _generate(base, a, a.seed, ADAPTERS[0])  # the replica reads the adapter here
            out["first"] = {"latency_s": dt, "lora_load_s": item["timings"].get("lora_load_s"), "timings": item["timings"]}
            out["none"] = _c1(base, a, lambda i: None)
            out["adapter"] = _c1(base, a, lambda i: ADAPTERS[0])
            _generate(base, a, a.seed, ADAPTERS[1])  # load the second before timing switches
            out["switch"] = _c1(base, a, lambda i: ADAPTERS[i % 2])
        out["denoiser"] = _denoiser_stats(base)
    return out


def summarize(result: dict) -> dict:
    out = {}
    for variant in ("bf16", "fp8"):
        on, off = result.get(f"{variant}-lora-on", {}), result.get(f"{variant}-lora-off", {})
        med = lambda part, d=on: (d.get(part) or {}).get("median_s")  # noqa: E731
        row = {"off_s": med("none", off), "on_none_s": med("none"), "on_adapter_s": med("adapter"), "on_switch_s": med("switch"),
               "first_request_s": (on.get("first") or {}).get("latency_s"), "first_lora_load_s": (on.get("first") or {}).get("lora_load_s"),
               "compiles_while_serving": ((on.get("denoiser") or {}).get("compile") or {}).get("compiles_while_serving")}
        if row["on_adapter_s"] and row["off_s"]:
            row["adapter_vs_off"] = row["on_adapter_s"] / row["off_s"]
        if row["on_none_s"] and row["off_s"]:
            row["side_path_idle_vs_off"] = row["on_none_s"] / row["off_s"]
        if any(v is not None for v in row.values()):
            out[variant] = row
    if out.get("fp8", {}).get("on_adapter_s") and out.get("bf16", {}).get("on_adapter_s"):
        out["fp8_vs_bf16_with_adapter"] = out["fp8"]["on_adapter_s"] / out["bf16"]["on_adapter_s"]
    return out


def main(argv=None) -> dict:
    a = parse_args(argv)
    serve_cfg = compare.load_serve_config(a.config, a.set)
    result = {"what": __doc__.split("\n\n")[0], "args": vars(a), "commit": compare.git_commit(a.commit), "environment": compare.environment()}
    out = Path(a.out or HERE / "results" / f"lora-{time.strftime('%Y%m%d-%H%M%S')}.json")

    def save():
        out.parent.mkdir(parents=True, exist_ok=True)
        result["summary"] = summarize(result)
        out.write_text(json.dumps(result, indent=2, default=str))

    with tempfile.TemporaryDirectory(prefix="bench-loras-") as folder, cluster(a, a.port or serve_cfg["port"] or 8000) as base:
        result["adapters"] = build_adapters(serve_cfg["args"], Path(folder), a.rank, a.std, a.seed)
        save()
        for variant in [v for v in a.variants.split(",") if v]:
            fp8 = f"denoiser.fp8={'true' if variant == 'fp8' else 'false'}"
            for lora in ([False] if not a.skip_off else []) + [True]:
                sets = [fp8, f"lora.enabled={'true' if lora else 'false'}"]
                if lora:
                    sets += [f"lora.dir={folder}", f"lora.max_rank={a.rank}"]
                cfg = dict(serve_cfg, args=compare.apply_overrides(serve_cfg["args"], sets))
                key = f"{variant}-lora-{'on' if lora else 'off'}"
                try:
                    result[key] = run_variant(cfg, a, base, lora)
                except Exception:
                    result[key] = {"error": traceback.format_exc()[-2000:]}
                save()
    print(json.dumps(result["summary"], indent=2, default=str))
    print(f"wrote {out}", file=sys.stderr)
    return result


if __name__ == "__main__":
    main()
