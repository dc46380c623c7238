"""One device run that compares, on the same GPU and the same weights:

  diffusers  plain diffusers `ZImagePipeline` built from our components (eager, the config's dtype,
             guidance 0, `num_inference_steps=steps`): what a user starts from. Median of --runs.
  pipeline   our in-process `serve_app.pipeline.StagedPipeline` with the config's settings.
  server     our Serve app (`serve.run(build_app(args))` in this process's Ray cluster), driven over
             HTTP by bench_serving.run_benchmark at concurrency 1 and at --concurrency (default 20).

and prints the ratios (server c=1 vs diffusers, serving overhead vs the in-process pipeline,
throughput at high concurrency). Everything goes to one JSON (--out), rewritten after every part so a
run cut short keeps what it measured. `--encode-bench` adds Pillow encode timings (PNG 0/1/6, JPEG q90,
WebP q90) of a 1024² noise image and a smooth image.

    python benchmarks/compare.py --config configs/random-full-1gpu.yaml --out benchmarks/results/x.json
    python benchmarks/compare.py --config configs/tiny-cpu.yaml --size 64x64 --steps 2 --runs 2 \
        --c1-requests 3 --cn-requests 6 --concurrency 3 --port 18802 --out /tmp/compare.json   # CPU smoke
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import io
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))
if str(HERE.parent) not in sys.path:
    sys.path.insert(0, str(HERE.parent))

import bench_serving  # noqa: E402

PARTS = ("diffusers", "pipeline", "server", "sizes")
# The Z-Image-Turbo Space's size menu (WIDTHxHEIGHT): standard, XL, max
SPACE_SIZES = ("1024x1024", "1344x768", "768x1344", "1152x896", "896x1152", "1536x640", "1216x832", "832x1216",
               "1536x1536", "1920x1088", "1088x1920", "1536x1152", "1152x1536",
               "2048x2048", "2048x1152", "1152x2048", "2048x1536", "1536x2048")


# ---------------------------------------------------------------------------------------------
# configuration
# ---------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", default="configs/random-full-1gpu.yaml", help="a `serve run` YAML (or bare AppConfig YAML)")
    p.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help="override an AppConfig field, value parsed as YAML (e.g. denoiser.compile=true); repeatable")
    p.add_argument("--only", default="diffusers,pipeline,server", help="comma-separated subset of " + ",".join(PARTS))
    p.add_argument("--size", default="1024x1024", help="WIDTHxHEIGHT")
    p.add_argument("--sizes", default=None, help="part `sizes`: comma-separated WIDTHxHEIGHT (default: the Space's 18)")
    p.add_argument("--sizes-n", type=int, default=1, help="part `sizes`: images per request (n)")
    p.add_argument("--steps", type=int, default=8, help="num_inference_steps = DiT forwards")
    p.add_argument("--runs", type=int, default=5, help="timed runs of diffusers and of the in-process pipeline")
    p.add_argument("--warmup", type=int, default=2, help="untimed runs before those")
    p.add_argument("--c1-requests", type=int, default=10, help="server requests at concurrency 1")
    p.add_argument("--concurrency", type=int, default=20, help="the high concurrency level")
    p.add_argument("--cn-requests", type=int, default=40, help="server requests at --concurrency")
    p.add_argument("--cn-warmup", type=int, default=4, help="warm-up requests (sent concurrently) before the high-concurrency run")
    p.add_argument("--output-format", default="png", choices=["png", "jpeg", "webp"], help="server output_format")
    p.add_argument("--prompt-file", default=str(bench_serving.DEFAULT_PROMPT_FILE))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--port", type=int, default=None, help="Serve HTTP port (default: the YAML's http_options.port, else 8000)")
    p.add_argument("--server-start-timeout", type=float, default=900.0, help="seconds to wait for /health")
    p.add_argument("--ray-num-cpus", type=int, default=None, help="ray.init(num_cpus=...); default: Ray's own count")
    p.add_argument("--ray-logs", action="store_true", help="stream the replicas' logs to this process (default: only in /tmp/ray)")
    p.add_argument("--encode-bench", action="store_true", help="also time Pillow encoding (reported separately)")
    p.add_argument("--encode-reps", type=int, default=5)
    p.add_argument("--commit", default=None, help="git commit of the code measured (the device copy may have no .git)")
    p.add_argument("--label", default=None, help="free text stored in the result")
    p.add_argument("--out", default=None, help="result JSON (default: benchmarks/results/compare-<time>.json)")
    args = p.parse_args(argv)
    args.only = [s.strip() for s in args.only.split(",") if s.strip()]
    bad = set(args.only) - set(PARTS)
    if bad:
        p.error(f"--only: unknown parts {sorted(bad)}")
    return args


def parse_size(size: str) -> tuple[int, int]:
    w, h = size.lower().split("x")
    return int(w), int(h)


def apply_overrides(app_args: dict, sets: list[str]) -> dict:
    """`["denoiser.compile=true", "model.seed=3"]` -> nested keys set in a copy of `app_args`."""
    out = copy.deepcopy(app_args)
    for item in sets:
        if "=" not in item:
            raise ValueError(f"--set {item!r}: expected KEY.PATH=VALUE")
        key, raw = item.split("=", 1)
        parts = [k for k in key.strip().split(".") if k]
        if not parts:
            raise ValueError(f"--set {item!r}: empty key")
        node = out
        for k in parts[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ValueError(f"--set {item!r}: {k} is not a mapping")
        node[parts[-1]] = yaml.safe_load(raw)
    return out


def load_serve_config(path: str, sets: list[str]) -> dict:
    """The app's `args` (overrides applied, validated as AppConfig) and how Serve should run it."""
    from serve_app.config import AppConfig

    data = yaml.safe_load(Path(path).read_text()) or {}
    http = data.get("http_options") or {}
    if "applications" in data:
        app = data["applications"][0]
        app_args, name, route = app.get("args") or {}, app.get("name", "z-image"), app.get("route_prefix", "/")
    else:
        app_args, name, route = data, "z-image", "/"
    app_args = apply_overrides(app_args, sets)
    AppConfig.model_validate(app_args)  # fail here, with the key named, not inside a replica
    return {"args": app_args, "name": name, "route_prefix": route, "port": http.get("port", 8000)}


