"""FlashAttention-3 in the DiT (serve_app/engines/fa3_attention.py): the processor's routing.

FA3 runs only on Hopper GPUs; here a plain-torch implementation of its documented `flash_attn_func`
(q, k, v as [B, S, H, D]) and `flash_attn_varlen_func` (sequences laid end to end, `cu_seqlens` offsets,
`seqused_k` keys used per sequence) stands in for the kernel, so that what is ours is tested on CPU: the
layout handed over and a key-padded batch expressed as key lengths. The kernel itself is measured on the GPU
(benchmarks/bench_attention.py, benchmarks/bench_stages.py variants `*_fa3`)."""

import sys

import pytest
import torch
import torch.nn.functional as F

from reference_fa3 import install_reference_fa3, remove_reference_fa3, simulate_hopper
from serve_app.config import DenoiserConfig, ModelConfig
from serve_app.engines import fa3_attention
from serve_app.engines.attention_processor import install_attention_processors
from serve_app.engines.denoiser import DenoiseRequest, DenoiserEngine
from serve_app.engines.dit_builder import BLOCK_GROUPS, installed_attention


@pytest.fixture
def reference_fa3():
    calls = []
    install_reference_fa3(calls)
    yield calls
    remove_reference_fa3()


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
    assert install_attention_processors(fa3.transformer, fa3=True) > 0
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
            install_attention_processors(_engine(tiny_dir).transformer, fa3=True)
    finally:
        fa3_attention.fa3_interface.cache_clear()


def test_sequence_parallel_attention_stays_with_diffusers_dispatch(tiny_dir, reference_fa3, monkeypatch):
    """Under diffusers' context parallelism the Ulysses / ring exchange happens inside
    `dispatch_attention_fn`: a processor with a parallel config must call it even when FA3 is on."""
    import serve_app.engines.attention_processor as rotary

    engine = _engine(tiny_dir)
    install_attention_processors(engine.transformer, fa3=True)
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


def test_the_build_record_is_what_the_processors_run(tiny_dir, reference_fa3, monkeypatch):
    """On a (simulated) Hopper with FA3 importable, the builder picks FA3 for every block group and says so;
    the record is checked against the processors really installed, and the engine serves through them."""
    simulate_hopper(monkeypatch.setattr)
    engine = _engine(tiny_dir)
    assert engine.build.attention == dict.fromkeys(BLOCK_GROUPS, "fa3") == installed_attention(engine.transformer)
    engine.denoise(_requests(engine, [20]))
    assert reference_fa3  # the attention calls went to FA3
    # the same chip without an importable FA3 build: SDPA, recorded as such, with the fallback named
    remove_reference_fa3()
    monkeypatch.setattr(fa3_attention, "INTERFACE_MODULES", ("no_such_fa3_module",))
    plain = _engine(tiny_dir)
    assert plain.build.attention == dict.fromkeys(BLOCK_GROUPS, "native") == installed_attention(plain.transformer)
    assert any("_flash_3" in w for w in plain.build.warnings)
