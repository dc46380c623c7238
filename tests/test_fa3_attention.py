"""FlashAttention-3 in the DiT (serve_app/fa3_attention.py): the processor's routing and the FP8 scaling.

FA3 runs only on Hopper GPUs; here a plain-torch implementation of its documented `flash_attn_func`
(q, k, v as [B, S, H, D], FP8 inputs with per-(batch, head) descales) stands in for the kernel, so that what
is ours is tested on CPU: the layout handed over, the scales, and that masked calls go to SDPA. The kernel
itself is measured on the GPU (benchmarks/bench_stages.py, variants `fa3`, `fa3fp8`)."""

import sys
import types

import pytest
import torch
import torch.nn.functional as F

from serve_app import fa3_attention
from serve_app.config import DenoiserConfig, ModelConfig
from serve_app.denoiser_engine import DenoiseRequest, DenoiserEngine
from serve_app.fa3_attention import quantize_per_head
from serve_app.rotary import use_own_processor


@pytest.fixture
def reference_fa3(monkeypatch):
    calls = []

    def flash_attn_func(q, k, v, softmax_scale=None, causal=False, q_descale=None, k_descale=None, v_descale=None):
        assert q.ndim == 4 and q.shape[2] == k.shape[2] and not causal
        calls.append(q.dtype)
        deq = lambda x, s: x.float() * s[:, None, :, None] if s is not None else x.float()
        q, k, v = deq(q, q_descale), deq(k, k_descale), deq(v, v_descale)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
        return out, None  # as FA3 releases that also return the log-sum-exp

    monkeypatch.setitem(sys.modules, "flash_attn_interface", types.SimpleNamespace(flash_attn_func=flash_attn_func))
    fa3_attention.fa3_interface.cache_clear()
    yield calls
    fa3_attention.fa3_interface.cache_clear()


def test_per_head_fp8_scaling_round_trips():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 50, 3, 16, generator=g) * torch.tensor([0.01, 1.0, 300.0])[None, None, :, None]
    xq, scale = quantize_per_head(x)
    assert xq.dtype == torch.float8_e4m3fn and scale.shape == (2, 3)
    # each head uses the format's range: its largest value lands on e4m3's largest, 448
    assert torch.allclose(xq.float().abs().amax(dim=(1, 3)), torch.full((2, 3), 448.0))
    back = xq.float() * scale[:, None, :, None]
    rel = (back - x).norm(dim=(1, 3)) / x.norm(dim=(1, 3))
    assert rel.max() < 0.04  # e4m3: 3 mantissa bits, whatever the head's magnitude


def _engine(tiny_dir):
    return DenoiserEngine(ModelConfig(source="tiny", tiny_dir=str(tiny_dir)), DenoiserConfig())


def _requests(engine, lengths):
    g = torch.Generator().manual_seed(1)
    return [DenoiseRequest(embeds=torch.randn(n, engine.cap_feat_dim, generator=g), height=128, width=96, steps=3, seed=5 + i)
            for i, n in enumerate(lengths)]


def test_fa3_processor_matches_sdpa_and_sends_masked_batches_to_sdpa(tiny_dir, reference_fa3):
    sdpa, fa3 = _engine(tiny_dir), _engine(tiny_dir)
    assert use_own_processor(fa3.transformer, fa3="bf16") > 0
    same = _requests(sdpa, [20, 20])  # one caption length: no mask, every attention goes to FA3
    torch.testing.assert_close(torch.stack(fa3.denoise(same)), torch.stack(sdpa.denoise(same)), rtol=0, atol=1e-5)
    assert reference_fa3 and set(reference_fa3) == {torch.float32}
    n_unmasked = len(reference_fa3)
    # captions of 20 and 40 tokens pad to 32 and 64: the joint sequence carries a key mask -> SDPA
    mixed = _requests(sdpa, [20, 40])
    torch.testing.assert_close(torch.stack(fa3.denoise(mixed)), torch.stack(sdpa.denoise(mixed)), rtol=0, atol=1e-5)
    assert len(reference_fa3) > n_unmasked  # the caption-only and image-only refiners are unmasked still
    assert len(reference_fa3) - n_unmasked < n_unmasked  # ... but the main layers went to SDPA


def test_fa3_fp8_stays_close_to_bf16_attention(tiny_dir, reference_fa3):
    ref, fp8 = _engine(tiny_dir), _engine(tiny_dir)
    use_own_processor(fp8.transformer, fa3="fp8")
    reqs = _requests(ref, [24])
    a, b = ref.denoise(reqs)[0], fp8.denoise(reqs)[0]
    assert set(reference_fa3) == {torch.float8_e4m3fn}
    cos = F.cosine_similarity(a.flatten(), b.flatten(), dim=0)
    assert 0.99 < cos < 1.0  # FP8 is not exact, and not far off
