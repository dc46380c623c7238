"""FlashAttention-3 for the DiT on Hopper, in bf16 or with FP8 inputs (`denoiser.attention_backend: _flash_3`,
`denoiser.fp8_attention`).

Z-Image's q, k, v already come as [batch, seq, heads, head_dim], FA3's own layout, so the call needs no
transpose. Two builds of the same forward kernels are accepted: `flash_attn_interface` (the flash-attention
repository's `hopper/` package, what diffusers' `_flash_3` backend imports) and `fa3_fwd_interface` (the
`fa3-fwd` wheel on PyPI: forward only, built on the stable libtorch ABI, so one wheel serves torch 2.10+).
FA3 takes no attention mask; a batch whose captions differ in length carries a key mask, and the
processor sends that call to diffusers' dispatch (SDPA) instead.

FP8: q, k and v are scaled per (batch, head) so that their largest magnitude maps to the format's largest
value, cast to float8_e4m3fn, and FA3 undoes the scales inside the kernel (`q_descale`, ...); the output
is bf16. Measured on and off in benchmarks/README.md.
"""

from __future__ import annotations

import importlib
from functools import cache

import torch

INTERFACE_MODULES = ("flash_attn_interface", "fa3_fwd_interface")


@cache
def fa3_interface():
    """The first FA3 interface module that imports, or None."""
    for name in INTERFACE_MODULES:
        try:
            return importlib.import_module(name)
        except Exception:  # not installed, or built for another torch / CUDA: not usable here
            continue
    return None


def quantize_per_head(x: torch.Tensor, dtype: torch.dtype = torch.float8_e4m3fn) -> tuple[torch.Tensor, torch.Tensor]:
    """x [B, S, H, D] -> (x / scale as `dtype`, scale [B, H] float32), the scale mapping each (batch,
    head)'s largest |x| to the format's largest finite value."""
    amax = x.abs().amax(dim=(1, 3)).float().clamp(min=1e-12)  # [B, H]
    scale = amax / torch.finfo(dtype).max
    xq = (x.float() / scale[:, None, :, None]).to(dtype)
    return xq, scale


def fa3_attention(fa3, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, fp8: bool = False) -> torch.Tensor:
    """Unmasked, non-causal attention of [B, S, H, D] tensors through `fa3` (a `fa3_interface()` module,
    looked up by the caller outside any compiled region); returns [B, S, H, D] in query's dtype."""
    if not fp8:
        out = fa3.flash_attn_func(query, key, value)
    else:
        (q, qs), (k, ks), (v, vs) = (quantize_per_head(t) for t in (query, key, value))
        out = fa3.flash_attn_func(q, k, v, q_descale=qs, k_descale=ks, v_descale=vs)
    if isinstance(out, tuple):  # some FA3 releases return (out, softmax_lse)
        out = out[0]
    return out.to(query.dtype)
