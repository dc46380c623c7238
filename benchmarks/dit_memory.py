"""Peak GPU memory of the DiT engine, bf16 against FP8, on the same random-full weights: after the build and
after one 1024² and one 2048² denoise step (eager, so that compile's own memory stays out of it).

    python benchmarks/dit_memory.py --out dit-memory.json
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from serve_app.config import DenoiserConfig, ModelConfig  # noqa: E402
from serve_app.engines.denoiser import DenoiserEngine  # noqa: E402
from serve_app.stage_messages import DenoiseRequest  # noqa: E402


def measure(fp8: bool) -> dict:
    torch.cuda.reset_peak_memory_stats()
    engine = DenoiserEngine(ModelConfig(source="random-full", dtype="bfloat16"), DenoiserConfig(fp8=fp8))
    out = {"fp8_dtype": engine.build.fp8_dtype, "after_build": {"in_use": torch.cuda.memory_allocated(), "peak": torch.cuda.max_memory_allocated()}}
    emb = torch.randn(120, engine.cap_feat_dim)
    for side in (1024, 2048):
        torch.cuda.reset_peak_memory_stats()
        engine.denoise([DenoiseRequest(embeds=emb, height=side, width=side, steps=1, seed=0)])
        torch.cuda.synchronize()
        out[f"denoise_{side}"] = {"in_use": torch.cuda.memory_allocated(), "peak": torch.cuda.max_memory_allocated()}
    del engine
    gc.collect()
    torch.cuda.empty_cache()
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="dit-memory.json")
    a = p.parse_args()
    result = {"bf16": measure(False), "fp8": measure(True)}
    Path(a.out).write_text(json.dumps(result, indent=1))
    gib = lambda b: f"{b / 2**30:.1f} GiB"
    for k, r in result.items():
        print(k, {stage: {m: gib(v) for m, v in vals.items()} for stage, vals in r.items() if isinstance(vals, dict)})


if __name__ == "__main__":
    main()
