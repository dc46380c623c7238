"""VAE stage: latents -> uint8 RGB images [H, W, 3] (decode), and for edits uint8 images -> latents (encode).

Same arithmetic as ZImagePipeline's decode and VaeImageProcessor.postprocess (unscale, unshift,
decode, x*0.5+0.5 clamped in the VAE's dtype, then *255 rounded in float32), done on the device so
only uint8 pixels travel back. `encode` is ZImageImg2ImgPipeline's: VaeImageProcessor's x/255*2-1 in
float32, cast to the VAE's dtype, the posterior sampled with the request's seed (the generator's first
draw), shifted and scaled; uint8 pixels travel in, latents in the VAE's dtype travel out.
"""

from __future__ import annotations

import torch

from serve_app.engines.compile_cache import use_compile_cache
from serve_app.config import ModelConfig, VaeConfig
from serve_app.engines.devices import placement, process_memory_capped
from serve_app.engines.library_internals import fx_graph_cache_misses, mark_spatial_dims_dynamic
from serve_app.engines.model_sources import load_vae


class SpatialDynamicCall(torch.nn.Module):
    """The compiled decoder, its input's height and width marked symbolic at every call: the tiles of a
    tiled decode too (diffusers slices them inside `decode`), which unmarked recompiled per tile shape on
    the request path (24gb config, first 2048² request: 78 s of compiles, benchmarks/README.md)."""

    def __init__(self, decoder):
        super().__init__()
        self.inner = decoder

    def forward(self, z, *args, **kwargs):
        z = z.contiguous()  # a tile is a view: its offset and strides would be guarded on too
        mark_spatial_dims_dynamic(z)
        return self.inner(z, *args, **kwargs)


class StaticOrSymbolic(torch.nn.Module):
    """The compiled decoder twice: a static graph for the latent shapes in `static_shapes` (batch 1), the
    symbolic one (`SpatialDynamicCall`) for every other shape and every tile. Static kernels are faster at
    the sizes a server mostly serves (benchmarks/README.md, "VAE static graphs")."""

    def __init__(self, decoder, static_shapes, backend: str = "inductor"):
        super().__init__()
        self.static = torch.compile(decoder, backend=backend, dynamic=False)
        self.symbolic = SpatialDynamicCall(torch.compile(decoder, backend=backend, dynamic=None))
        self.static_shapes = set(static_shapes)

    def forward(self, z, *args, **kwargs):
        if z.shape[0] == 1 and tuple(z.shape[2:]) in self.static_shapes:
            return self.static(z, *args, **kwargs)
        return self.symbolic(z, *args, **kwargs)


