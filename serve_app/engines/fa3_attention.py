"""FlashAttention-3 for the DiT on Hopper (`denoiser.attention_backend: _flash_3`, chosen automatically on
H100/H200 where a build is installed: `pip install serve_app[hopper]`).

Z-Image's q, k, v already come as [batch, seq, heads, head_dim], FA3's own layout, so the call needs no
transpose. Two builds of the same forward kernels are accepted: `flash_attn_interface` (the flash-attention
repository's `hopper/` package, what diffusers' `_flash_3` backend imports) and `fa3_fwd_interface` (the
`fa3-fwd` wheel on PyPI: forward only, built on the stable libtorch ABI, so one wheel serves torch 2.10+).
FA3 takes no attention mask. A batch whose captions differ in length carries one, but only of one kind:
Z-Image pads each item's joint sequence at the end and masks those pad keys (`attn_mask[i, :len_i] = 1`),
so the mask is a key length per item, which FA3's varlen entry takes as `seqused_k` over the padded
batch laid end to end (fixed-stride `cu_seqlens`): the same result as SDPA with the mask, without
SDPA's masked kernels. Measured against SDPA, and FA3's FP8 kernels measured and dropped, in
benchmarks/README.md ("FlashAttention-3").
"""

from __future__ import annotations

import importlib
from functools import cache

import torch

from serve_app.engines.platform import FA3_INTERFACE_MODULES as INTERFACE_MODULES


@cache
def fa3_interface():
    """The first FA3 interface module that imports, or None."""
    for name in INTERFACE_MODULES:
        try:
            return importlib.import_module(name)
        except Exception:  # not installed, or built for another torch / CUDA: not usable here
            continue
    return None


def fa3_attention(fa3, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  key_lengths: torch.Tensor | None = None) -> torch.Tensor:
    """Non-causal attention of [B, S, H, D] tensors through `fa3` (a `fa3_interface()` module, looked up
    by the caller outside any compiled region); returns [B, S, H, D] in query's dtype.

    `key_lengths` (int32 [B]): item i attends to its first `key_lengths[i]` keys only (every query row
    is computed, pad rows included, as SDPA with a key mask does)."""
    if key_lengths is None:
        out = fa3.flash_attn_func(query, key, value)
    else:
        b, s = query.shape[:2]
        starts = torch.arange(0, (b + 1) * s, s, dtype=torch.int32, device=query.device)
        out = fa3.flash_attn_varlen_func(query.flatten(0, 1), key.flatten(0, 1), value.flatten(0, 1),
                                         starts, starts, s, s, seqused_k=key_lengths)
    if isinstance(out, tuple):  # some FA3 releases return (out, softmax_lse)
        out = out[0]
    return out.reshape(query.shape).to(query.dtype)


def key_lengths_of(attention_mask: torch.Tensor) -> torch.Tensor:
    """Z-Image's [B, S] key mask (True on each item's first len_i positions) -> int32 [B] lengths."""
    return attention_mask.sum(dim=-1, dtype=torch.int32)
