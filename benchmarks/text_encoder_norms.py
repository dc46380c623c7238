"""`text_encoder.compile_norms` on and off, one GPU process: the CUDA-graphed Qwen3 text encoder
(random-full) with its RMSNorms eager and compiled; encode latency at batch 1 and 8, the graph replay at
batch 1 x 64 tokens, warm-up seconds, and each variant's states against the float32 eager forward on the
same (bf16) weights and against each other.

  python benchmarks/text_encoder_norms.py --out $OUT/te-norms.json
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import torch

from serve_app.config import ModelConfig, TextEncoderConfig
from serve_app.engines.text_encoder import TextEncoderEngine

PROMPTS = ["a photo of a cat sitting on a red chair in the afternoon sun, soft light",
           "一只可爱的柴犬在雪地里奔跑，电影感光线，高细节", "neon city street at night, rain, reflections, 35mm film"]


def median_s(fn, n: int = 30, warm: int = 5) -> float:
    for _ in range(warm):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        ts.append(time.perf_counter() - t)
    return sorted(ts)[n // 2]


def distance(a: torch.Tensor, b: torch.Tensor) -> dict:
    a, b = a.float().flatten(), b.float().flatten()
    return {"rel_l2": ((a - b).norm() / b.norm()).item(), "cosine": torch.nn.functional.cosine_similarity(a, b, dim=0).item(),
            "max_abs": (a - b).abs().max().item()}


@torch.no_grad()
def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    args = p.parse_args()
    model_cfg = ModelConfig(source="random-full", dtype="bfloat16")
    res: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    states = {}
    for name, on in (("norms_eager", False), ("norms_compiled", True)):
        t = time.perf_counter()
        engine = TextEncoderEngine(model_cfg, TextEncoderConfig(compile_norms=on))
        build = time.perf_counter() - t
        graphs = engine.warmup()
        r = {"build_s": build, "warmup_s": time.perf_counter() - t - build, "graphs": graphs, "norms_compiled": engine.norms_compiled}
        if "fp32" not in states:  # the reference: float32 eager forward, masked, on the same weights
            ref = copy.deepcopy(engine.model).float()
            toks = engine.tokenizer([engine._templated(q) for q in PROMPTS], padding="longest", return_tensors="pt", padding_side="right")
            ids, mask = toks.input_ids.cuda(), toks.attention_mask.cuda().bool()
            hidden = ref(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
            states["fp32"] = torch.cat([hidden[i][mask[i]] for i in range(len(PROMPTS))])
            del ref, hidden
            torch.cuda.empty_cache()
        states[name] = torch.cat([e.float() for e in engine.encode(PROMPTS)])
        r["vs_fp32_eager"] = distance(states[name], states["fp32"])
        r["encode_b1_s"] = median_s(lambda: [e.cpu() for e in engine.encode(PROMPTS[:1])])
        r["encode_b8_s"] = median_s(lambda: [e.cpu() for e in engine.encode((PROMPTS * 3)[:8])])
        graph = engine.graphs.graphs[(1, 64)][0]
        r["replay_b1_L64_s"] = median_s(graph.replay)
        res[name] = r
        print(name, json.dumps(r), flush=True)
        del engine, graph
        torch.cuda.empty_cache()
    res["compiled_vs_eager_norms"] = distance(states["norms_compiled"], states["norms_eager"])
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