# ---------------------------------------------------------------------------------------------
# environment
# ---------------------------------------------------------------------------------------------
def git_commit(given: str | None) -> str | None:
    if given:
        return given
    if os.environ.get("GIT_COMMIT"):
        return os.environ["GIT_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=HERE.parent, capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except Exception:
        return None


def environment() -> dict:
    import torch

    env: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform()}
    for mod in ("diffusers", "transformers", "ray", "PIL", "torchao"):
        try:
            env[mod] = __import__(mod).__version__
        except Exception:
            env[mod] = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update(device=torch.cuda.get_device_name(0), device_count=torch.cuda.device_count(),
                   device_memory_bytes=props.total_memory, cuda=torch.version.cuda)
    else:
        env.update(device=f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)", device_count=0)
    return env


def free_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_and_reset(device) -> int | None:
    import torch

    if device.type != "cuda":
        return None
    peak = torch.cuda.max_memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    return peak


def _timing_summary(times: list[float]) -> dict:
    return {"median_s": statistics.median(times), "mean_s": statistics.fmean(times), "min_s": min(times),
            "max_s": max(times), "runs_s": times}


# ---------------------------------------------------------------------------------------------
# the three parts
# ---------------------------------------------------------------------------------------------
def run_diffusers(app_args: dict, a: argparse.Namespace, prompts: list[str]) -> dict:
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline

    from serve_app.config import AppConfig
    from serve_app.engines.devices import resolve_device, resolve_dtype
    from serve_app.engines.model_sources import load_scheduler_config, load_text_encoder, load_tokenizer, load_transformer, load_vae

    mc = AppConfig.model_validate(app_args).model
    device = resolve_device(mc)
    dtype = resolve_dtype(mc, device)
    width, height = parse_size(a.size)
    t0 = time.perf_counter()
    pipe = ZImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler.from_config(load_scheduler_config(mc)),
        vae=load_vae(mc, device, dtype),
        text_encoder=load_text_encoder(mc, device, dtype),
        tokenizer=load_tokenizer(mc),
        transformer=load_transformer(mc, device, dtype),
    )
    pipe.set_progress_bar_config(disable=True)
    _sync(device)
    build_s = time.perf_counter() - t0
    _peak_and_reset(device)
    times = []
    try:
        for i in range(a.warmup + a.runs):
            _sync(device)
            t = time.perf_counter()
            pipe(prompt=prompts[i % len(prompts)], height=height, width=width, num_inference_steps=a.steps, guidance_scale=0.0,
                 generator=torch.Generator("cpu").manual_seed(a.seed + i), output_type="pil")
            _sync(device)
            if i >= a.warmup:
                times.append(time.perf_counter() - t)
            print(f"[diffusers] run {i + 1}/{a.warmup + a.runs}: {time.perf_counter() - t:.3f} s", file=sys.stderr, flush=True)
        peak = _peak_and_reset(device)
    finally:
        del pipe
        free_memory()
    return {"what": "diffusers ZImagePipeline, eager, output_type=pil", "device": str(device), "dtype": str(dtype),
            "build_s": build_s, "peak_memory_bytes": peak, **_timing_summary(times)}


