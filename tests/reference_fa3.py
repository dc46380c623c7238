"""A plain-torch FlashAttention-3 (its documented `flash_attn_func` / `flash_attn_varlen_func`) and a
simulated Hopper chip, so that the FA3 routing is tested on CPU; imported by the tests and the SP workers."""

import sys
import types

import torch
import torch.nn.functional as F


def install_reference_fa3(calls: list) -> types.SimpleNamespace:
    """Put the reference FA3 in `sys.modules` as `flash_attn_interface`; each call is appended to `calls`."""
    from serve_app.engines import fa3_attention

    def flash_attn_func(q, k, v, softmax_scale=None, causal=False):
        assert q.ndim == 4 and q.shape[2] == k.shape[2] and not causal
        calls.append(tuple(q.shape))
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
        return out, None  # as FA3 releases that also return the log-sum-exp

    def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, seqused_q=None, seqused_k=None):
        assert q.ndim == 3 and cu_seqlens_q.dtype == cu_seqlens_k.dtype == torch.int32 and seqused_q is None
        calls.append(("varlen", len(cu_seqlens_q) - 1, max_seqlen_q))
        out = torch.zeros_like(q)
        for i in range(len(cu_seqlens_q) - 1):
            q0, q1, k0 = int(cu_seqlens_q[i]), int(cu_seqlens_q[i + 1]), int(cu_seqlens_k[i])
            k1 = k0 + int(seqused_k[i]) if seqused_k is not None else int(cu_seqlens_k[i + 1])
            assert q1 - q0 <= max_seqlen_q and k1 - k0 <= max_seqlen_k
            out[q0:q1] = F.scaled_dot_product_attention(q[q0:q1].transpose(0, 1), k[k0:k1].transpose(0, 1), v[k0:k1].transpose(0, 1)).transpose(0, 1)
        return out, None

    module = types.SimpleNamespace(flash_attn_func=flash_attn_func, flash_attn_varlen_func=flash_attn_varlen_func)
    sys.modules["flash_attn_interface"] = module
    fa3_attention.fa3_interface.cache_clear()
    return module


def remove_reference_fa3() -> None:
    from serve_app.engines import fa3_attention

    sys.modules.pop("flash_attn_interface", None)
    fa3_attention.fa3_interface.cache_clear()


def simulate_hopper(setattr_=setattr) -> None:
    """Make the DiT builder see an H100 whose FA3 package imports (the tensors stay on CPU); `setattr_` may
    be pytest's `monkeypatch.setattr` to undo it after the test."""
    from serve_app.engines import dit_builder, platform

    h100 = platform.detect_platform(torch_info=platform.TorchInfo(vendor="nvidia", device_name="NVIDIA H100 80GB HBM3", capability=(9, 0)))
    setattr_(dit_builder, "detect_platform", lambda device=None: h100)
    setattr_(platform, "_default_importable", lambda module: module == "flash_attn_interface")
