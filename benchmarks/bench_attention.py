"""One DiT attention call at Z-Image's 1024² shape (batch 1, 4096 image + 128 caption tokens, 30 heads of
128), each backend on the same q, k, v: torch SDPA (its own pick, cuDNN, flash) and FlashAttention-3
(serve_app/engines/fa3_attention.py). CUDA events around 10 calls in a row, median of --repeats;
error against a float32 SDPA.

`--padded`: a batch whose items are shorter than the batch by 0, 32, 64, 96 keys in turn (captions of
different lengths, padded at the end as Z-Image does): SDPA with the boolean key mask (what diffusers'
dispatch runs) against FA3 given the key lengths.

  python benchmarks/bench_attention.py --out $OUT/attention.json
  python benchmarks/bench_attention.py --batch 8 --seq 1152 --padded --out $OUT/attention-512-b8.json   # 512², batch 8
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from serve_app.engines.fa3_attention import fa3_attention, fa3_interface  # noqa: E402


def cuda_ms(fn, repeats: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(10):  # back to back, so that the CPU's launch cost hides behind the GPU work
            fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 10)
    return statistics.median(times)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--seq", type=int, default=4096 + 128)
    p.add_argument("--heads", type=int, default=30)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeats", type=int, default=50)
    p.add_argument("--padded", action="store_true", help="items of different lengths in the batch (key mask / key lengths)")
    args = p.parse_args()
    g = torch.Generator("cuda").manual_seed(0)
    shape = (args.batch, args.seq, args.heads, args.head_dim)
    q, k, v = (torch.randn(shape, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3))
    t = lambda x: x.transpose(1, 2)
    lengths = torch.tensor([args.seq - 32 * (i % 4) for i in range(args.batch)], dtype=torch.int32, device="cuda")
    mask = (torch.arange(args.seq, device="cuda")[None, :] < lengths[:, None])[:, None, None, :] if args.padded else None
    ref = t(F.scaled_dot_product_attention(t(q).float(), t(k).float(), t(v).float(), attn_mask=mask)).float()
    flop = 4 * args.heads * args.head_dim * args.seq * (lengths.sum().item() if args.padded else args.batch * args.seq)

    def sdpa(backend=None):
        def run():
            if backend is None:
                return t(F.scaled_dot_product_attention(t(q), t(k), t(v), attn_mask=mask))
            with sdpa_kernel(backend):
                return t(F.scaled_dot_product_attention(t(q), t(k), t(v), attn_mask=mask))
        return run

    variants = {"sdpa": sdpa(), "sdpa_cudnn": sdpa(SDPBackend.CUDNN_ATTENTION), "sdpa_flash": sdpa(SDPBackend.FLASH_ATTENTION)}
    if args.padded:
        variants["sdpa_efficient"] = sdpa(SDPBackend.EFFICIENT_ATTENTION)
    fa3 = fa3_interface()
    if fa3 is not None:
        variants["fa3"] = lambda: fa3_attention(fa3, q, k, v, key_lengths=lengths if args.padded else None)
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "shape_bshd": shape,
               "key_lengths": lengths.tolist() if args.padded else None,
               "fa3_module": getattr(fa3, "__name__", None), "variants": {}}
    for name, fn in variants.items():
        try:
            out = fn().float()
            ms = cuda_ms(fn, args.repeats)
            results["variants"][name] = {
                "ms": ms, "tflops": flop / ms / 1e9,
                "rel_l2_vs_fp32": ((out - ref).norm() / ref.norm()).item(),
                "cosine_vs_fp32": F.cosine_similarity(out.flatten(), ref.flatten(), dim=0).item(),
            }
        except Exception as e:
            results["variants"][name] = {"error": f"{type(e).__name__}: {e}"[:300]}
        print(name, results["variants"][name], flush=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
