"""DiT-denoiser deployment: batches requests (serve_app/deployments/gpu_batcher.py) and runs each batch on
its `Denoiser`: a local `DenoiserEngine`, or with ulysses_degree x ring_degree > 1 a sequence-parallel group
of rank workers in the replica's own placement group (serve_app/sp/rank_group.py).

LoRA adapters go through Ray Serve's model multiplexing: the ingress sends a request with adapters with
`multiplexed_model_id` = its first adapter, so Serve routes it to a replica that holds that adapter if one
does; here each adapter of the request is got through the `@serve.multiplexed` loader, which keeps at most
`lora.max_loaded` per replica (least recently used unloaded first) and tells the routers what this replica
holds. Loading reads the adapter on the engine (every rank of an SP group) beside the GPU thread.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, AsyncIterator, Callable

from ray import serve

from serve_app.config import AppConfig
from serve_app.deployments.gpu_batcher import GpuBatcher
from serve_app.deployments.stage_stats import StageStats
from serve_app.engines.dit_positions import PIXELS_PER_LATENT_PATCH, check_positions, position_limits
from serve_app.engines.lora import AdapterError, UnknownAdapter
from serve_app.engines.model_sources import load_transformer_config
from serve_app.openai_api import APIError
from serve_app.stage_messages import DenoisedLatents, DenoiseProgress, DenoiseRequest

if TYPE_CHECKING:
    from serve_app.engines.denoiser import Denoiser


@dataclass
class _Job:
    """What the batcher queues: the request, and for a streaming call where its progress goes."""

    request: DenoiseRequest
    sink: Callable[[DenoiseProgress], None] | None = None


def make_denoiser(cfg: AppConfig) -> Denoiser:
    # the engines (diffusers, transformers, peft) are imported in the replica that builds one, not where the
    # app is only bound: `serve run`'s build task, on the path to a cold start, imports serve_app.app
    from serve_app.engines.denoiser import DenoiserEngine

    if cfg.denoiser.sp_degree > 1:
        import ray

        from serve_app.sp.rank_group import SPGroup

        return SPGroup(cfg, placement_group=ray.util.get_current_placement_group(), first_bundle_index=1)
    return DenoiserEngine(cfg.model, cfg.denoiser, lora=cfg.lora)


class _HeldAdapter:
    """What Serve's multiplexing caches per adapter name: when it unloads one (LRU), the engine drops it."""

    def __init__(self, engine: Denoiser, name: str, held: set):
        self.engine, self.name, self.held, self.unloaded = engine, name, held, False
        held.add(name)

    def __del__(self):  # Serve calls it on unloading (and Python may again when the object goes)
        if self.unloaded:
            return
        self.unloaded = True
        self.held.discard(self.name)
        try:
            self.engine.unload_adapter(self.name)
        except Exception:  # a dead SP rank: the health check replaces the group
            pass