class VaeEngine:
    def __init__(self, model_cfg: ModelConfig, cfg: VaeConfig):
        self.cfg = cfg
        self.compile_cache_dir = use_compile_cache(model_cfg.compile_cache_dir)
        self.device, self.dtype = placement(model_cfg)
        self.prefill = None  # the child compiling the static graphs meanwhile (serve_app/engines/vae_static_prefill.py)
        if (cfg.prefill_static_graphs and cfg.compile and cfg.compile_dynamic and cfg.static_sizes
                and self.device.type == "cuda" and not process_memory_capped(self.device)):
            from serve_app.engines.vae_static_prefill import start_prefill

            self.prefill = start_prefill(model_cfg.model_dump_json(), [(h // 8, w // 8) for h, w in cfg.static_sizes])
        self.vae = load_vae(model_cfg, self.device, self.dtype)
        self.scaling_factor = self.vae.config.scaling_factor
        self.shift_factor = self.vae.config.shift_factor
        self.compiled = bool(cfg.compile and self.device.type != "cpu")
        self.spatial_dynamic = self.compiled and cfg.compile_dynamic
        if self.spatial_dynamic and cfg.static_sizes:
            self.vae.decoder = StaticOrSymbolic(self.vae.decoder, [(h // 8, w // 8) for h, w in cfg.static_sizes])
        elif self.compiled:
            # dynamic=None: the dims marked at each call are symbolic, the rest (batch 1, channels) static
            decoder = torch.compile(self.vae.decoder, dynamic=None if self.spatial_dynamic else False)
            self.vae.decoder = SpatialDynamicCall(decoder) if self.spatial_dynamic else decoder

    def warm_up(self, sizes: list[tuple[int, int]]) -> None:
        """Decode each (height, width) once, so that their graphs exist before traffic. With static graphs,
        the symbolic one (which serves every other size) is traced first and at the first size, as it is
        without them: Inductor keeps the kernels it picked for the size it first traced."""
        c = self.vae.config.latent_channels
        misses = fx_graph_cache_misses()
        if isinstance(self.vae.decoder, StaticOrSymbolic) and sizes:
            h, w = sizes[0]
            with torch.no_grad():  # the decoder's own input: post_quant_conv keeps the latent's shape
                self.vae.decoder.symbolic(torch.zeros(1, c, h // 8, w // 8, device=self.device, dtype=self.dtype))
        if self.prefill is not None:  # its static graphs are in the cache now (or this process compiles them)
            from serve_app.engines.vae_static_prefill import stop_prefill, wait_prefill

            # the symbolic graph came from the cache: so will the static ones, sooner than the child is done
            (stop_prefill if fx_graph_cache_misses() == misses else wait_prefill)(self.prefill)
            self.prefill = None
        for h, w in sizes:
            self.decode([torch.zeros(c, h // 8, w // 8)])

    @torch.no_grad()
    def decode(self, latents: list[torch.Tensor]) -> list[torch.Tensor]:
        """uint8 [H, W, 3] (CPU) for each [C, h, w] latent; same-shape latents share one decode."""
        out: list[torch.Tensor | None] = [None] * len(latents)
        by_shape: dict[tuple, list[int]] = {}
        for i, lat in enumerate(latents):
            by_shape.setdefault(tuple(lat.shape), []).append(i)
        for shape, idx in by_shape.items():
            # compiled, one image at a time: a new batch size would recompile, and batching a decode
            # gains nothing (benchmarks/README.md, "VAE")
            chunks = [[i] for i in idx] if self.compiled else [idx]
            for chunk in chunks:
                batch = torch.stack([latents[i] for i in chunk]).to(self.device, self.dtype)
                for i, img in zip(chunk, self._decode_batch(batch)):
                    out[i] = img
        return out  # type: ignore[return-value]

    @torch.no_grad()
    def encode(self, images: list[torch.Tensor], seeds: list[list[int]]) -> list[list[torch.Tensor]]:
        """For each uint8 [H, W, 3] image (CPU, sides multiples of 16), one latent [C, H/8, W/8] (CPU, the
        VAE's dtype) per seed of its list. Same-shape images share one encoder forward; each seed samples
        the posterior from a CPU generator seeded with it, as diffusers does for one image."""
        out: list[list[torch.Tensor] | None] = [None] * len(images)
        by_shape: dict[tuple, list[int]] = {}
        for i, img in enumerate(images):
            by_shape.setdefault(tuple(img.shape), []).append(i)
        for idx in by_shape.values():
            x = torch.stack([images[i] for i in idx]).to(self.device).permute(0, 3, 1, 2).float() / 255.0
            dist = self._encode_batch((2.0 * x - 1.0).to(self.dtype))
            for j, i in enumerate(idx):
                mean, std = dist.mean[j : j + 1], dist.std[j : j + 1]
                lats = []
                for seed in seeds[i]:
                    g = torch.Generator("cpu").manual_seed(seed)
                    sample = torch.randn(mean.shape, generator=g, dtype=mean.dtype).to(self.device)
                    z = ((mean + std * sample) - self.shift_factor) * self.scaling_factor
                    lats.append(z[0].cpu())
                out[i] = lats
        return out  # type: ignore[return-value]

    def _encode_batch(self, x: torch.Tensor):
        tiled = x.shape[2] * x.shape[3] > self.cfg.tiling_min_pixels
        if tiled:
            self.vae.enable_tiling()
        try:
            return self.vae.encode(x).latent_dist
        finally:
            if tiled:
                self.vae.disable_tiling()

    def _decode_batch(self, latents: torch.Tensor) -> torch.Tensor:
        pixels = latents.shape[2] * latents.shape[3] * 64
        tiled = pixels > self.cfg.tiling_min_pixels
        if tiled:
            self.vae.enable_tiling()
        try:
            z = latents / self.scaling_factor + self.shift_factor
            image = self.vae.decode(z, return_dict=False)[0]
        finally:
            if tiled:
                self.vae.disable_tiling()
        image = (image * 0.5 + 0.5).clamp(0, 1)
        image = (image.float() * 255).round().to(torch.uint8)
        return image.permute(0, 2, 3, 1).contiguous().cpu()
