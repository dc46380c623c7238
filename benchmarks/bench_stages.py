"""Per-stage GPU timings of the engines, each speed switch on and off, next to plain diffusers.

One device run, random-full weights (real architecture, random values), bf16, 1024x1024, 8 forwards:
  1. plain diffusers ZImagePipeline (eager; what a user starts from) end to end;
  2. our StagedPipeline end to end and per stage (same weights, same run);
  3. the text encoder padded to 512 vs to the longest prompt, eager vs CUDA graphs (`--te-graph`:
     timings at batch 1 and 8, and how far the compiled embeddings are from the eager ones);
  4. one DiT forward for each variant in --variants: `eager`, `cudnn` / `flash` / `fa3` attention,
     `compile` (dynamic shapes), `compile_static` (a graph per shape), `fp8_compile`,
     `fp8_compile_static` (FP8 linears); `..._fa3`: FlashAttention-3; `..._cplxrope`: RoPE as diffusers'
     complex multiply instead of `serve_app.engines.attention_processor`'s real arithmetic (the default);
     `..._fused`: Q/K/V and w1/w3 as one linear each (`denoiser.fuse_projections`), also compared with the
     same variant unfused when that one ran first; `..._fastacc`: FP8 GEMMs with fast accumulation
     (`denoiser.fp8_fast_accum`), also compared with the variant without; with `--batch-size` S also a batch of 1 and of 4 at
     S x S (per-image ratio); `..._graphs`: CUDA graphs of the forward at S x S (`denoiser.cuda_graph_max_pixels`
     S², batches 1-4), captured as the warm-up does, then forward at batch 1 and 4 and the 8-step loop at
     batch 1 and 4 with and without them on the same engine, and the latents' difference;
  5. the VAE decode for each of --vae-variants: `eager`, `compile` (static).
Timing: CUDA-synchronised wall clock, warm-up first, median of --repeats. Writes JSON to --out after
every part, so a run cut short keeps what it measured.

  python benchmarks/bench_stages.py --out $OUT/stages.json --skip-diffusers --te-graph \
      --variants compile,compile_static,fp8_compile_static --batch-size 512 --profile-variants compile \
      --vae-variants eager,compile

  DiT CUDA graphs at 512² against the same engine without them, and 1024² against the variant without:
  python benchmarks/bench_stages.py --out $OUT/stages-graphs.json --skip-diffusers --skip-pipeline \
      --variants fp8_compile_fa3_fused,fp8_compile_fa3_fused_graphs --batch-size 512 --vae-variants ""

  fused projections on and off (one call; FP8 + FA3 compiled, 1024² and 512² batch 1 / 4):
  python benchmarks/bench_stages.py --out $OUT/stages-fused.json --skip-diffusers --skip-pipeline \
      --variants fp8_compile_fa3,fp8_compile_fa3_fused --batch-size 512 --vae-variants ""
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from serve_app.config import AppConfig, DenoiserConfig, ModelConfig, TextEncoderConfig, VaeConfig  # noqa: E402
from serve_app.engines.denoiser import DenoiseRequest, DenoiserEngine  # noqa: E402

PROMPT = (
    "A cinematic photograph of an elderly fisherman mending a bright orange net on a wooden pier at dawn, "
    "mist over the harbour, gulls in the distance, soft golden light, shallow depth of field, 85mm lens, "
    "fine skin texture, weathered hands, reflections on wet planks, muted teal and amber palette"
)


sync = torch.cuda.synchronize


def timed(fn, repeats: int, warmup: int = 1) -> dict:
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times), "min_s": min(times), "n": repeats}


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--variants", default="eager,cudnn,compile")
    p.add_argument("--skip-diffusers", action="store_true")
    p.add_argument("--skip-pipeline", action="store_true")
    p.add_argument("--compile-cache-dir", default="/tmp/inductor-cache")
    p.add_argument("--source", default="random-full", help="tiny + --device cpu: a quick CPU smoke test")
    p.add_argument("--device", default="cuda")
    p.add_argument("--profile-variants", default="", help="DiT variants to profile (torch.profiler table of one forward)")
    p.add_argument("--te-graph", action="store_true", help="also time the CUDA-graphed text encoder")
    p.add_argument("--batch-size", type=int, default=0, help="also time DiT batches of 1 and 4 at this square size")
    p.add_argument("--vae-variants", default="eager")
    args = p.parse_args()

    global sync
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    model = ModelConfig(source=args.source, dtype="bfloat16" if args.device == "cuda" else "float32", device=args.device,
                        compile_cache_dir=args.compile_cache_dir)
    size, steps = args.size, args.steps
    results: dict = {
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "torch": torch.__version__,
        "argv": sys.argv,
        "size": size,
        "steps": steps,
    }
    import diffusers

    results["diffusers"] = diffusers.__version__

    def save():
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)

    from serve_app.pipeline import StagedPipeline

    log("building random-full engines")
    t0 = time.perf_counter()
    # the reference: eager text encoder (no CUDA graphs), SDPA attention
    cfg = AppConfig(model=model, text_encoder=TextEncoderConfig(cuda_graph=False), denoiser=DenoiserConfig(attention_backend="native"))
    pipe = StagedPipeline(cfg)
    results["build_s"] = time.perf_counter() - t0
    te, dn, vae = pipe.text_encoder, pipe.denoiser, pipe.vae

    # --- 1. plain diffusers, same modules (full text encoder: rebuilt without our layer skip) ---
    if not args.skip_diffusers:
        from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline

        from serve_app.engines.model_sources import load_text_encoder, load_tokenizer

        full_te = load_text_encoder(model, torch.device(args.device), dtype)
        ref = ZImagePipeline(
            scheduler=FlowMatchEulerDiscreteScheduler.from_config(dn.scheduler_config),
            vae=vae.vae,
            text_encoder=full_te,
            tokenizer=load_tokenizer(model),
            transformer=dn.transformer,
        )
        ref.set_progress_bar_config(disable=True)

        def run_ref():
            ref(prompt=[PROMPT], height=size, width=size, num_inference_steps=steps, guidance_scale=0.0,
                generator=torch.Generator("cpu").manual_seed(0), output_type="pil")

        results["diffusers_pipeline"] = timed(run_ref, args.repeats)
        log(f"diffusers ZImagePipeline: {results['diffusers_pipeline']}")
        del ref, full_te
        gc.collect()
        if args.device == "cuda":
            torch.cuda.empty_cache()
        save()

    # --- 2. our staged pipeline, end to end and per stage ---
    stage_times: dict = {"text_encoder": [], "denoiser": [], "vae": [], "total": []}

    def run_ours():
        [img] = pipe.generate([PROMPT], [0], height=size, width=size, steps=steps)
        for k in stage_times:
            stage_times[k].append(img.timings_s[k])

    if not args.skip_pipeline:
        results["staged_pipeline"] = timed(run_ours, args.repeats)
        results["staged_pipeline"]["stages_median_s"] = {k: statistics.median(v[1:] or v) for k, v in stage_times.items()}
        log(f"staged pipeline: {results['staged_pipeline']}")
        save()

    # --- 3. text encoder padding ---
    for pad in (False, True, False, True):
        te.cfg = TextEncoderConfig(pad_to_max_length=pad, cuda_graph=False)
        results[f"text_encoder_pad{'512' if pad else 'longest'}"] = timed(lambda: te.encode([PROMPT]), 20, warmup=3)
    results["text_encoder_tokens"] = te.count_tokens(PROMPT)
    te.cfg = TextEncoderConfig(cuda_graph=False)
    log(f"text encoder: {results['text_encoder_padlongest']} vs pad512 {results['text_encoder_pad512']}")
    emb = te.encode([PROMPT])[0]
    prompts8 = [PROMPT[: 40 + 25 * i] for i in range(8)]
    results["text_encoder_batch8"] = timed(lambda: te.encode(prompts8), 10, warmup=2)
    save()
    # the text encoder's speed switches against the eager one (`te`, `emb` above)
    # (a compiled text encoder was tried and dropped: benchmarks/README.md, "text encoder compile")
    te_variants = {"cuda_graph": TextEncoderConfig(cuda_graph=True)}
    for name, wanted in (("cuda_graph", args.te_graph),):
        if not wanted:
            continue
        from serve_app.engines.text_encoder import TextEncoderEngine

        try:
            t0 = time.perf_counter()
            te_v = TextEncoderEngine(model, te_variants[name])
            r = {"warmup_forwards_or_graphs": te_v.warmup()}
            sync()
            r["build_and_warmup_s"] = time.perf_counter() - t0
            r["batch1"] = timed(lambda: te_v.encode([PROMPT]), 20, warmup=3)
            r["batch8"] = timed(lambda: te_v.encode(prompts8), 10, warmup=2)
            for key, (a, b) in {"vs_eager": (emb, te_v.encode([PROMPT])[0]),
                                "batch8_vs_eager": (torch.cat(te.encode(prompts8)), torch.cat(te_v.encode(prompts8)))}.items():
                a, b = a.float(), b.float()
                r[key] = {"max_abs_diff": (a - b).abs().max().item(), "rel_l2": ((a - b).norm() / a.norm()).item(),
                          "cosine": torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0).item()}
            results[f"text_encoder_{name}"] = r
            log(f"text encoder {name}: {r}")
            del te_v
        except Exception as e:
            results[f"text_encoder_{name}"] = {"error": f"{type(e).__name__}: {e}"[:500]}
            log(f"text encoder {name} failed: {e}")
        save()

    # --- 4. DiT forward per variant ---
    def forward_fn(engine: DenoiserEngine, batch: int = 1, px: int = size):
        lat = torch.randn(batch, 16, 1, px // 8, px // 8, device=args.device, dtype=dtype)
        t = torch.full((batch,), 0.5, device=args.device)
        caps = [emb.to(dtype)] * batch

        def run():
            with torch.no_grad():  # as the engine runs it; a grad-mode change would recompile
                return engine.transformer(list(lat.unbind(0)), t, caps, return_dict=False)

        return run

    def denoise_fn(engine: DenoiserEngine):
        return lambda: engine.denoise([DenoiseRequest(embeds=emb, height=size, width=size, steps=steps, seed=0)])

    results["dit"] = {}
    del pipe.text_encoder
    g = torch.Generator(args.device).manual_seed(1)
    ref_in = torch.randn(1, 16, 1, size // 8, size // 8, device=args.device, dtype=dtype, generator=g)

    def fixed_forward(engine: DenoiserEngine) -> torch.Tensor:
        with torch.no_grad():
            return engine.transformer(list(ref_in.unbind(0)), torch.full((1,), 0.5, device=args.device), [emb.to(dtype)], return_dict=False)[0][0].float()

    def compare(o: torch.Tensor, ref: torch.Tensor) -> dict:
        return {"rel_l2": ((o - ref).norm() / ref.norm()).item(), "max_abs_diff": (o - ref).abs().max().item(),
                "cosine": torch.nn.functional.cosine_similarity(o.flatten(), ref.flatten(), dim=0).item()}

    def graph_trial(engine: DenoiserEngine, px: int) -> dict:
        """The engine's CUDA graphs at px x px against its model on the same weights: capture (as the
        warm-up does), forward at batch 1 and 4, the 8-step loop at batch 1 and 4, the latents' difference."""
        t0 = time.perf_counter()
        engine.warmup([(px, px)], steps=1, batch=2)
        sync()
        out = {"warmup_with_capture_s": time.perf_counter() - t0, "captured": engine.info()["cuda_graphs"],
               "caption_tokens": emb.shape[0]}
        for batch in (1, 4):
            lat = torch.randn(batch, 16, 1, px // 8, px // 8, device=args.device, dtype=dtype)
            t = torch.full((batch,), 0.5, device=args.device)

            def fwd(graphed: bool):
                def run():
                    with torch.no_grad():
                        if graphed:
                            return engine.forward(lat, t, [emb.to(dtype)] * batch)
                        return engine.transformer(list(lat.unbind(0)), t, [emb.to(dtype)] * batch, return_dict=False)[0]
                return run

            before = engine.stats()["graph_forwards"]
            out[f"forward_batch{batch}"] = {"model": timed(fwd(False), 20, warmup=3), "graph": timed(fwd(True), 20, warmup=3)}
            out[f"forward_batch{batch}"]["graph_forwards"] = engine.stats()["graph_forwards"] - before
            reqs = [DenoiseRequest(embeds=emb, height=px, width=px, steps=steps, seed=i) for i in range(batch)]
            graphs = engine.graphs
            engine.graphs = None
            model_t, model_lat = timed(lambda: engine.denoise(reqs), 5), engine.denoise(reqs)
            engine.graphs = graphs
            before = engine.stats()["graph_forwards"]
            graph_t, graph_lat = timed(lambda: engine.denoise(reqs), 5), engine.denoise(reqs)
            a, b = torch.stack(graph_lat).float(), torch.stack(model_lat).float()
            out[f"denoise_{steps}_steps_batch{batch}"] = {
                "model": model_t, "graph": graph_t, "graph_forwards": engine.stats()["graph_forwards"] - before,
                "latents_graph_vs_model": {**compare(a, b), "identical": bool(torch.equal(a, b))}}
            log(f"  graphs {px}² batch {batch}: forward {out[f'forward_batch{batch}']['model']['median_s']*1000:.1f} -> "
                f"{out[f'forward_batch{batch}']['graph']['median_s']*1000:.1f} ms, {steps} steps {model_t['median_s']*1000:.0f} -> "
                f"{graph_t['median_s']*1000:.0f} ms, latents {out[f'denoise_{steps}_steps_batch{batch}']['latents_graph_vs_model']}")
        return out

    ref_out = fixed_forward(dn)  # the eager bf16 DiT: what every variant is compared with
    # ... and its 8-step latents (seed 0) and their eager decode: the output a switch changes
    ref_latents = denoise_fn(dn)()[0].float()
    ref_image = vae.decode([ref_latents])[0]

    def compare_images(img: torch.Tensor, ref: torch.Tensor) -> dict:
        mse = (img.double() - ref.double()).pow(2).mean().item()
        return {"max_abs_levels": int((img.int() - ref.int()).abs().max()),
                "psnr_db": float("inf") if mse == 0 else 10 * math.log10(255**2 / mse)}
    outputs: dict[str, torch.Tensor] = {}  # each variant's fixed forward, for `..._fused` against its unfused one
    for variant in [v for v in args.variants.split(",") if v]:
        log(f"DiT variant {variant}")
        toks = set(variant.split("_"))
        dcfg = DenoiserConfig(
            compile="compile" in toks,
            compile_dynamic="static" not in toks,
            fp8="fp8" in toks,
            fp8_fast_accum="fastacc" in toks,
            real_rope="cplxrope" not in toks,
            fuse_projections="fused" in toks,
            cuda_graph_max_pixels=(args.batch_size or 512) ** 2 if "graphs" in toks else None,
            cuda_graph_max_batch=4,
            attention_backend={"cudnn": "_native_cudnn", "flash": "_native_flash", "fa3": "_flash_3"}.get(
                next((b for b in ("cudnn", "flash", "fa3") if b in toks), ""), "native"
            ),
        )
        try:
            # every variant but eager gets a fresh transformer: fp8, compile and backends change it in place
            before = torch.cuda.memory_allocated() if args.device == "cuda" else 0
            engine = dn if variant == "eager" else DenoiserEngine(model, dcfg)
            # what this variant's DiT holds on the device (fused projections must not add to it)
            built = (torch.cuda.memory_allocated() - before) / 2**30 if args.device == "cuda" and engine is not dn else None
            t0 = time.perf_counter()
            forward_fn(engine)()
            sync()
            first = time.perf_counter() - t0
            r = {"first_call_s": first, "applied": engine.build.as_dict(), "built_memory_gb": built}
            r["forward"] = timed(forward_fn(engine), 10, warmup=2)
            r["forward_batch4"] = timed(forward_fn(engine, 4), 3, warmup=1)
            r["denoise_8_steps"] = timed(denoise_fn(engine), 3)
            o = outputs[variant] = fixed_forward(engine)
            r["vs_eager"] = compare(o, ref_out)
            lat8 = denoise_fn(engine)()[0].float()
            r["latents_vs_eager"] = compare(lat8, ref_latents)
            r["image_vs_eager"] = compare_images(vae.decode([lat8])[0], ref_image)
            for tok in ("fused", "fastacc"):  # against the same variant without that switch, when it ran
                without = "_".join(t for t in variant.split("_") if t != tok)
                if tok in toks and without in outputs:
                    r[f"vs_{without}"] = compare(o, outputs[without])
            if args.batch_size:
                bs = args.batch_size
                b1 = timed(forward_fn(engine, 1, bs), 10, warmup=2)
                b4 = timed(forward_fn(engine, 4, bs), 5, warmup=2)
                r[f"forward_{bs}"] = {"batch1": b1, "batch4": b4,
                                      "per_image_speedup_batch4": 4 * b1["median_s"] / b4["median_s"]}
            if engine.graphs is not None:
                r["graphs"] = graph_trial(engine, args.batch_size or 512)
            if variant in args.profile_variants.split(","):
                from torch.profiler import ProfilerActivity, profile

                acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device == "cuda" else [])
                with profile(activities=acts) as prof:
                    forward_fn(engine)()
                    sync()
                key = "self_cuda_time_total" if args.device == "cuda" else "self_cpu_time_total"
                table = prof.key_averages().table(sort_by=key, row_limit=25, max_name_column_width=60)
                with open(os.path.join(os.path.dirname(args.out), f"profile-{variant}.txt"), "w") as f:
                    f.write(table)
                print(table, flush=True)
            r["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30 if args.device == "cuda" else None
            results["dit"][variant] = r
            log(f"  {variant}: forward {r['forward']['median_s']*1000:.1f} ms, batch4 {r['forward_batch4']['median_s']*1000:.1f} ms, "
                f"first {first:.1f} s, denoise {r['denoise_8_steps']['median_s']*1000:.0f} ms, vs eager {r['vs_eager']}, "
                f"latents {r['latents_vs_eager']}, image {r['image_vs_eager']}, "
                f"{ {k: v for k, v in r.items() if k.startswith('vs_') and k != 'vs_eager'} } {r.get(f'forward_{args.batch_size}')}")
            if engine is not dn:
                del engine
                gc.collect()
                if args.device == "cuda":
                    torch.cuda.empty_cache()
        except Exception as e:  # keep going: one failing variant must not lose the others
            results["dit"][variant] = {"error": f"{type(e).__name__}: {e}"[:500]}
            log(f"  {variant} failed: {e}")
        save()

    # --- 5. VAE ---
    lat = torch.randn(16, size // 8, size // 8)
    ref_img = vae.decode([lat])[0]
    results["vae"] = {}
    del dn, pipe
    gc.collect()
    if args.device == "cuda":
        torch.cuda.empty_cache()
    for variant in [v for v in args.vae_variants.split(",") if v]:
        vcfg = VaeConfig(compile=variant == "compile")
        try:
            t0 = time.perf_counter()
            v = vae if variant == "eager" else type(vae)(model, vcfg)
            img = v.decode([lat])[0]
            r = {"first_call_s": time.perf_counter() - t0, "config": vcfg.model_dump()}
            r["batch1"] = timed(lambda: v.decode([lat]), 5)
            r["batch4"] = timed(lambda: v.decode([lat] * 4), 2)
            r["vs_eager_max_uint8_diff"] = (img.int() - ref_img.int()).abs().max().item()
            results["vae"][variant] = r
            log(f"vae {variant}: {r['batch1']['median_s']*1000:.1f} ms (first {r['first_call_s']:.1f} s)")
        except Exception as e:
            results["vae"][variant] = {"error": f"{type(e).__name__}: {e}"[:500]}
            log(f"vae {variant} failed: {e}")
        save()
    log("done")


if __name__ == "__main__":
    main()