@serve.deployment
class DenoiserDeployment:
    def __init__(self, app_config: dict, route: str | None = None):
        """`route`: the size route (`denoiser_routes[].name`) this deployment serves; None: the main one."""
        full = AppConfig.model_validate(app_config)
        cfg = full.for_route(route)  # this deployment's SP degrees, warm-up sizes and options
        opts = cfg.denoiser_deployment
        # one thread runs every forward, warm-up included; the next batch is formed when it is free
        self._gpu_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="denoiser")
        sizes, batch = full.dit_start_sizes(route), min(2, opts.max_batch_size)
        # build: load (or random init) + the DiT builder's steps; warmup: the first forwards (compilation)
        self.engine, self.stats_ = StageStats.start(
            lambda: make_denoiser(cfg), lambda engine: self._gpu_thread.submit(engine.warmup, sizes, batch=batch).result(),
            opts.gpu_memory_gb if cfg.denoiser.sp_degree == 1 else None,  # an SP replica holds no GPU itself
            stage="denoiser",
        )
        from serve_app.metrics import DenoiserMetrics

        self.metrics = DenoiserMetrics()  # batch sizes, forwards by batch size, queued requests
        self.stats_.on_batch_start = lambda: self.metrics.queued.set(self._batcher.pending())
        self._batch_started: float | None = None  # when the running batch began (None: idle)
        self.max_batch_s = cfg.denoiser.max_batch_s
        tcfg = load_transformer_config(cfg.model)
        self.cap_feat_dim = tcfg["cap_feat_dim"]
        self.position_limits = position_limits(tcfg)
        self._batcher = GpuBatcher(
            self._denoise, self._gpu_thread, opts.max_batch_size, opts.batch_wait_timeout_s,
            cost_fn=lambda j: j.request.height * j.request.width, max_batch_cost=cfg.denoiser.max_batch_pixels,
            wait_fn=lambda j: j.request.companions > 1,  # wait for company only when some is on its way
        )
        self._held_adapters: set[str] = set()
        if cfg.lora.enabled:
            engine, held = self.engine, self._held_adapters

            async def load_adapter(name: str) -> _HeldAdapter:
                await asyncio.to_thread(engine.load_adapter, name)
                return _HeldAdapter(engine, name, held)

            # wrapped here, not on the class: the per-replica limit comes from the config
            self._adapter = serve.multiplexed(max_num_models_per_replica=cfg.lora.max_loaded)(load_adapter)
        # per-step reports need the engine in this process (make_denoiser built a local one); an SP group's
        # ranks run elsewhere, so a streamed request on an SP replica gets its queue position and final image only
        self._steps_reported = cfg.denoiser.sp_degree == 1
        self.streams = 0

    def _denoise(self, jobs: list[_Job]) -> list[DenoisedLatents]:
        self._batch_started = time.monotonic()
        requests = [j.request for j in jobs]
        sinks = [j.sink for j in jobs]
        # only a batch with a streaming request reports steps (the others run exactly as before)
        on_step = (lambda i, p: sinks[i] and sinks[i](p)) if self._steps_reported and any(sinks) else None
        try:
            latents, dt = self.stats_.timed(
                lambda reqs: [lat.cpu() for lat in (self.engine.denoise(reqs, on_step) if on_step else self.engine.denoise(reqs))], requests)
        finally:
            self._batch_started = None
        self.metrics.batch(len(requests), self.engine.stats().get("forward_batch_sizes", {}))
        return [DenoisedLatents(latents=lat, timings={"denoiser_s": dt, "denoiser_batch": len(requests)}) for lat in latents]

    def _validate(self, r: DenoiseRequest) -> None:
        """Per request, before it joins a batch: what the DiT would otherwise fail on inside the forward."""
        if r.embeds.ndim != 2 or r.embeds.shape[1] != self.cap_feat_dim:
            raise ValueError(f"embeds must be [tokens, {self.cap_feat_dim}], got {tuple(r.embeds.shape)}")
        if r.height % PIXELS_PER_LATENT_PATCH or r.width % PIXELS_PER_LATENT_PATCH or r.steps < 1:
            raise ValueError(f"height and width must be multiples of {PIXELS_PER_LATENT_PATCH}, steps at least 1")
        if r.guidance_scale > 0 and r.negative_embeds is None:
            raise ValueError("guidance_scale > 0 needs negative_embeds")
        try:
            check_positions(r, self.position_limits)
        except ValueError as e:
            raise APIError(400, str(e), param="prompt" if "prompt" in str(e) else "size", code="invalid_value") from None

    async def _load_adapters(self, request: DenoiseRequest) -> float:
        """Get the request's adapters through Serve's multiplexed loader; seconds spent waiting for any
        that this replica did not hold yet (0 when it held them all)."""
        if not request.lora:
            return 0.0
        if not hasattr(self, "_adapter"):
            raise APIError(400, "this server serves no LoRA adapters", param="lora", code="lora_not_found")
        t0, fresh = time.perf_counter(), any(n not in self._held_adapters for n, _ in request.lora)
        try:
            for name, _ in request.lora:
                await self._adapter(name)
            await asyncio.to_thread(self.engine.check_adapters, request.lora)  # ranks within lora.max_rank
        except UnknownAdapter as e:  # gone from lora.dir since the ingress looked
            raise APIError(400, str(e), param="lora", code="lora_not_found") from None
        except AdapterError as e:  # not a LoRA checkpoint, DoRA, ranks past lora.max_rank, ...
            raise APIError(400, f"lora: {e}", param="lora", code="invalid_value") from None
        # anything else (an unreadable file in lora.dir) is the server's: a 500 with the request id
        return time.perf_counter() - t0 if fresh else 0.0

    async def denoise(self, request: DenoiseRequest) -> DenoisedLatents:
        self.metrics.queued.set(self._batcher.pending() + 1)  # with this one (one refused next: set right at the next batch)
        self._validate(request)
        load_s = await self._load_adapters(request)
        result = await self._batcher.submit(_Job(request))
        result.timings["lora_load_s"] = load_s
        return result

    async def denoise_stream(self, request: DenoiseRequest) -> AsyncIterator[DenoiseProgress | DenoisedLatents]:
        """`denoise` as a stream (the caller's handle has `.options(stream=True)`): its queue position, a
        `DenoiseProgress` per step (previews at `request.preview_steps`), then the `DenoisedLatents`. The
        request batches with any others; each gets its own reports. Cancelling the stream drops a queued
        request (a running batch finishes its steps)."""
        self._validate(request)
        load_s = await self._load_adapters(request)
        self.streams += 1
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        position = self._batcher.pending() + (self._batch_started is not None)
        job = _Job(request, lambda p: loop.call_soon_threadsafe(events.put_nowait, p))
        result = asyncio.ensure_future(self._batcher.submit(job))
        try:
            yield DenoiseProgress(step=0, steps=request.run_steps, queue_position=position)
            while not result.done():
                get = asyncio.ensure_future(events.get())
                await asyncio.wait({get, result}, return_when=asyncio.FIRST_COMPLETED)
                if get.done():
                    yield get.result()
                else:
                    get.cancel()
            # the GPU thread's reports were queued on this loop before the batch's result was set
            while not events.empty():
                yield events.get_nowait()
            latents = result.result()
            latents.timings["lora_load_s"] = load_s
            yield latents
        finally:
            result.cancel()

    def stats(self) -> dict:
        # "engine": what the DiT builder applied on this chip (attention per block group, FP8, compile, SP
        # layout) and every fallback taken; for an SP group, rank 0's, with every rank's place
        return {**self.stats_.snapshot(), **self.engine.stats(), "engine": self.engine.info(), "isolated_retries": self._batcher.isolated_retries,
                "streams": self.streams}

    def ready(self) -> bool:
        return True

    def check_health(self) -> None:
        # Serve calls this periodically; an SP group with a dead or hung rank raises here, and so does a
        # batch that has run past denoiser.max_batch_s (a wedged forward), so Serve marks the replica
        # unhealthy (/health/ready turns 503) and replaces it, and with it the whole group.
        started = self._batch_started
        if started is not None and time.monotonic() - started > self.max_batch_s:
            raise RuntimeError(f"a DiT batch has run for more than denoiser.max_batch_s={self.max_batch_s} s")
        self.engine.check_health()
