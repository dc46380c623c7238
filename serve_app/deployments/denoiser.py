"""DiT-denoiser deployment: batches requests (serve_app/deployments/gpu_batcher.py) and runs each batch on
its `Denoiser`: a local `DenoiserEngine`, or with ulysses_degree x ring_degree > 1 a sequence-parallel group
of rank workers in the replica's own placement group (serve_app/sp/rank_group.py)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from ray import serve

from serve_app.config import AppConfig
from serve_app.deployments.gpu_batcher import GpuBatcher
from serve_app.deployments.stage_stats import StageStats
from serve_app.engines.denoiser import Denoiser, DenoiserEngine
from serve_app.stage_messages import DenoisedLatents, DenoiseRequest


def make_denoiser(cfg: AppConfig) -> Denoiser:
    if cfg.denoiser.sp_degree > 1:
        import ray

        from serve_app.sp.rank_group import SPGroup

        return SPGroup(cfg, placement_group=ray.util.get_current_placement_group(), first_bundle_index=1)
    return DenoiserEngine(cfg.model, cfg.denoiser)


@serve.deployment
class DenoiserDeployment:
    def __init__(self, app_config: dict):
        cfg = AppConfig.model_validate(app_config)
        opts = cfg.denoiser_deployment
        # one thread runs every forward, warm-up included; the next batch is formed when it is free
        self._gpu_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="denoiser")
        sizes, batch = cfg.start_sizes(), min(2, opts.max_batch_size)
        # build: load (or random init) + the DiT builder's steps; warmup: the first forwards (compilation)
        self.engine, self.stats_ = StageStats.start(
            lambda: make_denoiser(cfg), lambda engine: self._gpu_thread.submit(engine.warmup, sizes, batch=batch).result(),
            opts.gpu_memory_gb if cfg.denoiser.sp_degree == 1 else None,  # an SP replica holds no GPU itself
        )
        self._batcher = GpuBatcher(
            self._denoise, self._gpu_thread, opts.max_batch_size, opts.batch_wait_timeout_s,
            cost_fn=lambda r: r.height * r.width, max_batch_cost=cfg.denoiser.max_batch_pixels,
            wait_fn=lambda r: r.companions > 1,  # wait for company only when some is on its way
        )

    def _denoise(self, requests: list[DenoiseRequest]) -> list[DenoisedLatents]:
        latents, dt = self.stats_.timed(lambda reqs: [lat.cpu() for lat in self.engine.denoise(reqs)], requests)
        return [DenoisedLatents(latents=lat, timings={"denoiser_s": dt, "denoiser_batch": len(requests)}) for lat in latents]

    async def denoise(self, request: DenoiseRequest) -> DenoisedLatents:
        return await self._batcher.submit(request)

    def stats(self) -> dict:
        # "engine": what the DiT builder applied on this chip (attention per block group, FP8, compile, SP
        # layout) and every fallback taken; for an SP group, rank 0's, with every rank's place
        return {**self.stats_.snapshot(), **self.engine.stats(), "engine": self.engine.info()}

    def ready(self) -> bool:
        return True

    def check_health(self) -> None:
        # Serve calls this periodically; an SP group with a dead or hung rank raises here, so Serve
        # replaces the replica and with it the whole group.
        self.engine.check_health()
