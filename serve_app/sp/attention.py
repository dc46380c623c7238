"""Ulysses x ring attention for Z-Image's sharded blocks (`ZImageUSPAttnProcessor`).

Used whenever ring_degree > 1, and with `denoiser.sp_attention: packed` for ring_degree 1 too: the Ulysses
all-to-all inside the Ulysses group, then attention over every ring rank's keys, the partial results merged
by log-sum-exp. diffusers' own ring attention does not fit Z-Image (serve_app/sp/plan.py says why).

The Ulysses exchange of q, k and v is one packed all-to-all (`start_seq_to_heads` / `finish_seq_to_heads`):
one collective's latency instead of three, the same bytes, and issued without waiting, so that the key
mask's all-gather is queued behind it rather than after three waited exchanges. Only data moves: the
result is the one of three `seq_to_heads`, bit for bit.
"""

from __future__ import annotations

import logging
import math

import torch

from serve_app.engines.attention_processor import apply_rotary_emb, apply_rotary_emb_complex, output_projection, rotated_qkv
from serve_app.engines.library_internals import (
    all_gather_dim0,
    all_to_all_single,
    all_to_all_single_async,
    attention_with_lse,
    wait_collective,
)

log = logging.getLogger(__name__)


def seq_to_heads(x: torch.Tensor, group, n: int) -> torch.Tensor:
    """[B, S_local, H, D] -> [B, n*S_local, H/n, D]: all-to-all inside the Ulysses group."""
    b, s, h, d = x.shape
    x = x.reshape(b, s, n, h // n, d).permute(2, 1, 0, 3, 4).contiguous()  # [dst, S, B, h, D]
    x = all_to_all_single(x.flatten(), group).reshape(n, s, b, h // n, d)
    return x.flatten(0, 1).permute(1, 0, 2, 3).contiguous()  # src-rank chunks in order along S


def start_seq_to_heads(tensors, group, n: int):
    """Issue one all-to-all that moves each of `tensors` (all [B, S_local, H, D]) as `seq_to_heads` would;
    returns the exchange in flight, for `finish_seq_to_heads`."""
    b, s, h, d = tensors[0].shape
    # [dst, tensor, S, B, h, D]: what each destination gets of every tensor is one contiguous chunk
    x = torch.stack([t.reshape(b, s, n, h // n, d).permute(2, 1, 0, 3, 4) for t in tensors], dim=1)
    return all_to_all_single_async(x.flatten(), group), (len(tensors), b, s, h // n, d)


def finish_seq_to_heads(pending, n: int) -> tuple[torch.Tensor, ...]:
    """Wait for a `start_seq_to_heads` exchange: each tensor [B, n*S_local, H/n, D], src-rank chunks in
    order along S. Stored heads-major ([B, H/n, S, D] in memory), the layout attention kernels take, so
    `partial_attention`'s transpose to it copies nothing."""
    x, (m, b, s, h, d) = pending
    x = wait_collective(x).reshape(n, m, s, b, h, d)
    x = x.permute(1, 3, 4, 0, 2, 5).reshape(m, b, h, n * s, d)  # [tensor, B, h, src, S, D]: one copy for all
    return x.transpose(2, 3).unbind(0)


def heads_to_seq(x: torch.Tensor, group, n: int) -> torch.Tensor:
    """[B, n*S_local, h, D] -> [B, S_local, n*h, D]: the inverse all-to-all."""
    b, sn, h, d = x.shape
    s = sn // n
    x = x.reshape(b, n, s, h, d).permute(1, 2, 0, 3, 4).contiguous()  # [dst, S, B, h, D]
    x = all_to_all_single(x.flatten(), group).reshape(n, s, b, h, d)
    return x.permute(2, 1, 0, 3, 4).reshape(b, s, n * h, d)  # src rank = head group


def gather_chunks(x: torch.Tensor, group, n: int) -> list[torch.Tensor]:
    """Every rank's `x` (same shape), in rank order."""
    return list(all_gather_dim0(x, group).chunk(n))


_FAILED_KERNELS: set[str] = set()


def _attention_lse_math(q, k, v, bias):
    """Reference path, any device/dtype: fp32 scores. q/k/v [B, H, S, D]; returns out, lse [B, H, Sq]."""
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) / math.sqrt(q.shape[-1])
    if bias is not None:
        scores = scores + bias.float()
    lse = torch.logsumexp(scores, dim=-1)
    out = torch.matmul(torch.exp(scores - lse[..., None]), v.float())
    return out, lse


def _kernel_for(q: torch.Tensor, bias, backend: str | None) -> str | None:
    if q.device.type == "cpu":
        return "cpu_flash"
    if q.device.type == "cuda" and q.dtype in (torch.float16, torch.bfloat16):
        return "cuda_flash" if bias is None and backend in (None, "native", "flash", "_native_flash") else "cudnn"
    return None


def partial_attention(q, k, v, key_mask, backend: str | None):
    """softmax(q k^T / sqrt(d)) v over the given keys and its log-sum-exp. q/k/v [B, S, H, D] (model
    layout), key_mask [B, Sk] bool or None. Returns out [B, Sq, H, D] float32 and lse [B, Sq, H] float32.
    Samples whose keys are all masked in this chunk get lse = -inf and out = 0 (they add nothing)."""
    qt, kt, vt = (t.transpose(1, 2).contiguous() for t in (q, k, v))
    bias = None
    if key_mask is not None:
        # a large finite negative instead of -inf: a fully-masked chunk gives finite values, zeroed below
        bias = torch.zeros(key_mask.shape, dtype=q.dtype, device=q.device).masked_fill(~key_mask, -1e30 if q.dtype != torch.float16 else -6e4)
        bias = bias[:, None, None, :]
    out = lse = None
    kernel = _kernel_for(q, bias, backend)
    if kernel is not None and kernel not in _FAILED_KERNELS:
        try:
            out, lse = attention_with_lse(qt, kt, vt, bias, kernel)
        except Exception as e:  # depends on the torch build and the chip
            _FAILED_KERNELS.add(kernel)
            log.warning("%s attention with LSE failed (%s); using the math path from now on", kernel, e)
            out = lse = None
    if out is None:
        out, lse = _attention_lse_math(qt, kt, vt, bias)
    out, lse = out.float().transpose(1, 2), lse.float().transpose(1, 2)  # [B, Sq, H, D], [B, Sq, H]
    if key_mask is not None:
        # unconditionally: a branch on `empty.any()` is data-dependent, which fails a fullgraph compile
        empty = ~key_mask.any(dim=-1)  # [B]
        lse = lse.masked_fill(empty[:, None, None], float("-inf"))
        out = out.masked_fill(empty[:, None, None, None], 0.0)
    return out, lse


def merge_partials(out1, lse1, out2, lse2):
    """Combine two partial attentions over disjoint key sets (safe when either or both are empty)."""
    lse = torch.logaddexp(lse1, lse2)
    ref = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    w1, w2 = torch.exp(lse1 - ref)[..., None], torch.exp(lse2 - ref)[..., None]
    return out1 * w1 + out2 * w2, lse


def usp_attention(q, k, v, key_mask, groups: "SPGroups", backend: str | None = None) -> torch.Tensor:
    """Ulysses x ring attention on the local shard. q/k/v [B, S_local, H, D], key_mask [B, S_local]
    bool or None. Returns [B, S_local, H, D] in q's dtype."""
    u, r = groups.ulysses_degree, groups.ring_degree
    if u > 1:
        pending = start_seq_to_heads((q, k, v), groups.ulysses, u)
        if key_mask is not None:  # queued while the exchange is in flight
            key_mask = torch.cat(gather_chunks(key_mask[None], groups.ulysses, u), dim=-1)[0]
        q, k, v = finish_seq_to_heads(pending, u)
    if r > 1:
        kv = gather_chunks(torch.stack([k, v]), groups.ring, r)  # allgather rotation, as diffusers does
        masks = gather_chunks(key_mask[None], groups.ring, r) if key_mask is not None else [None] * r
        out = lse = None
        for kv_i, m_i in zip(kv, masks):
            o_i, l_i = partial_attention(q, kv_i[0], kv_i[1], m_i[0] if m_i is not None else None, backend)
            out, lse = (o_i, l_i) if out is None else merge_partials(out, lse, o_i, l_i)
    else:
        out, _ = partial_attention(q, k, v, key_mask, backend)
    out = out.to(q.dtype)
    if u > 1:
        out = heads_to_seq(out, groups.ulysses, u)
    return out


class SPGroups:
    """The process groups of one SP layout: Ulysses and ring sub-groups of a ("ring", "ulysses") mesh."""

    def __init__(self, mesh, ulysses_degree: int, ring_degree: int):
        self.ulysses_degree, self.ring_degree = ulysses_degree, ring_degree
        self.ulysses = mesh["ulysses"].get_group()
        self.ring = mesh["ring"].get_group()


class ZImageUSPAttnProcessor:
    """`ZSingleStreamAttnProcessor` (diffusers 0.42.1) with the attention call replaced by
    `usp_attention`. Only installed on the sharded blocks, whose inputs are sequence shards."""

    _attention_backend = None
    _parallel_config = None

    def __init__(self, groups: SPGroups, backend: str | None = None, real_rope: bool = True):
        self.groups = groups
        self.backend = backend
        self.rope = apply_rotary_emb if real_rope else apply_rotary_emb_complex

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, freqs_cis=None):
        query, key, value = rotated_qkv(attn, hidden_states, freqs_cis, self.rope)
        if attention_mask is not None and attention_mask.ndim == 4:  # [B, 1, 1, S] -> [B, S]
            attention_mask = attention_mask[:, 0, 0, :]
        if attention_mask is not None and attention_mask.dtype != torch.bool:
            attention_mask = attention_mask > (-1e4 if attention_mask.is_floating_point() else 0)
        out = usp_attention(query, key, value, attention_mask, self.groups, self.backend)
        return output_projection(attn, out, query.dtype)
