"""FlashAttention-3 in the DiT (serve_app/fa3_attention.py): the processor's routing.

FA3 runs only on Hopper GPUs; here a plain-torch implementation of its documented `flash_attn_func`
(q, k, v as [B, S, H, D]) and `flash_attn_varlen_func` (sequences laid end to end, `cu_seqlens` offsets,
`seqused_k` keys used per sequence) stands in for the kernel, so that what is ours is tested on CPU: the
layout handed over and a key-padded batch expressed as key lengths. The kernel itself is measured on the GPU
(benchmarks/bench_attention.py, benchmarks/bench_stages.py variants `*_fa3`)."""

import sys
import types

import pytest
import torch
import torch.nn.functional as F

from serve_app import fa3_attention
from serve_app.config import DenoiserConfig, ModelConfig
from serve_app.denoiser_engine import DenoiseRequest, DenoiserEngine
from serve_app.rotary import use_own_processor


@pytest.fixture
def reference_fa3(monkeypatch):
    calls = []

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

    monkeypatch.setitem(sys.modules, "flash_attn_interface",
                        types.SimpleNamespace(flash_attn_func=flash_attn_func, flash_attn_varlen_func=flash_attn_varlen_func))
    fa3_attention.fa3_interface.cache_clear()
    yield calls
    fa3_attention.fa3_interface.cache_clear()


def _engine(tiny_dir):
    return DenoiserEngine(ModelConfig(source="tiny", tiny_dir=str(tiny_dir)), DenoiserConfig())


def _requests(engine, lengths):
    g = torch.Generator().manual_seed(1)
    return [DenoiseRequest(embeds=torch.randn(n, engine.cap_feat_dim, generator=g), height=128, width=96, steps=3, seed=5 + i)
            for i, n in enumerate(lengths)]


def test_key_lengths_give_sdpa_with_the_key_mask(reference_fa3):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3, 40, 2, 8, generator=g) for _ in range(3))
    lengths = torch.tensor([40, 17, 32], dtype=torch.int32)
    mask = torch.arange(40)[None, :] < lengths[:, None]  # Z-Image's mask: each item's first len_i keys
    assert torch.equal(fa3_attention.key_lengths_of(mask), lengths)
    expected = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask[:, None, None, :]).transpose(1, 2)
    out = fa3_attention.fa3_attention(sys.modules["flash_attn_interface"], q, k, v, key_lengths=lengths)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
    assert reference_fa3 == [("varlen", 3, 40)]
    # and the mask matters: without it the padded items differ
    assert not torch.allclose(fa3_attention.fa3_attention(sys.modules["flash_attn_interface"], q, k, v)[1], expected[1], atol=1e-3)


def test_fa3_processor_matches_sdpa_on_padded_and_unpadded_batches(tiny_dir, reference_fa3):
    sdpa, fa3 = _engine(tiny_dir), _engine(tiny_dir)
    assert use_own_processor(fa3.transformer, fa3=True) > 0
    same = _requests(sdpa, [20, 20])  # one caption length: no mask, every attention goes to FA3
    torch.testing.assert_close(torch.stack(fa3.denoise(same)), torch.stack(sdpa.denoise(same)), rtol=0, atol=1e-5)
    unmasked = len(reference_fa3)
    assert unmasked > 0 and all(s[0] == 2 for s in reference_fa3)
    # captions of 20 and 40 tokens pad to 32 and 64: the joint sequence carries a key mask -> FA3 varlen
    reference_fa3.clear()
    mixed = _requests(sdpa, [20, 40])
    torch.testing.assert_close(torch.stack(fa3.denoise(mixed)), torch.stack(sdpa.denoise(mixed)), rtol=0, atol=1e-5)
    assert len(reference_fa3) == unmasked  # every attention still on FA3
    padded = [c for c in reference_fa3 if c[0] == "varlen"]
    assert padded and len(padded) < unmasked  # the caption refiners and main layers are padded, the image-only refiners are not


def test_no_fa3_build_keeps_sdpa(tiny_dir, monkeypatch):
    monkeypatch.setattr(fa3_attention, "INTERFACE_MODULES", ("no_such_fa3_module",))
    fa3_attention.fa3_interface.cache_clear()
    try:
        assert fa3_attention.fa3_interface() is None
        with pytest.raises(RuntimeError, match="no FlashAttention-3 build"):
            use_own_processor(_engine(tiny_dir).transformer, fa3=True)
    finally:
        fa3_attention.fa3_interface.cache_clear()


def test_sequence_parallel_attention_stays_with_diffusers_dispatch(tiny_dir, reference_fa3, monkeypatch):
    """Under diffusers' context parallelism the Ulysses / ring exchange happens inside
    `dispatch_attention_fn`: a processor with a parallel config must call it even when FA3 is on."""
    import serve_app.rotary as rotary

    engine = _engine(tiny_dir)
    use_own_processor(engine.transformer, fa3=True)
    proc = engine.transformer.layers[0].attention.processor
    dispatched = []

    def recording_dispatch(q, k, v, parallel_config=None, **kw):
        dispatched.append(parallel_config)
        return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)

    monkeypatch.setattr(rotary, "dispatch_attention_fn", recording_dispatch)
    attn = engine.transformer.layers[0].attention
    x = torch.randn(1, 64, engine.transformer.config.dim)
    with torch.no_grad():
        proc(attn, x)
        assert reference_fa3 and not dispatched  # local: FA3
        proc._parallel_config = cp = object()
        proc(attn, x)
    assert dispatched == [cp] and len(reference_fa3) == 1
