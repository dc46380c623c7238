"""CUDA graphs of one DiT forward for small images (`denoiser.cuda_graph_max_pixels`).

At 512² batch 1 the CPU takes longer to launch a compiled forward's kernels than the GPU takes to run them;
a graph replays the whole forward with one launch (benchmarks/README.md, "DiT CUDA graphs for small sizes";
at 1024² the forward is GPU-bound and a graph gained nothing: "CUDA graphs of the whole DiT forward").

A graph needs fixed shapes, and the forward's follow each caption's length. Z-Image pads a caption to a
multiple of 32 tokens with a learned pad token that the image attends to, so captions are padded to that
multiple here, before the forward, and a hook on `cap_embedder` puts the pad token in the padded rows,
where diffusers would put it: the blocks see the same sequence and positions, and one graph serves every
caption length that pads alike. Graphs are captured at warm-up only, one per (batch, latent shape, padded
caption length) bucket the engine asks for; any other forward (captions padding to different lengths,
which need a key mask; a size or batch not captured) runs the model as before. All graphs share one
memory pool: their replays never overlap (one GPU thread runs every forward).
"""

from __future__ import annotations

import logging

import torch

from serve_app.engines.dit_positions import CAPTION_PAD

log = logging.getLogger(__name__)

MAX_CAPTION_TOKENS = 512  # the text encoder's default max_sequence_length: longer captions run uncaptured


def padded_length(tokens: int) -> int:
    return -(-tokens // CAPTION_PAD) * CAPTION_PAD


def caption_buckets(max_tokens: int = MAX_CAPTION_TOKENS) -> list[int]:
    """Every padded caption length up to `max_tokens`: 32, 64, ..."""
    return list(range(CAPTION_PAD, padded_length(max_tokens) + 1, CAPTION_PAD))


class _Graph:
    """A captured forward and its static buffers: inputs are copied in, the output read out."""

    def __init__(self, latents: torch.Tensor, timestep: torch.Tensor, captions: torch.Tensor, valid: torch.Tensor):
        self.latents, self.timestep, self.captions, self.valid = latents, timestep, captions, valid
        self.graph: torch.cuda.CUDAGraph | None = None
        self.out: torch.Tensor | None = None


class DiTGraphs:
    """Captured forwards of `transformer`, replayed for a batch whose bucket was captured."""

    def __init__(self, transformer):
        self.transformer = transformer
        self.cap_feat_dim = transformer.config.cap_feat_dim
        self.graphs: dict[tuple, _Graph] = {}
        self.pool = None  # made at the first capture
        self.disabled: str | None = None  # why no graph runs any more (a failed capture)
        self._valid: torch.Tensor | None = None  # [B] real caption rows, while a padded forward runs
        transformer.cap_embedder.register_forward_hook(self._pad_hook)

    def _pad_hook(self, module, args, out):
        if self._valid is None:  # an ordinary forward: diffusers places its pad tokens itself
            return None
        padded = out.shape[0] // self._valid.shape[0]
        keep = torch.arange(padded, device=out.device)[None, :] < self._valid[:, None]  # [B, P]
        return torch.where(keep.reshape(-1, 1), out, self.transformer.cap_pad_token.to(out.dtype))

    def padded_forward(self, latents: torch.Tensor, timestep: torch.Tensor, captions: torch.Tensor,
                       valid: torch.Tensor) -> torch.Tensor:
        """The DiT on fixed shapes: latents [B, C, 1, h, w], captions [B, P, D] (P a multiple of 32) of which
        the first `valid` [B] rows are real -> [B, C, 1, h, w], the forward on the unpadded captions."""
        self._valid = valid
        try:
            out = self.transformer(list(latents.unbind(0)), timestep, list(captions.unbind(0)), return_dict=False)[0]
        finally:
            self._valid = None
        return torch.stack(out)

    @staticmethod
    def key(latents: torch.Tensor, embeds: list[torch.Tensor]) -> tuple:
        """The bucket of a batch: (batch, latent shape [C, 1, h, w], padded caption length or None when the
        captions pad to different lengths, dtype)."""
        padded = {padded_length(e.shape[0]) for e in embeds}
        return (latents.shape[0], tuple(latents.shape[1:]), padded.pop() if len(padded) == 1 else None, latents.dtype)

    def capture(self, batch: int, latent_shape: tuple, dtype: torch.dtype, lengths: list[int]) -> int:
        """Capture a graph for `batch` x `latent_shape` at each padded caption length of `lengths` not yet
        captured; returns how many were. A failed capture turns every graph off (the model runs as before)."""
        device = self.transformer.device
        n = 0
        for length in lengths:
            key = (batch, tuple(latent_shape), length, dtype)
            if self.disabled is not None:
                break
            if key in self.graphs:
                continue
            g = _Graph(torch.randn((batch, *latent_shape), device=device, dtype=dtype),
                       torch.full((batch,), 0.5, device=device),
                       torch.randn((batch, length, self.cap_feat_dim), device=device, dtype=dtype),
                       torch.full((batch,), length, device=device, dtype=torch.long))
            try:
                with torch.no_grad():
                    side = torch.cuda.Stream(device)
                    side.wait_stream(torch.cuda.current_stream(device))
                    with torch.cuda.stream(side):  # compile, pick kernels and allocate outside the capture
                        for _ in range(2):
                            self.padded_forward(g.latents, g.timestep, g.captions, g.valid)
                    torch.cuda.current_stream(device).wait_stream(side)
                    if self.pool is None:
                        self.pool = torch.cuda.graph_pool_handle()
                    g.graph = torch.cuda.CUDAGraph()
                    # thread_local: a stats call on another thread of the replica must not void the capture
                    with torch.cuda.graph(g.graph, pool=self.pool, capture_error_mode="thread_local"):
                        g.out = self.padded_forward(g.latents, g.timestep, g.captions, g.valid)
            except Exception as e:  # never take the replica down: the model runs uncaptured from now on
                self.disabled = f"capture of {key} failed: {type(e).__name__}: {e}"[:500]
                log.warning("DiT CUDA graphs off: %s", self.disabled)
                self.graphs.clear()
                return 0
            self.graphs[key] = g
            n += 1
        return n

    def forward(self, latents: torch.Tensor, timestep: torch.Tensor, embeds: list[torch.Tensor]) -> list[torch.Tensor] | None:
        """The DiT's output ([C, 1, h, w] per item) for latents [B, C, 1, h, w] through the graph of their
        bucket, or None when none was captured (the caller runs the model)."""
        g = self.graphs.get(self.key(latents, embeds)) if self.disabled is None else None
        if g is None:
            return None
        g.latents.copy_(latents)
        g.timestep.copy_(timestep)
        g.captions.zero_()
        for i, e in enumerate(embeds):
            g.captions[i, : e.shape[0]].copy_(e)
        g.valid.copy_(torch.tensor([e.shape[0] for e in embeds]), non_blocking=True)
        g.graph.replay()
        return list(g.out.clone().unbind(0))  # the next replay overwrites g.out

    def snapshot(self) -> dict:
        return {"graphs": len(self.graphs), "disabled": self.disabled}
