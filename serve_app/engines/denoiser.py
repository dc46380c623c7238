"""DiT denoiser stage: text embeddings + (height, width, steps, seed) per request -> latents.

The loop is `ZImagePipeline.__call__`'s, operation for operation, so that on the same weights and seed
the result is the same. Requests of one shape share each DiT forward; each request's starting noise
comes from a CPU generator seeded with its own seed, exactly as diffusers draws it for one image, so
an image does not depend on what it was batched with (beyond float rounding).

Schedule: diffusers 0.42's Z-Image default, sigmas = linspace(1, 1/steps, steps) shifted by the
scheduler's shift (3.0, no dynamic shifting), then a final step to 0. `steps` is the number of DiT
forwards; Turbo's 8 forwards is `steps=8` here. (Older diffusers releases built the schedule from
`num_inference_steps` with a trailing zero-sigma step, which is why Z-Image-Turbo's model card asks for
9 "steps" to get 8 forwards; with 0.42 the two coincide.)

Edits: a request with `image_latents` runs as `ZImageImg2ImgPipeline` does: only the schedule's steps from
`start_step` on (strength s of k steps: k - int(k - s*k) forwards), starting from the encoded image noised
to that step's sigma with the request's own noise; with a `mask`, as `ZImageInpaintPipeline` does: after
each step the kept region is reset to the image noised to the next step's sigma (the image itself after
the last). diffusers draws from one generator seeded with the seed: the VAE posterior sample first
(serve_app/engines/vae.py draws it), then the noise; `edit_noise` skips the first draw to get the second.
"""

from __future__ import annotations

import collections
import threading
from typing import Callable, Protocol

import torch

from serve_app.config import DenoiserConfig, LoraConfig, ModelConfig
from serve_app.engines.compile_cache import use_compile_cache
from serve_app.engines.devices import placement
from serve_app.engines.dit_positions import CAPTION_PAD, PIXELS_PER_LATENT_PATCH, check_positions, position_limits
from serve_app.engines.dit_builder import SPOptions, build_dit
from serve_app.engines.dit_graphs import MAX_CAPTION_TOKENS, DiTGraphs, caption_buckets
from serve_app.engines.lora import AdapterError, LoraAdapters, side_paths
from serve_app.engines.model_sources import load_scheduler_config, lora_folder
from serve_app.engines.previews import LatentRGB, x0_estimate
from serve_app.stage_messages import DenoiseProgress, DenoiseRequest

# on_step(request index, progress): called on the GPU thread after each DiT step of a request, when given
StepCallback = Callable[[int, DenoiseProgress], None]



class Denoiser(Protocol):
    """What the denoiser deployment drives: a local `DenoiserEngine` or an SP group of them
    (`serve_app.sp.rank_group.SPGroup`)."""

    device: torch.device  # where `denoise` returns its latents

    def denoise(self, requests: list[DenoiseRequest]) -> list[torch.Tensor]:
        """Latents [C, h, w] float32 per request, in order."""

    def warmup(self, sizes: list[tuple[int, int]], steps: int = 1, batch: int = 1) -> None: ...

    def stats(self) -> dict:
        """Counters: forwards, batches, requests, forward batch sizes, mixed-shape forwards."""

    def info(self) -> dict:
        """What was built (`DiTBuild.as_dict()`), plus the SP ranks for a group."""

    def check_health(self) -> None:
        """Raise if the engine cannot serve (a dead or hung SP rank)."""

    def load_adapter(self, name: str) -> None:
        """Hold LoRA adapter `name` (an SP group: on every rank); AdapterError if it cannot be."""

    def unload_adapter(self, name: str) -> None: ...

    def check_adapters(self, adapters) -> None:
        """AdapterError if this ((name, scale), ...) set cannot run here (ranks past lora.max_rank)."""

    def shutdown(self) -> None: ...


def default_sigmas(steps: int) -> list[float]:
    return torch.linspace(1.0, 1 / steps, steps).tolist()


def calculate_shift(image_seq_len, base_seq_len=256, max_seq_len=4096, base_shift=0.5, max_shift=1.15) -> float:
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * m + (base_shift - m * base_seq_len)