def run_pipeline(app_args: dict, a: argparse.Namespace, prompts: list[str]) -> dict:
    from serve_app.config import AppConfig
    from serve_app.pipeline import StagedPipeline

    cfg = AppConfig.model_validate(app_args)
    width, height = parse_size(a.size)
    t0 = time.perf_counter()
    pipe = StagedPipeline(cfg)
    device = pipe.denoiser.device
    _sync(device)
    build_s = time.perf_counter() - t0
    # what each replica does at start: every padded prompt length (and its CUDA graphs), the DiT at this size
    pipe.text_encoder.warmup()
    pipe.denoiser.warmup([(height, width)])
    _sync(device)
    warmup_s = time.perf_counter() - t0 - build_s
    _peak_and_reset(device)
    times, stages = [], []
    try:
        for i in range(a.warmup + a.runs):
            _sync(device)
            t = time.perf_counter()
            [img] = pipe.generate([prompts[i % len(prompts)]], [a.seed + i], height=height, width=width, steps=a.steps)
            _sync(device)
            if i >= a.warmup:
                times.append(time.perf_counter() - t)
                stages.append(img.timings_s)
            print(f"[pipeline] run {i + 1}/{a.warmup + a.runs}: {time.perf_counter() - t:.3f} s", file=sys.stderr, flush=True)
        peak = _peak_and_reset(device)
        accel = pipe.denoiser.info()
    finally:
        del pipe
        free_memory()
    stage_median = {k: statistics.median(s[k] for s in stages) for k in stages[0]} if stages else {}
    return {"what": "serve_app.pipeline.StagedPipeline (no image encoding)", "device": str(device), "build_s": build_s, "warmup_s": warmup_s,
            "acceleration": accel, "peak_memory_bytes": peak, "stage_median_s": stage_median, **_timing_summary(times)}


