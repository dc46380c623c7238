"""The DiT block's GEMMs at Z-Image's shapes, one GPU: bf16 against `torch._scaled_mm` FP8 with per-row
scales (what `denoiser.fp8` runs), per-row with fast accumulation (`denoiser.fp8_fast_accum`), and
per-tensor scales with and without it (cuBLAS; not offered: a measurement of what the kernel choice costs).

Each GEMM is timed with CUDA events over --repeats samples of 10 launches (median), inputs already quantized: the GEMM
alone, not the activation quantization before it. Rows: tokens x in -> out, TFLOP/s, and the sum over one
main block (fused Q/K/V, output projection, fused w1/w3, w2) in ms.

  python benchmarks/fp8_gemm_shapes.py --out $OUT/fp8-gemm-shapes.json
"""

from __future__ import annotations

import argparse
import json

import torch

from bench_attention import cuda_ms  # the same CUDA-event median (10 launches back to back per sample)

DIM, FFN = 3840, 10240  # Z-Image-Turbo's model width and feed-forward width
BLOCK = {"qkv": (DIM, 3 * DIM), "out": (DIM, DIM), "w13": (DIM, 2 * FFN), "w2": (FFN, DIM)}  # in, out
TOKENS = {"1024²": 4096 + 64, "512²": 1024 + 64, "512² x4": 4 * (1024 + 64)}  # image tokens + a padded caption


def variants(m: int, k: int, n: int) -> dict:
    dev, f8 = "cuda", torch.float8_e4m3fn
    x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
    w = torch.randn(n, k, device=dev, dtype=torch.bfloat16) / k**0.5
    bias = torch.randn(n, device=dev, dtype=torch.bfloat16)
    xq, wq = x.to(f8), w.to(f8)
    row_a, row_b = torch.ones(m, 1, device=dev), torch.ones(1, n, device=dev)
    one = torch.ones((), device=dev)

    def scaled(sa, sb, fast):
        return lambda: torch._scaled_mm(xq, wq.t(), scale_a=sa, scale_b=sb, bias=bias, out_dtype=torch.bfloat16, use_fast_accum=fast)

    return {
        "bf16": lambda: torch.nn.functional.linear(x, w, bias),
        "fp8_rowwise": scaled(row_a, row_b, False),
        "fp8_rowwise_fast_accum": scaled(row_a, row_b, True),
        "fp8_tensorwise": scaled(one, one, False),
        "fp8_tensorwise_fast_accum": scaled(one, one, True),
    }


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--repeats", type=int, default=50)
    args = p.parse_args()
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "shapes": {}, "block_ms": {}}
    for label, m in TOKENS.items():
        block: dict[str, float] = {}
        for name, (k, n) in BLOCK.items():
            row = {}
            for v, fn in variants(m, k, n).items():
                ms = cuda_ms(fn, args.repeats)
                row[v] = {"ms": round(ms, 4), "tflops": round(2 * m * k * n / ms / 1e9, 1)}
                block[v] = block.get(v, 0.0) + ms
            results["shapes"][f"{label} {name} {m}x{k}->{n}"] = row
            print(f"{label:8} {name:4} {m}x{k}->{n}: " + ", ".join(f"{v} {r['ms']:.3f} ms ({r['tflops']:.0f} TFLOP/s)" for v, r in row.items()), flush=True)
        results["block_ms"][label] = {v: round(t, 4) for v, t in block.items()}
        print(f"{label:8} one block: " + ", ".join(f"{v} {t:.3f} ms" for v, t in block.items()), flush=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