def initial_noise(seed: int, channels: int, height: int, width: int) -> torch.Tensor:
    """[1, C, h, w] float32 noise on CPU, as diffusers' randn_tensor draws it from a CPU generator."""
    shape = (1, channels, 2 * (height // PIXELS_PER_LATENT_PATCH), 2 * (width // PIXELS_PER_LATENT_PATCH))
    return torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed), dtype=torch.float32)


def edit_noise(seed: int, shape: tuple, dtype: torch.dtype) -> torch.Tensor:
    """[1, C, h, w] noise of an edit: the second draw of a CPU generator seeded with `seed`, in the image
    latents' dtype (diffusers draws the VAE posterior sample, then this noise, in that order and dtype)."""
    g = torch.Generator("cpu").manual_seed(seed)
    torch.randn((1, *shape), generator=g, dtype=dtype)  # the VAE's posterior sample (drawn by the VAE stage)
    return torch.randn((1, *shape), generator=g, dtype=dtype)


def group_by_shape(requests: list[DenoiseRequest], same_caption_length: bool = False) -> dict[tuple, list[int]]:
    """Indices of the requests that may share a DiT forward: equal `batch_key`, and with
    `same_caption_length` also the same padded caption length, so that no forward needs a key mask."""
    groups: dict[tuple, list[int]] = collections.defaultdict(list)
    for i, r in enumerate(requests):
        key = r.batch_key + ((-(-r.embeds.shape[0] // CAPTION_PAD),) if same_caption_length else ())
        groups[key].append(i)
    return dict(groups)


class DenoiserStats:
    """Counters a test or the stats endpoint can read: how many DiT forwards ran, and at what batch."""

    def __init__(self):
        self._lock = threading.Lock()
        self.forwards = 0
        self.batches = 0
        self.requests = 0
        self.forward_batch_sizes: collections.Counter = collections.Counter()
        self.mixed_shape_forwards = 0  # forwards given inputs of more than one latent shape (must stay 0)
        self.graph_forwards = 0  # forwards replayed from a CUDA graph (serve_app/engines/dit_graphs.py)

    def record_forward(self, latent_shapes: set[tuple], forward_batch: int, graphed: bool = False) -> None:
        with self._lock:
            self.forwards += 1
            self.graph_forwards += graphed
            self.forward_batch_sizes[forward_batch] += 1
            self.mixed_shape_forwards += len(latent_shapes) > 1

    def record_batch(self, n_requests: int) -> None:
        with self._lock:
            self.batches += 1
            self.requests += n_requests

    def snapshot(self) -> dict:
        with self._lock:
            return {
                "forwards": self.forwards,
                "batches": self.batches,
                "requests": self.requests,
                "forward_batch_sizes": {str(k): v for k, v in sorted(self.forward_batch_sizes.items())},
                "mixed_shape_forwards": self.mixed_shape_forwards,
                "graph_forwards": self.graph_forwards,
            }


class DenoiserEngine:
    """The DiT on one device; with `sp`, one rank of a sequence-parallel group (every rank runs the same
    `denoise` calls and gets the same latents)."""

    def __init__(self, model_cfg: ModelConfig, cfg: DenoiserConfig, device: torch.device | None = None,
                 sp: SPOptions | None = None, lora: LoraConfig | None = None):
        self.cfg = cfg
        self.compile_cache_dir = use_compile_cache(model_cfg.compile_cache_dir)
        self.device, self.dtype = placement(model_cfg, device)
        folder = lora_folder(model_cfg, lora) if lora is not None else None
        self.transformer, self.build = build_dit(model_cfg, cfg, self.device, self.dtype, sp,
                                                 lora_max_rank=lora.max_rank if folder is not None else None)
        # LoRA: the side paths build_dit installed, and the adapters this DiT holds (None: no adapters)
        self.lora = None if folder is None else LoraAdapters(
            folder, side_paths(self.transformer), dict(self.transformer.config), self.device, self.dtype)
        self.scheduler_config = load_scheduler_config(model_cfg)
        self.in_channels = self.transformer.config.in_channels
        self.cap_feat_dim = self.transformer.config.cap_feat_dim
        self.position_limits = position_limits(dict(self.transformer.config))
        self._stats = DenoiserStats()
        self.same_caption_length_batches = self.build.sp is not None and cfg.sp_same_caption_length_batches
        # CUDA graphs of the small sizes' forwards, captured by warmup() (one GPU; not beside LoRA side paths)
        self.graphs = (DiTGraphs(self.transformer) if cfg.cuda_graph_max_pixels and self.device.type == "cuda"
                       and self.build.sp is None and self.lora is None else None)

    def stats(self) -> dict:
        return {**self._stats.snapshot(), **({"lora": self.lora.stats()} if self.lora is not None else {})}

    def load_adapter(self, name: str) -> None:
        """Hold LoRA adapter `name` (read now unless held); AdapterError if it cannot be."""
        if self.lora is None:
            raise AdapterError("this DiT serves no LoRA adapters (lora.enabled is off)")
        self.lora.load(name)

    def unload_adapter(self, name: str) -> None:
        if self.lora is not None:
            self.lora.unload(name)

    def check_adapters(self, adapters) -> None:
        """AdapterError if this adapter set cannot run (ranks past lora.max_rank); loads what it names."""
        if adapters and self.lora is None:
            raise AdapterError("this DiT serves no LoRA adapters (lora.enabled is off)")
        if adapters:
            self.lora.check(tuple(adapters))

    def info(self) -> dict:
        return {**self.build.as_dict(), "device": str(self.device), "compile_cache_dir": self.compile_cache_dir,
                "cuda_graphs": None if self.graphs is None else self.graphs.snapshot()}

    def forward(self, latents: torch.Tensor, timestep: torch.Tensor, embeds: list[torch.Tensor]) -> list[torch.Tensor]:
        """One DiT forward of latents [B, C, 1, h, w]: [C, 1, h, w] per item, through a captured graph where
        the batch's bucket has one, else through the model."""
        out = self.graphs.forward(latents, timestep, embeds) if self.graphs is not None else None
        self._stats.record_forward({tuple(latents.shape[1:])}, latents.shape[0], graphed=out is not None)
        if out is None:
            out = self.transformer(list(latents.unbind(dim=0)), timestep, embeds, return_dict=False)[0]
        return out

    def check_health(self) -> None:
        """Nothing to check beyond this process being alive (Serve's own health check covers that); an SP
        group checks its ranks here."""

    def shutdown(self) -> None:
        """Nothing to release: the weights go with the process; an SP group kills its rank actors here."""

    def _scheduler(self, steps: int, image_seq_len: int, start_step: int = 0):
        from diffusers import FlowMatchEulerDiscreteScheduler

        scheduler = FlowMatchEulerDiscreteScheduler.from_config(self.scheduler_config)
        mu = calculate_shift(
            image_seq_len,
            self.scheduler_config.get("base_image_seq_len", 256),
            self.scheduler_config.get("max_image_seq_len", 4096),
            self.scheduler_config.get("base_shift", 0.5),
            self.scheduler_config.get("max_shift", 1.15),
        )
        scheduler.set_timesteps(sigmas=default_sigmas(steps), device=self.device, mu=mu)
        scheduler.set_begin_index(start_step)
        return scheduler

    def validate(self, r: DenoiseRequest) -> None:
        if r.height % PIXELS_PER_LATENT_PATCH or r.width % PIXELS_PER_LATENT_PATCH:
            raise ValueError(f"height and width must be multiples of {PIXELS_PER_LATENT_PATCH}")
        if r.embeds.ndim != 2 or r.embeds.shape[1] != self.cap_feat_dim:
            raise ValueError(f"embeds must be [tokens, {self.cap_feat_dim}], got {tuple(r.embeds.shape)}")
        if r.guidance_scale > 0 and r.negative_embeds is None:
            raise ValueError("guidance_scale > 0 needs negative_embeds")
        latent_hw = (2 * (r.height // PIXELS_PER_LATENT_PATCH), 2 * (r.width // PIXELS_PER_LATENT_PATCH))
        if r.image_latents is not None:
            if tuple(r.image_latents.shape) != (self.in_channels, *latent_hw):
                raise ValueError(f"image_latents must be {(self.in_channels, *latent_hw)}, got {tuple(r.image_latents.shape)}")
            if not 0 < r.strength <= 1 or r.start_step >= r.steps:
                raise ValueError(f"strength {r.strength} with {r.steps} steps runs no step")
        if r.mask is not None and (r.image_latents is None or tuple(r.mask.shape) != latent_hw):
            raise ValueError(f"mask must be {latent_hw} and come with image_latents")
        if r.negative_embeds is not None and (r.negative_embeds.ndim != 2 or r.negative_embeds.shape[1] != self.cap_feat_dim):
            raise ValueError(f"negative_embeds must be [tokens, {self.cap_feat_dim}], got {tuple(r.negative_embeds.shape)}")
        check_positions(r, self.position_limits)

    @torch.no_grad()
    def denoise(self, requests: list[DenoiseRequest], on_step: StepCallback | None = None) -> list[torch.Tensor]:
        """Latents [C, h, w] (float32, engine device) for each request, in order. Requests are split into
        one batch per `group_by_shape` group; each group runs all its steps before the next starts.

        With `on_step`, each request is reported after each of its steps (`DenoiseProgress`), with a
        preview of its x0 estimate at its `preview_steps`; without it, nothing beyond the denoising runs."""
        for r in requests:
            self.validate(r)
        out: list[torch.Tensor | None] = [None] * len(requests)
        for _, idx in group_by_shape(requests, self.same_caption_length_batches).items():
            report = None if on_step is None else (lambda j, p, idx=idx: on_step(idx[j], p))
            for i, latents in zip(idx, self._denoise_group([requests[i] for i in idx], report)):
                out[i] = latents
        return out  # type: ignore[return-value]

    def _report(self, reqs: list[DenoiseRequest], step: int, latents: torch.Tensor, noise_pred: torch.Tensor, sigma: float,
                masks: dict, edits: dict, on_step: StepCallback) -> None:
        """After step `step` (0-based) of a group: one `DenoiseProgress` per request, a preview where asked."""
        want = [i for i, r in enumerate(reqs) if step + 1 in r.preview_steps]
        x0 = None
        if want:
            x0 = x0_estimate(latents[want], noise_pred[want], sigma)
            for k, i in enumerate(want):  # inpainting: the kept region is the image itself
                if i in masks:
                    x0[k : k + 1] = (1 - masks[i]) * edits[i][0] + masks[i] * x0[k : k + 1]
            if any(reqs[i].preview_kind == "latent_rgb" for i in want):
                if getattr(self, "_latent_rgb", None) is None:
                    self._latent_rgb = LatentRGB(self.in_channels, self.device)
                rgb = self._latent_rgb(x0).cpu()
            x0 = x0.float().cpu()
        for i, r in enumerate(reqs):
            preview = None
            if i in want:
                k = want.index(i)
                preview = rgb[k] if r.preview_kind == "latent_rgb" else x0[k]
            on_step(i, DenoiseProgress(step=step + 1, steps=r.run_steps, preview=preview, preview_kind=r.preview_kind if preview is not None else None))

    def _denoise_group(self, reqs: list[DenoiseRequest], on_step: StepCallback | None = None) -> list[torch.Tensor]:
        height, width, steps, start, lora = reqs[0].batch_key
        if self.lora is not None:
            self.lora.activate(lora)
        elif lora:
            raise AdapterError("this DiT serves no LoRA adapters (lora.enabled is off)")
        n = len(reqs)
        lh, lw = 2 * (height // PIXELS_PER_LATENT_PATCH), 2 * (width // PIXELS_PER_LATENT_PATCH)
        scheduler = self._scheduler(steps, (lh // 2) * (lw // 2), start)
        timesteps = scheduler.timesteps[start:]
        starts, edits = [], {}  # edits: request index -> (image latents, noise) on the device
        for i, r in enumerate(reqs):
            if r.image_latents is None:
                starts.append(initial_noise(r.seed, self.in_channels, r.height, r.width).to(self.device))
                continue
            image = r.image_latents.unsqueeze(0).to(self.device)
            noise = edit_noise(r.seed, tuple(r.image_latents.shape), image.dtype).to(self.device)
            edits[i] = (image, noise)
            # begin_index is `start` and no step has run: the sigma of timesteps[0], as in diffusers
            starts.append(scheduler.scale_noise(image, timesteps[:1], noise).float())
        latents = torch.cat(starts)  # float32: the first forward casts to the DiT's dtype, step() to fp32
        masks = {i: reqs[i].mask.to(self.device, edits[i][0].dtype)[None, None] for i in edits if reqs[i].mask is not None}

        cfg_idx = [i for i, r in enumerate(reqs) if r.guidance_scale > 0]
        embeds = [r.embeds.to(self.device, self.dtype) for r in reqs]
        embeds += [reqs[i].negative_embeds.to(self.device, self.dtype) for i in cfg_idx]
        n = len(reqs)
        # streaming only: the schedule's sigmas on the CPU once (x0 estimates), not a device sync per step.
        # A step is reported once it is queued on the device; a preview waits for its step's result.
        sigmas = scheduler.sigmas.tolist() if on_step is not None else None

        for step, t in enumerate(timesteps):
            timestep = (1000 - t.expand(n)) / 1000
            latent_in = latents.to(self.dtype)
            if cfg_idx:
                latent_in = torch.cat([latent_in, latent_in[cfg_idx]])
                timestep = torch.cat([timestep, timestep[cfg_idx]])
            model_out = self.forward(latent_in.unsqueeze(2), timestep, embeds)
            preds = [o.float() for o in model_out[:n]]
            for j, i in enumerate(cfg_idx):
                pos, neg = preds[i], model_out[n + j].float()
                preds[i] = pos + reqs[i].guidance_scale * (pos - neg)
            noise_pred = -torch.stack(preds, dim=0).squeeze(2)
            x_t = latents
            latents = scheduler.step(noise_pred.to(torch.float32), t, latents, return_dict=False)[0]
            for i, mask in masks.items():  # inpainting: keep the unmasked region on the image's path
                image, noise = edits[i]
                if step < len(timesteps) - 1:
                    image = scheduler.scale_noise(image, torch.tensor([timesteps[step + 1]]), noise)
                latents[i : i + 1] = (1 - mask) * image + mask * latents[i : i + 1]
            if on_step is not None:
                self._report(reqs, step, x_t, noise_pred, sigmas[start + step], masks, edits, on_step)

        self._stats.record_batch(n)
        return list(latents.unbind(0))

    def warmup(self, sizes: list[tuple[int, int]], steps: int = 1, batch: int = 1) -> None:
        """Run each size at batch 1, and at batch 2 when `batch` > 1, so that compilation and kernel
        selection happen before traffic. A batch runs one of two graphs, captions of one padded length
        (no mask) or of mixed lengths (a key mask); both are warmed where batches may mix lengths. The mixed
        pair pads to 32 and 96 tokens, not to 64, the RoPE table's width, which would leave the compiled
        caption refiner fixed to 64 tokens (benchmarks/README.md, "warm-up recompiles")."""
        pairs = [(16, 16)] if self.same_caption_length_batches else [(16, 16), (16, 80)]
        for h, w in sizes:
            self.denoise([DenoiseRequest(embeds=torch.zeros(16, self.cap_feat_dim), height=h, width=w, steps=steps, seed=0)])
            for lengths in pairs if batch > 1 else []:
                self.denoise([DenoiseRequest(embeds=torch.zeros(n, self.cap_feat_dim), height=h, width=w, steps=steps, seed=0) for n in lengths])
        for h, w in self.graph_sizes(sizes):
            latent_shape = (self.in_channels, 1, 2 * (h // PIXELS_PER_LATENT_PATCH), 2 * (w // PIXELS_PER_LATENT_PATCH))
            for b in range(1, self.cfg.cuda_graph_max_batch + 1):
                self.graphs.capture(b, latent_shape, self.dtype, caption_buckets(min(MAX_CAPTION_TOKENS, self.position_limits[0])))

    def graph_sizes(self, sizes: list[tuple[int, int]]) -> list[tuple[int, int]]:
        """The warm-up sizes whose forwards get CUDA graphs: those of at most `cuda_graph_max_pixels`."""
        if self.graphs is None:
            return []
        return [(h, w) for h, w in sizes if h * w <= self.cfg.cuda_graph_max_pixels]
