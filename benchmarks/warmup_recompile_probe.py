"""After the DiT warm-up, does traffic with assorted caption lengths still recompile? (FP8, compiled, 512²)
    python benchmarks/warmup_recompile_probe.py 16,80                      # the warm-up's mixed pair
    python benchmarks/warmup_recompile_probe.py 16,80 --diffusers-strides   # without contiguous_rope_tables"""
import os, sys, time, yaml, torch
from torch._dynamo.utils import counters
sys.path.insert(0, os.getcwd())
from serve_app.config import AppConfig
from serve_app.engines.denoiser import DenoiseRequest, DenoiserEngine
pair = tuple(int(x) for x in sys.argv[1].split(","))
args = yaml.safe_load(open("configs/random-full-1gpu.yaml"))["applications"][0]["args"]
args["denoiser"]["fp8"] = True
cfg = AppConfig.model_validate(args)
eng = DenoiserEngine(cfg.model, cfg.denoiser)
if "--diffusers-strides" in sys.argv:  # undo serve_app.engines.dit_builder.contiguous_rope_tables
    del eng.transformer._prepare_sequence
req = lambda n, seed=0: DenoiseRequest(embeds=torch.randn(n, eng.cap_feat_dim) * 0.1, height=512, width=512, steps=1, seed=seed)
t = time.time()
eng.denoise([req(16)]); eng.denoise([req(16), req(16)]); eng.denoise([req(n) for n in pair])
torch.cuda.synchronize(); print("warm-up", pair, round(time.time() - t, 1), "s, graphs", counters["stats"].get("unique_graphs"), flush=True)
# token counts that are multiples of 32 leave diffusers' caption RoPE table unpadded (another stride)
for lengths in [(40, 150, 20, 20), (20, 20, 20, 20), (70, 70, 5), (100, 200, 5, 9), (33, 65, 97, 129), (180, 12), (60, 61, 62, 63),
                (120, 40, 90, 10), (64, 20), (64,), (96, 96), (45,)]:
    before = counters["stats"].get("unique_graphs"); t = time.time()
    eng.denoise([req(n, i) for i, n in enumerate(lengths)]); torch.cuda.synchronize()
    print("batch", lengths, round(time.time() - t, 2), "s, new graphs", counters["stats"].get("unique_graphs") - before, flush=True)
