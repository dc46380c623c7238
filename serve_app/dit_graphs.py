"""CUDA graphs of the whole DiT forward (`denoiser.cuda_graph`).

Between and around its compiled blocks, diffusers' Z-Image forward runs Python: patchify, RoPE tables,
padding, masks, unpatchify, and the launch of every kernel. On H100 a compiled forward leaves the GPU idle
for ~5 ms (FP8) to ~9 ms (bf16) of its ~80–100 ms. A CUDA graph of the whole forward replays all of it with
one launch.

A graph needs fixed shapes, and the forward's shapes follow each caption's exact length (Z-Image pads a
caption to a multiple of 32 tokens with a learned pad token, which the image attends to). So captions are
padded to that multiple here, before the forward, and a hook on `cap_embedder` puts the pad token in the
padded rows, where diffusers would have put it: the model sees the same sequence, and a graph serves every
caption length that pads to the same size. One graph per (batch, latent shape, padded caption length),
captured on first use (or at warm-up), least recently used dropped past `max_graphs`. Batches whose captions
pad to different lengths carry an attention mask and run eagerly.
"""

from __future__ import annotations

import collections
import logging

import torch

log = logging.getLogger(__name__)

CAPTION_PAD = 32  # Z-Image's SEQ_MULTI_OF


def padded_length(tokens: int) -> int:
    return -(-tokens // CAPTION_PAD) * CAPTION_PAD


class _Graph:
    def __init__(self, latents, timestep, captions, valid):
        self.latents, self.timestep, self.captions, self.valid = latents, timestep, captions, valid
        self.graph: torch.cuda.CUDAGraph | None = None
        self.out: torch.Tensor | None = None


class DiTGraphs:
    def __init__(self, transformer, max_graphs: int = 64):
        self.transformer = transformer
        self.max_graphs = max_graphs
        self.graphs: collections.OrderedDict[tuple, _Graph] = collections.OrderedDict()
        self.pool = None
        self.disabled: str | None = None  # why graphs stopped being used, after a failed capture
        self.captures = 0
        self._valid: torch.Tensor | None = None  # [B] caption lengths, while a padded forward runs
        self._padded = 0
        transformer.cap_embedder.register_forward_hook(self._pad_hook)

    def _pad_hook(self, module, args, out):
        if self._valid is None:
            return None
        keep = torch.arange(self._padded, device=out.device)[None, :] < self._valid[:, None]  # [B, P]
        return torch.where(keep.reshape(-1, 1), out, self.transformer.cap_pad_token.to(out.dtype))

    def padded_forward(self, latents: torch.Tensor, timestep: torch.Tensor, captions: torch.Tensor,
                       valid: torch.Tensor) -> torch.Tensor:
        """The DiT on fixed shapes: latents [B, C, 1, h, w], captions [B, P, D] padded to P (a multiple of
        32) with `valid` [B] real rows each -> [B, C, 1, h, w]. Equal to the forward on the unpadded captions."""
        self._valid, self._padded = valid, captions.shape[1]
        try:
            out = self.transformer(list(latents.unbind(0)), timestep, list(captions.unbind(0)), return_dict=False)[0]
        finally:
            self._valid = None
        return torch.stack(out)

    @staticmethod
    def pad_captions(embeds: list[torch.Tensor], length: int, out: torch.Tensor | None = None) -> torch.Tensor:
        out = out if out is not None else embeds[0].new_empty(len(embeds), length, embeds[0].shape[1])
        out.zero_()
        for i, e in enumerate(embeds):
            out[i, : e.shape[0]].copy_(e)
        return out

    def forward(self, latents: list[torch.Tensor], timestep: torch.Tensor, embeds: list[torch.Tensor]) -> list[torch.Tensor] | None:
        """The DiT's output for one batch through a graph, or None when this batch cannot use one (the
        caller then runs the forward eagerly)."""
        if self.disabled is not None:
            return None
        lengths = [e.shape[0] for e in embeds]
        padded = padded_length(lengths[0])
        if any(padded_length(n) != padded for n in lengths) or len({tuple(x.shape) for x in latents}) != 1:
            return None
        key = (len(latents), tuple(latents[0].shape), padded, latents[0].dtype)
        g = self.graphs.get(key)
        if g is None:
            g = self._capture(key, latents, timestep, embeds, padded)
            if g is None:
                return None
        self.graphs.move_to_end(key)
        torch.stack(latents, out=g.latents)
        g.timestep.copy_(timestep)
        self.pad_captions(embeds, padded, g.captions)
        g.valid.copy_(torch.tensor(lengths))
        g.graph.replay()
        return list(g.out.clone().unbind(0))

    def _capture(self, key, latents, timestep, embeds, padded) -> _Graph | None:
        device = latents[0].device
        g = _Graph(torch.stack(latents), timestep.clone(), self.pad_captions(embeds, padded),
                   torch.tensor([e.shape[0] for e in embeds], device=device))
        try:
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):  # compile, pick kernels and allocate outside the capture
                for _ in range(2):
                    self.padded_forward(g.latents, g.timestep, g.captions, g.valid)
            torch.cuda.current_stream(device).wait_stream(side)
            if self.pool is None:
                self.pool = torch.cuda.graph_pool_handle()
            g.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g.graph, pool=self.pool):
                g.out = self.padded_forward(g.latents, g.timestep, g.captions, g.valid)
        except Exception as e:  # never take the replica down: run eagerly from now on
            self.disabled = f"capture of {key} failed: {type(e).__name__}: {e}"[:500]
            log.warning("DiT CUDA graphs off: %s", self.disabled)
            self.graphs.clear()
            return None
        self.captures += 1
        self.graphs[key] = g
        while len(self.graphs) > self.max_graphs:
            self.graphs.popitem(last=False)
        return g

    def snapshot(self) -> dict:
        return {"graphs": len(self.graphs), "captures": self.captures, "disabled": self.disabled}
