"""The attention processor of every Z-Image attention we run: diffusers 0.42's `ZSingleStreamAttnProcessor`,
operation for operation, with RoPE in real arithmetic and FlashAttention-3 where it applies.

RoPE: diffusers applies it as a complex multiply, which Inductor cannot fuse; the same product written with
real and imaginary parts, `(a + ib)(c + id) = (ac - bd) + i(ad + bc)`, fuses into the q/k RMSNorm kernels
around it (`denoiser.real_rope`; benchmarks/README.md, "real RoPE").
"""

from __future__ import annotations

import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn

from serve_app.engines.fa3_attention import INTERFACE_MODULES, fa3_attention, fa3_interface, key_lengths_of
from serve_app.engines.library_internals import (
    processor_backend,
    processor_parallel_config,
    set_processor_backend,
    set_processor_parallel_config,
)


def apply_rotary_emb(x_in: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    """x_in [B, S, H, D] (pairs of adjacent channels are the complex numbers), freqs_cis complex
    [B, S, D/2] -> x_in rotated, in x_in's dtype; computed in float32 like diffusers'."""
    f = torch.view_as_real(freqs_cis).unsqueeze(2)  # [B, S, 1, D/2, 2]: cos, sin
    cos, sin = f[..., 0], f[..., 1]
    x = x_in.float().unflatten(-1, (-1, 2))
    x_re, x_im = x[..., 0], x[..., 1]
    out = torch.stack((x_re * cos - x_im * sin, x_re * sin + x_im * cos), dim=-1)
    return out.flatten(3).type_as(x_in)


def apply_rotary_emb_complex(x_in: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    """diffusers 0.42's Z-Image RoPE, as it is: a complex multiply in float32 (`denoiser.real_rope: false`)."""
    with torch.amp.autocast("cuda", enabled=False):
        x = torch.view_as_complex(x_in.float().reshape(*x_in.shape[:-1], -1, 2))
        return torch.view_as_real(x * freqs_cis.unsqueeze(2)).flatten(3).type_as(x_in)


def rotated_qkv(attn, hidden_states, freqs_cis, rope=apply_rotary_emb):
    """The part of Z-Image attention before the attention itself: q, k, v [B, S, H, D] projected,
    q and k normed and rotated by `rope`. With `attn.fused_projections` one linear `to_qkv` projects all
    three (serve_app/engines/fused_projections.py)."""
    if attn.fused_projections:
        query, key, value = attn.to_qkv(hidden_states).unflatten(-1, (3, attn.heads, -1)).unbind(-3)
    else:
        query = attn.to_q(hidden_states).unflatten(-1, (attn.heads, -1))
        key = attn.to_k(hidden_states).unflatten(-1, (attn.heads, -1))
        value = attn.to_v(hidden_states).unflatten(-1, (attn.heads, -1))
    if attn.norm_q is not None:
        query = attn.norm_q(query)
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    if freqs_cis is not None:
        query, key = rope(query, freqs_cis), rope(key, freqs_cis)
    return query, key, value


def output_projection(attn, out: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The part after it: heads merged, `to_out` applied."""
    out = attn.to_out[0](out.flatten(2, 3).to(dtype))
    if len(attn.to_out) > 1:
        out = attn.to_out[1](out)
    return out


class ZImageAttnProcessor:
    """`ZSingleStreamAttnProcessor` with `rope` (real or complex arithmetic) and optionally FlashAttention-3
    (`serve_app.engines.fa3_attention`) for local attention, key-padded batches included; everything else
    goes through diffusers' `dispatch_attention_fn` with the backend and parallel config diffusers set."""

    _attention_backend = None
    _parallel_config = None

    def __init__(self, rope=apply_rotary_emb, fa3: bool = False):
        self.rope = rope
        self.fa3_module = fa3_interface() if fa3 else None  # looked up here, outside any compiled region
        if fa3 and self.fa3_module is None:
            raise RuntimeError(f"no FlashAttention-3 build found (tried {', '.join(INTERFACE_MODULES)})")

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, freqs_cis=None):
        query, key, value = rotated_qkv(attn, hidden_states, freqs_cis, self.rope)
        # FA3 only for local attention: under diffusers' context parallelism (`_parallel_config` set) the
        # Ulysses / ring exchange happens inside dispatch_attention_fn, which must then run. A mask is
        # Z-Image's key-padding mask ([B, S] bool, a prefix per item): FA3 takes it as key lengths.
        if self.fa3_module is not None and self._parallel_config is None and (
            attention_mask is None or (attention_mask.ndim == 2 and attention_mask.dtype == torch.bool)
        ):
            lengths = None if attention_mask is None else key_lengths_of(attention_mask)
            out = fa3_attention(self.fa3_module, query, key, value, key_lengths=lengths)
            return output_projection(attn, out, query.dtype)
        if attention_mask is not None and attention_mask.ndim == 2:
            attention_mask = attention_mask[:, None, None, :]
        out = dispatch_attention_fn(
            query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False,
            backend=self._attention_backend, parallel_config=self._parallel_config,
        )
        return output_projection(attn, out, query.dtype)


def install_attention_processors(transformer, real_rope: bool = True, fa3: bool = False) -> int:
    """Install `ZImageAttnProcessor` (RoPE real or complex, FA3 or not) on every attention of `transformer`
    that has diffusers' Z-Image processor or ours, keeping its backend; returns how many were replaced."""
    from diffusers.models.transformers.transformer_z_image import ZSingleStreamAttnProcessor

    n = 0
    for m in transformer.modules():
        old = getattr(m, "processor", None)
        if isinstance(old, (ZSingleStreamAttnProcessor, ZImageAttnProcessor)):
            new = ZImageAttnProcessor(apply_rotary_emb if real_rope else apply_rotary_emb_complex, fa3)
            set_processor_backend(new, processor_backend(old))
            set_processor_parallel_config(new, processor_parallel_config(old))
            m.set_processor(new)
            n += 1
    return n
