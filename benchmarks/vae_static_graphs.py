"""VAE decode with `vae.static_sizes` (a static graph per listed size) against the symbolic graph alone.

Per size: median decode time of each engine (random-full VAE, compiled), how far each is from the eager
decoder (uint8 levels; PSNR), and the compile time of each engine's warm-up. One GPU.

    python benchmarks/vae_static_graphs.py --sizes 1024x1024,512x512,1344x768 --static 1024x1024,512x512 --out vae.json
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time

import torch

from serve_app.config import ModelConfig, VaeConfig
from serve_app.engines.devices import synchronize
from serve_app.engines.vae import VaeEngine


def _sizes(text: str) -> list[tuple[int, int]]:
    return [tuple(int(v) for v in s.split("x")) for s in text.split(",") if s]  # type: ignore[misc]


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = (a.float() - b.float()).pow(2).mean().item()
    return math.inf if mse == 0 else 10 * math.log10(255**2 / mse)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--sizes", default="1024x1024,512x512,1344x768", help="HxW decoded and timed")
    p.add_argument("--static", default="1024x1024,512x512", help="HxW that get static graphs")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--out", required=True)
    a = p.parse_args()
    sizes, static = _sizes(a.sizes), _sizes(a.static)
    model = ModelConfig(source="random-full", dtype="bfloat16", device="cuda")
    engines = {}
    result: dict = {"sizes": a.sizes, "static": a.static, "torch": torch.__version__, "device": torch.cuda.get_device_name(0),
                    "warmup_s": {}, "decode_ms": {}, "vs_eager": {}}
    for name, cfg in [("eager", VaeConfig()), ("symbolic", VaeConfig(compile=True)),
                      ("static", VaeConfig(compile=True, static_sizes=static))]:
        t0 = time.perf_counter()
        eng = VaeEngine(model, cfg)
        eng.warm_up(sizes)
        synchronize(eng.device)
        result["warmup_s"][name] = round(time.perf_counter() - t0, 2)
        engines[name] = eng
        print(name, "ready in", result["warmup_s"][name], "s", flush=True)
    gen = torch.Generator("cpu").manual_seed(0)
    for h, w in sizes:
        key = f"{h}x{w}"
        lat = torch.randn(16, h // 8, w // 8, generator=gen)
        ref = engines["eager"].decode([lat])[0]
        result["decode_ms"][key], result["vs_eager"][key] = {}, {}
        for name, eng in engines.items():
            times = []
            for _ in range(a.reps):
                synchronize(eng.device)
                t0 = time.perf_counter()
                img = eng.decode([lat])[0]
                times.append((time.perf_counter() - t0) * 1e3)
            result["decode_ms"][key][name] = round(statistics.median(times), 2)
            result["vs_eager"][key][name] = {"max_abs_levels": int((img.int() - ref.int()).abs().max()), "psnr_db": round(_psnr(img, ref), 2)}
        print(key, result["decode_ms"][key], result["vs_eager"][key], flush=True)
    frames = dict(torch._dynamo.utils.counters["frames"])
    result["dynamo_frames"] = frames
    with open(a.out, "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