@contextlib.contextmanager
def serving(serve_cfg: dict, a: argparse.Namespace):
    """A running server (this process's Ray): yields its base URL and a dict with its start-up times."""
    import ray
    from ray import serve

    from serve_app.app import build_app

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    port = a.port or serve_cfg["port"] or 8000
    base = f"http://127.0.0.1:{port}"
    out: dict[str, Any] = {"base_url": base, "app_name": serve_cfg["name"]}
    t0 = time.perf_counter()
    init_kw: dict[str, Any] = {"include_dashboard": False, "log_to_driver": a.ray_logs}
    if a.ray_num_cpus:
        init_kw["num_cpus"] = a.ray_num_cpus
    ray.init(**init_kw)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        out["ray_start_s"] = time.perf_counter() - t0
        serve.run(build_app(serve_cfg["args"]), name=serve_cfg["name"], route_prefix=serve_cfg["route_prefix"], blocking=False)
        import asyncio

        if not asyncio.run(bench_serving.wait_ready(base, a.server_start_timeout)):
            raise TimeoutError(f"{base}/health not 200 within {a.server_start_timeout} s")
        out["start_to_healthy_s"] = time.perf_counter() - t0  # deploy + model builds + the /health warm-up
        print(f"[server] healthy after {out['start_to_healthy_s']:.1f} s", file=sys.stderr, flush=True)
        try:  # each replica's own start: build (load, FP8, compile wrappers) and warm-up (where compiling happens)
            stats = _stats(base)
            out["replica_startup_s"] = {k: {**v["startup_s"], "compiles": v.get("startup_compiles")}  # compile: seconds of it compiling
                                        for k, v in stats.items() if isinstance(v, dict) and "startup_s" in v}
            print(f"[server] replica startup: {out['replica_startup_s']}", file=sys.stderr, flush=True)
        except Exception as e:
            out["replica_startup_s"] = {"error": repr(e)[:200]}
        yield base, out
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()


def _stats(base: str) -> dict:
    import urllib.request

    with urllib.request.urlopen(base + "/v1/stats", timeout=30) as resp:
        return json.loads(resp.read())


def run_server(serve_cfg: dict, a: argparse.Namespace) -> dict:
    with serving(serve_cfg, a) as (base, out):
        common = dict(base_url=base, size=a.size, steps=a.steps, output_format=a.output_format, prompt_file=a.prompt_file,
                      seed=a.seed, disable_tqdm=True, request_timeout=600.0)
        out["c1"] = bench_serving.run_benchmark(dict(common, num_prompts=a.c1_requests, max_concurrency=1, warmup_requests=a.warmup,
                                                     label="server c=1"))
        out["cN"] = bench_serving.run_benchmark(dict(common, num_prompts=a.cn_requests, max_concurrency=a.concurrency,
                                                     warmup_requests=a.cn_warmup, label=f"server c={a.concurrency}"))
    return out


def _stage_memory_and_compiles(stats: dict) -> dict:
    keep = ("peak_memory_bytes", "startup_peak_memory_bytes", "memory_in_use_bytes", "compile")
    return {stage: {k: stats[stage].get(k) for k in keep} for stage in ("text_encoder", "denoiser", "vae") if stage in stats}


def run_sizes(serve_cfg: dict, a: argparse.Namespace) -> dict:
    """The Space's size menu, in order, on one fresh server: each size's first request and a second one
    (c=1, per-stage timings from the response), and each stage's compiles and memory after each size."""
    import httpx

    sizes = a.sizes.split(",") if a.sizes else list(SPACE_SIZES)
    with serving(serve_cfg, a) as (base, out):
        out["sizes"] = []
        with httpx.Client(timeout=600.0) as client:
            for size in sizes:
                entry: dict[str, Any] = {"size": size, "n": a.sizes_n}
                for which in ("first", "second"):
                    body = {"prompt": "a lighthouse on a cliff at dawn, detailed", "size": size, "seed": 1, "n": a.sizes_n,
                            "num_inference_steps": a.steps, "output_format": a.output_format}
                    t = time.perf_counter()
                    r = client.post(base + "/v1/images/generations", json=body)
                    wall = time.perf_counter() - t
                    entry[which] = {"status": r.status_code, "wall_s": wall,
                                    "timings": r.json()["data"][0]["timings"] if r.status_code == 200 else r.text[:300]}
                entry["after"] = _stage_memory_and_compiles(_stats(base))
                first, second = entry["first"]["wall_s"], entry["second"]["wall_s"]
                print(f"[sizes] {size}: first {first:.2f} s, second {second:.2f} s ({first / second:.2f}x)", file=sys.stderr, flush=True)
                out["sizes"].append(entry)
    return out


