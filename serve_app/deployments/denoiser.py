"""DiT-denoiser deployment: batches jobs (serve_app/deployments/gpu_batcher.py), runs each shape group through one batched DiT forward per
step. With ulysses_degree x ring_degree > 1 the replica drives a sequence-parallel group of rank
workers placed in the replica's own placement group (see serve_app/sp_group.py)."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

from ray import serve

from serve_app.config import AppConfig
from serve_app.denoiser_engine import DenoiseRequest, DenoiserEngine
from serve_app.deployments.gpu_batcher import GpuBatcher
from serve_app.deployments.stage_stats import StageStats
from serve_app.stage_messages import DenoisedLatents, DenoiseJob, EncodedPrompt


@serve.deployment
class DenoiserDeployment:
    def __init__(self, app_config: dict):
        cfg = AppConfig.model_validate(app_config)
        self.cfg = cfg
        t0 = time.perf_counter()
        if cfg.denoiser.sp_degree > 1:
            import ray

            from serve_app.sp_group import SPGroup

            self.engine = SPGroup(cfg, placement_group=ray.util.get_current_placement_group(), first_bundle_index=1)
        else:
            self.engine = DenoiserEngine(cfg.model, cfg.denoiser)
        t1 = time.perf_counter()
        self.stats_ = StageStats(self.engine.device)
        # One thread runs every forward, warm-up included (batches run one at a time anyway); the next batch is formed when that thread is free.
        self._gpu_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="denoiser")
        opts = cfg.denoiser_deployment
        self._batcher = GpuBatcher(
            self._denoise, self._gpu_thread, opts.max_batch_size, opts.batch_wait_timeout_s,
            cost_fn=lambda item: item[2].height * item[2].width, max_batch_cost=cfg.denoiser.max_batch_pixels,
            # wait for company only when some is on its way: sibling images, or prompts encoded together
            wait_fn=lambda item: item[2].burst > 1 or item[0].batch > 1,
        )
        warmup_sizes = cfg.denoiser.warmup_sizes or [(64, 64)]
        self._gpu_thread.submit(self.engine.warmup, warmup_sizes, batch=min(2, opts.max_batch_size)).result()
        # build: load (or random init) + FP8 + compile wrappers; warmup: the first forwards, where compilation happens
        self.stats_.startup_s = {"build": t1 - t0, "warmup": time.perf_counter() - t1}

    def _denoise(self, items: list[tuple[EncodedPrompt, EncodedPrompt | None, DenoiseJob]]) -> list[DenoisedLatents]:
        t0 = time.perf_counter()
        prompts, negatives, jobs = zip(*items)
        reqs = [
            DenoiseRequest(
                embeds=p.embeds,
                height=j.height,
                width=j.width,
                steps=j.steps,
                seed=j.seed,
                guidance_scale=j.guidance_scale,
                negative_embeds=n.embeds if n is not None else None,
            )
            for p, n, j in zip(prompts, negatives, jobs)
        ]
        latents = [lat.cpu() for lat in self.engine.denoise(reqs)]
        dt = time.perf_counter() - t0
        self.stats_.record(len(jobs), dt)
        out = []
        for p, n, lat in zip(prompts, negatives, latents):
            timings = dict(p.timings)
            if n is not None:
                timings["text_encoder_s"] = timings.get("text_encoder_s", 0.0) + n.timings.get("text_encoder_s", 0.0)
            out.append(DenoisedLatents(latents=lat, timings={**timings, "denoiser_s": dt, "denoiser_batch": len(jobs)}))
        return out

    async def denoise(self, prompt: EncodedPrompt, negative: EncodedPrompt | None, job: DenoiseJob) -> DenoisedLatents:
        return await self._batcher.submit((prompt, negative, job))

    def stats(self) -> dict:
        # "engine": what was picked for this chip (attention backend, FP8 and its dtype, compile,
        # collective backend) and every fallback taken; for an SP group, rank 0's
        acceleration = self.engine.info()[0]["acceleration"] if hasattr(self.engine, "rank_info") else self.engine.acceleration
        return {**self.stats_.snapshot(), **self.engine.stats.snapshot(), "engine": acceleration}

    def ready(self) -> bool:
        return True

    def check_health(self) -> None:
        # Serve calls this periodically; an SP group with a dead or hung rank raises here, so Serve
        # replaces the replica and with it the whole group.
        if hasattr(self.engine, "check_health"):
            self.engine.check_health()
