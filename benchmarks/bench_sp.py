"""Sequence-parallel DiT on one host: per-forward and end-to-end denoise latency for SP 1, 2, 4 and the
parity of the SP latents against SP 1, in one run.

One process per GPU (torch.multiprocessing, NCCL; gloo with --device cpu). The layouts run one after the
other, each in a fresh process group of its size (ranks beyond it wait); SP 1 runs on rank 0 alone with
the plain `DenoiserEngine`. Random embeddings (--cap-len tokens, fixed seed) stand in for a prompt.
  - forward: one DiT forward at batch 1, timed with CUDA events on rank 0, median of --repeats after
    --warmup;
  - denoise: `denoise()` of one request (--steps forwards + scheduler), wall clock after a CUDA sync,
    median of --denoise-repeats after one warm-up;
  - parity: cosine similarity and max abs diff of the final latents against SP 1's (same seed).

Layouts: `u2` Ulysses 2; `u2r2` Ulysses 2 x ring 2 (our Ulysses x ring processor); `r4` ring 4;
`ulysses4` Ulysses 4 through diffusers' `ulysses_anything` (pads 30 heads to 32); a `+nr` suffix
(`u2+nr`) shards the two noise refiners too (`DenoiserConfig.sp_shard_noise_refiner`); a `+packed` suffix
(`u2+packed`, `u2+nr+packed`) runs a ring-1 layout through our processor, q, k, v in one async all-to-all
(`DenoiserConfig.sp_attention: packed`), instead of diffusers' Ulysses: list both to measure the exchange
on and off in one run (each `+packed` result gets `forward_speedup_vs_diffusers` against its twin).
--layouts lists the layouts for degrees above 2 (and may name any others); a degree in --degrees without
a listed layout runs as `u<degree>`.

  python benchmarks/bench_sp.py --out $OUT/sp.json --degrees 1,2,4 --attention-backend _native_cudnn
  python benchmarks/bench_sp.py --out $OUT/sp.json --degrees 1,2 --layouts u2,u2+packed,u2+nr,u2+nr+packed
  python benchmarks/bench_sp.py --out /tmp/sp.json --source tiny --device cpu --height 128 --width 128 --steps 2

Needs only torch, diffusers, transformers and this repository.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import socket
import statistics
import sys
import time
import traceback

os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # NVLink multicast off (see the device notes)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from serve_app.config import DenoiserConfig, ModelConfig  # noqa: E402
from serve_app.engines.denoiser import DenoiseRequest, DenoiserEngine  # noqa: E402


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


SUFFIXES = ("nr", "packed")  # noise refiners sharded too; our packed-exchange processor at ring 1


def parse_layout(name: str) -> dict:
    base, *extra = name.split("+")
    if any(x not in SUFFIXES for x in extra) or len(set(extra)) != len(extra):
        raise SystemExit(f"bad layout {name!r}: the suffixes are +nr (noise refiners sharded too) and +packed (our processor)")
    shard = {"shard_noise_refiner": "nr" in extra, "sp_attention": "packed" if "packed" in extra else "diffusers"}
    m = re.fullmatch(r"(?:u(\d+))?(?:r(\d+))?", base)
    if base.startswith("ulysses"):
        u = int(base[len("ulysses"):])
        return {"name": name, "ulysses": u, "ring": 1, "ulysses_anything": True, "degree": u, **shard}
    if not m or not (m.group(1) or m.group(2)):
        raise SystemExit(f"bad layout {name!r}: use u<N>, r<N>, u<N>r<M> or ulysses<N>, each optionally +nr")
    u, r = int(m.group(1) or 1), int(m.group(2) or 1)
    return {"name": name, "ulysses": u, "ring": r, "ulysses_anything": False, "degree": u * r, **shard}


def plan_runs(args, n_devices: int) -> tuple[list[dict], list[dict]]:
    degrees = [int(d) for d in args.degrees.split(",") if d]
    layouts = [parse_layout(x) for x in args.layouts.split(",") if x]
    runs, skipped = [], []
    for d in degrees:
        chosen = [lay for lay in layouts if lay["degree"] == d] or [parse_layout(f"u{d}")]
        for lay in chosen:
            (runs if d <= n_devices else skipped).append(lay)
    return runs, [{**s, "skipped": f"needs {s['degree']} devices, have {n_devices}"} for s in skipped]


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_forwards(engine, args, device) -> list[float]:
    """Milliseconds per DiT forward at batch 1 (rank 0's clock; the collectives keep ranks in step)."""
    h, w = args.height // 8, args.width // 8
    g = torch.Generator().manual_seed(0)
    latents = [torch.randn(engine.in_channels, 1, h, w, generator=g).to(device, engine.dtype)]
    embeds = [torch.randn(args.cap_len, engine.cap_feat_dim, generator=g).to(device, engine.dtype)]
    t = torch.tensor([0.5], device=device)

    def fwd():
        with torch.no_grad():
            engine.transformer(latents, t, embeds, return_dict=False)

    for _ in range(args.warmup):
        fwd()
    _sync(device)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    times = []
    for _ in range(args.repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fwd()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fwd()
            times.append((time.perf_counter() - t0) * 1000)
    return times


def _time_denoise(engine, args, device) -> tuple[list[float], torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    req = DenoiseRequest(
        embeds=torch.randn(args.cap_len, engine.cap_feat_dim, generator=g),
        height=args.height, width=args.width, steps=args.steps, seed=42,
    )
    latents = engine.denoise([req])[0].float().cpu()  # warm-up, and the latents for parity
    times = []
    for _ in range(args.denoise_repeats):
        _sync(device)
        t0 = time.perf_counter()
        engine.denoise([req])
        _sync(device)
        times.append((time.perf_counter() - t0) * 1000)
    return times, latents


def _worker(rank: int, args, runs: list[dict], ports: list[int], result_path: str) -> None:
    import torch.distributed as dist

    from serve_app.sp.process_group import init_sp_process_group, sp_options

    if args.device == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(r["degree"] for r in runs)))
    model_cfg = ModelConfig(source=args.source, dtype=args.dtype, device=args.device)
    den_cfg = DenoiserConfig(attention_backend=args.attention_backend, compile=args.compile, collective_timeout_s=args.timeout,
                             fp8=args.fp8, fuse_projections=args.fuse_projections)
    results: list[dict] = []
    reference = None
    for run, port in zip(runs, ports):
        n = run["degree"]
        if rank >= n:
            continue
        entry: dict = {k: run[k] for k in ("name", "degree", "ulysses", "ring", "ulysses_anything", "shard_noise_refiner", "sp_attention")}
        engine = None
        try:
            t0 = time.perf_counter()
            if n == 1:
                device = torch.device(args.device if args.device == "cpu" else "cuda:0")
                engine = DenoiserEngine(model_cfg, den_cfg, device=device)
                entry["attention"] = "single"
            else:
                device = init_sp_process_group(
                    rank, n, "127.0.0.1", port, backend="gloo" if args.device == "cpu" else None, timeout_s=args.timeout
                )
                cfg = den_cfg.model_copy(update={
                    "ulysses_degree": run["ulysses"], "ring_degree": run["ring"], "sp_shard_noise_refiner": run["shard_noise_refiner"],
                    "sp_attention": run["sp_attention"],
                })
                engine = DenoiserEngine(model_cfg.model_copy(update={"device": str(device)}), cfg, device=device,
                                        sp=sp_options(cfg, ulysses_anything=run["ulysses_anything"]))
                entry["attention"] = engine.build.sp["attention"]
                entry["ulysses_exchange"] = engine.build.sp["ulysses_exchange"]
            entry["build_s"] = time.perf_counter() - t0
            entry["acceleration"] = engine.build.as_dict()
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            fw = _time_forwards(engine, args, device)
            dn, latents = _time_denoise(engine, args, device)
            entry.update(
                forward_ms_median=statistics.median(fw), forward_ms=fw,
                denoise_ms_median=statistics.median(dn), denoise_ms=dn,
            )
            if device.type == "cuda":
                entry["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
            if n == 1:
                reference = latents
            elif reference is not None:
                a, b = latents.flatten().double(), reference.flatten().double()
                entry["parity_vs_sp1"] = {
                    "cosine": float(torch.nn.functional.cosine_similarity(a, b, dim=0)),
                    "max_abs_diff": float((a - b).abs().max()),
                    "mean_abs_diff": float((a - b).abs().mean()),
                }
        except Exception as e:
            entry["error"] = f"{type(e).__name__}: {e}"
            if rank == 0:
                traceback.print_exc()
        finally:
            engine = None  # free this layout's weights before the next one builds its own
            gc.collect()
            if dist.is_initialized():
                dist.destroy_process_group()
            if args.device != "cpu":
                torch.cuda.empty_cache()
        if rank == 0:
            log(f"{run['name']}: " + json.dumps({k: v for k, v in entry.items() if k not in ("forward_ms", "denoise_ms")}))
            results.append(entry)
            with open(result_path, "w") as f:
                json.dump(results, f)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--degrees", default="1,2,4")
    p.add_argument("--layouts", default="u2r2,ulysses4", help="layouts for degrees > 2 (u<N>, r<N>, u<N>r<M>, ulysses<N>)")
    p.add_argument("--attention-backend", default=None, help="diffusers backend, e.g. native, _native_cudnn, flash")
    p.add_argument("--source", default="random-full", choices=["random-full", "tiny", "hub"])
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"])
    p.add_argument("--height", type=int, default=1024)
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--cap-len", type=int, default=128, help="caption tokens (the text encoder pads to multiples of 64)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--denoise-repeats", type=int, default=3)
    p.add_argument("--compile", action="store_true", help="regional torch.compile of the blocks (after the SP plan)")
    p.add_argument("--fp8", action="store_true", help="FP8 linears in every rank (denoiser.fp8), as the FP8 servers run")
    p.add_argument("--fuse-projections", action=argparse.BooleanOptionalAction, default=True,
                   help="denoiser.fuse_projections (the servers' default without LoRA)")
    p.add_argument("--timeout", type=float, default=600.0, help="rendezvous / collective timeout, seconds")
    args = p.parse_args()

    import diffusers
    import torch.multiprocessing as mp
    import transformers

    n_devices = torch.cuda.device_count() if args.device == "cuda" else max(int(d) for d in args.degrees.split(","))
    if args.device == "cuda" and n_devices == 0:
        raise SystemExit("no CUDA device; use --device cpu")
    runs, skipped = plan_runs(args, n_devices)
    if not runs:
        raise SystemExit(f"nothing to run: {skipped}")
    nprocs = max(r["degree"] for r in runs)
    ports = []
    for _ in runs:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            ports.append(s.getsockname()[1])
    result_path = os.path.abspath(args.out) + ".partial"
    log(f"runs: {[r['name'] for r in runs]} on {nprocs} processes; skipped: {[s['name'] for s in skipped]}")
    t0 = time.time()
    error = None
    try:
        mp.start_processes(_worker, args=(args, runs, ports, result_path), nprocs=nprocs, join=True, start_method="spawn")
    except Exception as e:  # keep what finished
        error = f"{type(e).__name__}: {e}"
        log(f"workers failed: {error}")
    results = json.load(open(result_path)) if os.path.exists(result_path) else []
    base = next((r for r in results if r["degree"] == 1 and "forward_ms_median" in r), None)
    for r in results:
        if base and "forward_ms_median" in r:
            r["forward_speedup_vs_sp1"] = base["forward_ms_median"] / r["forward_ms_median"]
            r["denoise_speedup_vs_sp1"] = base["denoise_ms_median"] / r["denoise_ms_median"]
    by_name = {r["name"]: r for r in results if "forward_ms_median" in r}
    for r in by_name.values():  # the packed exchange on vs off, same layout, same run
        twin = by_name.get("+".join(x for x in r["name"].split("+") if x != "packed"))
        if r.get("sp_attention") == "packed" and twin is not None and twin is not r:
            r["forward_speedup_vs_diffusers"] = twin["forward_ms_median"] / r["forward_ms_median"]
            r["denoise_speedup_vs_diffusers"] = twin["denoise_ms_median"] / r["denoise_ms_median"]
    out = {
        "command": [sys.executable] + sys.argv,
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "device": args.device,
        "gpu": torch.cuda.get_device_name(0) if args.device == "cuda" else None,
        "gpu_count": torch.cuda.device_count() if args.device == "cuda" else 0,
        "nccl_nvls_enable": os.environ.get("NCCL_NVLS_ENABLE"),
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "wall_s": time.time() - t0,
        "results": results,
        "skipped": skipped,
        "error": error,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
    if os.path.exists(result_path):
        os.remove(result_path)
    log(f"wrote {args.out}")
    for r in results:
        log(
            f"{r['name']:>14}: forward {r.get('forward_ms_median', float('nan')):8.2f} ms  "
            f"denoise {r.get('denoise_ms_median', float('nan')):9.1f} ms  "
            f"x{r.get('forward_speedup_vs_sp1', float('nan')):.2f}"
            + (f" (x{r['forward_speedup_vs_diffusers']:.3f} vs diffusers' Ulysses)" if "forward_speedup_vs_diffusers" in r else "")
            + f"  parity {r.get('parity_vs_sp1')}  {r.get('error', '')}"
        )


if __name__ == "__main__":
    main()