def run_encode_bench(reps: int, size: int = 1024) -> dict:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    smooth = np.stack([128 + 100 * np.sin(6 * xx + 2 * yy), 128 + 100 * np.cos(4 * yy), 255 * xx * yy], -1).clip(0, 255).astype(np.uint8)
    codecs = {
        "png_level0": dict(format="PNG", compress_level=0),
        "png_level1": dict(format="PNG", compress_level=1),
        "png_level6": dict(format="PNG", compress_level=6),
        "jpeg_q90": dict(format="JPEG", quality=90),
        "webp_q90_method0": dict(format="WEBP", quality=90, method=0),  # what the server uses
        "webp_q90_method4": dict(format="WEBP", quality=90, method=4),  # Pillow's default method
    }
    out: dict[str, Any] = {"size": f"{size}x{size}", "reps": reps, "pillow": __import__("PIL").__version__}
    for name, pixels in (("noise", noise), ("smooth", smooth)):
        img = Image.fromarray(pixels, mode="RGB")
        res = {}
        for codec, kw in codecs.items():
            times, nbytes = [], 0
            for _ in range(reps):
                buf = io.BytesIO()
                t = time.perf_counter()
                img.save(buf, **kw)
                times.append(time.perf_counter() - t)
                nbytes = buf.tell()
            res[codec] = {"median_ms": 1000 * statistics.median(times), "min_ms": 1000 * min(times), "bytes": nbytes}
        out[name] = res
    return out


# ---------------------------------------------------------------------------------------------
# summary
# ---------------------------------------------------------------------------------------------
def _get(d: Any, *path):
    for k in path:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def ratios(result: dict, concurrency: int) -> dict:
    diff = _get(result, "parts", "diffusers", "median_s")
    pipe = _get(result, "parts", "pipeline", "median_s")
    c1 = _get(result, "parts", "server", "c1", "latency_s", "median")
    c1_encode = _get(result, "parts", "server", "c1", "stage_timings_s", "encode_s", "median")
    cn_ips = _get(result, "parts", "server", "cN", "image_throughput_ips")
    out: dict[str, Any] = {
        "diffusers_median_s": diff,
        "pipeline_median_s": pipe,
        "server_c1_median_s": c1,
        "server_c1_encode_median_s": c1_encode,
        f"server_c{concurrency}_images_per_s": cn_ips,
        f"server_c{concurrency}_latency_median_s": _get(result, "parts", "server", "cN", "latency_s", "median"),
        f"server_c{concurrency}_latency_p99_s": _get(result, "parts", "server", "cN", "latency_s", "p99"),
    }
    # > 1: faster than diffusers
    out["speedup_pipeline_vs_diffusers"] = diff / pipe if diff and pipe else None
    out["speedup_server_c1_vs_diffusers"] = diff / c1 if diff and c1 else None
    # what serving adds over the same engines in one process (HTTP, Ray handles, queues, encode, base64)
    out["serving_overhead_pct"] = 100 * (c1 / pipe - 1) if c1 and pipe else None
    out["serving_overhead_excl_encode_pct"] = 100 * ((c1 - c1_encode) / pipe - 1) if c1 and pipe and c1_encode is not None else None
    # throughput at high concurrency vs diffusers run back to back (1 / its latency)
    out[f"throughput_c{concurrency}_vs_diffusers"] = cn_ips * diff if cn_ips and diff else None
    return out


