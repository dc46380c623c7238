"""Fused input projections of the DiT blocks (`denoiser.fuse_projections`): each attention's Q, K and V as
one linear `to_qkv`, each SwiGLU feed-forward's w1 and w3 as one linear `w13`.

Under FP8 every linear first quantizes its input (a per-token amax and cast) and then runs a GEMM: fused,
a block makes two of each where it made five. The weights are concatenated along the output dimension, so
every output channel is the same dot product as before: in bf16 / fp32 the result is the unfused one up to
the GEMM's blocking; under FP8 (quantized after this, one scale per weight row) every row keeps its own
scale and every token its one activation scale, so only the accumulation order can differ. The separate
linears are removed: parameter memory is unchanged.

    fuse_projections(transformer)  # before FP8 and compile (serve_app/engines/dit_builder.py)
    installed_fusion(transformer)  # True / False / "mixed", read from the modules
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def concatenated_linear(*linears: torch.nn.Linear) -> torch.nn.Linear:
    """One `nn.Linear` whose output is the outputs of `linears` (same input size) side by side."""
    first = linears[0]
    if any(lin.in_features != first.in_features or (lin.bias is None) != (first.bias is None) for lin in linears):
        raise ValueError("only linears of one input size, all with or all without a bias, can be concatenated")
    # built on meta, then given the concatenated tensors: no uninitialised weight is allocated
    fused = torch.nn.Linear(first.in_features, sum(lin.out_features for lin in linears), bias=first.bias is not None,
                            device="meta")
    fused.weight = torch.nn.Parameter(torch.cat([lin.weight.detach() for lin in linears]), first.weight.requires_grad)
    if first.bias is not None:
        fused.bias = torch.nn.Parameter(torch.cat([lin.bias.detach() for lin in linears]), first.bias.requires_grad)
    return fused


class FusedFeedForward(torch.nn.Module):
    """diffusers' Z-Image `FeedForward`, `w2(silu(w1(x)) * w3(x))`, with w1 and w3 as one linear `w13`."""

    def __init__(self, w13: torch.nn.Linear, w2: torch.nn.Linear):
        super().__init__()
        self.hidden_dim = w13.out_features // 2
        self.w13 = w13
        self.w2 = w2

    @classmethod
    def from_feed_forward(cls, feed_forward) -> "FusedFeedForward":
        return cls(concatenated_linear(feed_forward.w1, feed_forward.w3), feed_forward.w2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1, x3 = self.w13(x).split(self.hidden_dim, dim=-1)
        return self.w2(F.silu(x1) * x3)


def fuse_attention_projections(attn) -> None:
    """Replace `attn.to_q/to_k/to_v` (a diffusers `Attention`) by one `attn.to_qkv` and set
    `attn.fused_projections`, diffusers' own name for it, which `rotated_qkv` reads."""
    from serve_app.engines.attention_processor import ZImageAttnProcessor
    from serve_app.sp.attention import ZImageUSPAttnProcessor

    # diffusers' own processor calls to_q/to_k/to_v: only ours (through `rotated_qkv`) read to_qkv
    if not isinstance(attn.processor, (ZImageAttnProcessor, ZImageUSPAttnProcessor)):
        raise TypeError(f"fused projections need our attention processors installed first, not {type(attn.processor).__name__}")
    attn.to_qkv = concatenated_linear(attn.to_q, attn.to_k, attn.to_v)
    del attn.to_q, attn.to_k, attn.to_v  # frees the separate weights: nothing else holds them
    attn.fused_projections = True


def fuse_projections(transformer) -> int:
    """Fuse the projections of every Z-Image block of `transformer` in place (weights on their device and
    dtype; after our attention processors are installed, before any FP8 quantization); returns how many
    blocks were fused."""
    from diffusers.models.transformers.transformer_z_image import FeedForward, ZImageTransformerBlock

    blocks = [m for m in transformer.modules() if isinstance(m, ZImageTransformerBlock)]
    for block in blocks:
        if not block.attention.fused_projections:
            fuse_attention_projections(block.attention)
        if isinstance(block.feed_forward, FeedForward):
            block.feed_forward = FusedFeedForward.from_feed_forward(block.feed_forward)
    return len(blocks)


def installed_fusion(transformer) -> bool | str:
    """Whether the blocks of `transformer` run fused projections, read from the modules: True (all of
    them), False (none) or "mixed"."""
    from diffusers.models.transformers.transformer_z_image import ZImageTransformerBlock

    kinds = {(b.attention.fused_projections, isinstance(b.feed_forward, FusedFeedForward))
             for b in transformer.modules() if isinstance(b, ZImageTransformerBlock)}
    if kinds == {(True, True)}:
        return True
    return False if kinds <= {(False, False)} else "mixed"