def print_summary(result: dict, concurrency: int, file=None) -> None:
    file = file or sys.stdout
    r = result["ratios"]

    def row(k, v, unit=""):
        s = "-" if v is None else (f"{v:.3f}{unit}" if isinstance(v, float) else f"{v}{unit}")
        print(f"{k:<46}{s:>18}", file=file)

    print("\n" + " compare ".center(64, "="), file=file)
    row("device:", result["environment"].get("device"))
    row("commit:", (result.get("commit") or "-")[:12])
    row("size / steps:", f"{result['settings']['size']} / {result['settings']['steps']}")
    for part in PARTS:
        err = _get(result, "parts", part, "error")
        if err:
            row(f"{part}:", "FAILED (see JSON)")
    row("diffusers median latency:", r["diffusers_median_s"], " s")
    row("pipeline median latency:", r["pipeline_median_s"], " s")
    row("server c=1 median latency:", r["server_c1_median_s"], " s")
    row("  of which image encode:", r["server_c1_encode_median_s"], " s")
    row(f"server c={concurrency} throughput:", r[f"server_c{concurrency}_images_per_s"], " img/s")
    row(f"server c={concurrency} median latency:", r[f"server_c{concurrency}_latency_median_s"], " s")
    row("speedup pipeline vs diffusers:", r["speedup_pipeline_vs_diffusers"], "x")
    row("speedup server c=1 vs diffusers:", r["speedup_server_c1_vs_diffusers"], "x")
    row("serving overhead vs pipeline:", r["serving_overhead_pct"], " %")
    row("  excluding image encode:", r["serving_overhead_excl_encode_pct"], " %")
    row(f"throughput c={concurrency} vs diffusers:", r[f"throughput_c{concurrency}_vs_diffusers"], "x")
    enc = result.get("encode_bench")
    if isinstance(enc, dict) and "noise" in enc:
        print(" Pillow encode, median ms (bytes): noise | smooth ".center(64, "-"), file=file)
        for codec in enc["noise"]:
            n, s = enc["noise"][codec], enc["smooth"][codec]
            print(f"{codec:<22}{n['median_ms']:>8.1f} ({n['bytes']:>8}) | {s['median_ms']:>7.1f} ({s['bytes']:>8})", file=file)
    print("=" * 64, file=file)


def main(argv: list[str] | None = None) -> dict:
    a = parse_args(argv)
    started = time.time()
    serve_cfg = load_serve_config(a.config, a.set)
    out_path = Path(a.out or HERE / "results" / f"compare-{time.strftime('%Y%m%d-%H%M%S')}.json")
    prompts = bench_serving.sample_prompts(bench_serving.load_prompts(a.prompt_file), max(a.warmup + a.runs, 1), a.seed)
    result: dict[str, Any] = {
        "label": a.label,
        "command": " ".join(shlex.quote(x) for x in [sys.executable, *sys.argv]) if argv is None else shlex.join(["compare.py", *argv]),
        "commit": git_commit(a.commit),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "environment": environment(),
        "settings": {k: v for k, v in vars(a).items()},
        "app_args": serve_cfg["args"],
        "parts": {},
    }

    def save():
        result["ratios"] = ratios(result, a.concurrency)
        result["elapsed_s"] = time.time() - started
        bench_serving.write_json(result, out_path)

    if a.encode_bench:
        result["encode_bench"] = run_encode_bench(a.encode_reps)
        save()
    runners = {
        "diffusers": lambda: run_diffusers(serve_cfg["args"], a, prompts),
        "pipeline": lambda: run_pipeline(serve_cfg["args"], a, prompts),
        "server": lambda: run_server(serve_cfg, a),
        "sizes": lambda: run_sizes(serve_cfg, a),
    }
    for part in PARTS:
        if part not in a.only:
            continue
        print(f"[compare] {part} ...", file=sys.stderr, flush=True)
        t = time.perf_counter()
        try:
            result["parts"][part] = runners[part]()
        except Exception as e:  # keep going: the other parts are still worth having
            traceback.print_exc()
            result["parts"][part] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-4000:]}
        result["parts"][part]["part_wall_s"] = time.perf_counter() - t
        free_memory()
        save()
    save()
    print_summary(result, a.concurrency)
    print(f"[compare] wrote {out_path}", file=sys.stderr)
    return result


if __name__ == "__main__":
    res = main()
    sys.exit(1 if any("error" in p for p in res["parts"].values()) else 0)
