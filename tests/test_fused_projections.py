"""Fused projections (serve_app/engines/fused_projections.py, `denoiser.fuse_projections`) against the separate
linears on the tiny DiT: CPU, fp32 and bf16, and FP8 through torch's CPU `_scaled_mm`. The tolerances allow
another GEMM blocking for the wider weight; seen on CPU: bit-identical in every case."""

import copy
import gc
import weakref

import pytest
import torch

from serve_app.config import AppConfig, DenoiserConfig, LoraConfig, ModelConfig
from serve_app.engines.attention_processor import install_attention_processors
from serve_app.engines.denoiser import DenoiseRequest, DenoiserEngine
from serve_app.engines.dit_builder import build_dit, in_blocks
from serve_app.engines.fp8_linear import Float8RowwiseLinear, quantize_linears_fp8
from serve_app.engines.fused_projections import FusedFeedForward, fuse_projections, installed_fusion
from serve_app.engines.model_sources import load_transformer


def _transformer(tiny_dir, dtype=torch.float32):
    """The tiny DiT with our attention processors, the ones that read a fused `to_qkv`."""
    transformer = load_transformer(ModelConfig(source="tiny", tiny_dir=str(tiny_dir)), torch.device("cpu"), dtype).eval()
    install_attention_processors(transformer)
    return transformer


def _forward(transformer, dtype=torch.float32, px=64, batch=2):
    """One DiT forward on fixed random inputs: a batch of two captions of different lengths (a key mask)."""
    g = torch.Generator().manual_seed(0)
    cfg = transformer.config
    latents = [torch.randn(cfg.in_channels, 1, px // 8, px // 8, generator=g).to(dtype) for _ in range(batch)]
    caps = [torch.randn(n, cfg.cap_feat_dim, generator=g).to(dtype) for n in (9, 40)[:batch]]
    t = torch.tensor([0.3, 0.8][:batch])
    with torch.no_grad():
        return torch.stack([o.float() for o in transformer(latents, t, caps, return_dict=False)[0]])


def _param_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def test_fusion_keeps_the_forward_and_the_parameter_memory(tiny_dir):
    ref_model = _transformer(tiny_dir)
    model = copy.deepcopy(ref_model)
    separate = [weakref.ref(m.weight) for b in model.layers for m in (b.attention.to_q, b.feed_forward.w1)]
    n_blocks = len(model.noise_refiner) + len(model.context_refiner) + len(model.layers)
    assert installed_fusion(model) is False
    assert fuse_projections(model) == n_blocks
    assert installed_fusion(model) is True
    block = model.layers[0]
    assert not any(hasattr(block.attention, name) for name in ("to_q", "to_k", "to_v"))
    assert isinstance(block.feed_forward, FusedFeedForward) and not hasattr(block.feed_forward, "w1")
    # the same parameters, no copy left behind: the separate weights are freed
    assert _param_bytes(model) == _param_bytes(ref_model)
    gc.collect()
    assert all(r() is None for r in separate)
    # every output channel is the same fp32 dot product as before
    out, ref = _forward(model), _forward(ref_model)
    assert ref.abs().max() > 0.1
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)


def test_fusion_needs_our_attention_processors(tiny_dir):
    bare = load_transformer(ModelConfig(source="tiny", tiny_dir=str(tiny_dir)), torch.device("cpu"), torch.float32)
    with pytest.raises(TypeError, match="ZSingleStreamAttnProcessor"):
        fuse_projections(bare)


def test_fusion_in_bf16_rounds_like_the_separate_linears(tiny_dir):
    ref_model = _transformer(tiny_dir, torch.bfloat16)
    model = copy.deepcopy(ref_model)
    fuse_projections(model)
    out, ref = _forward(model, torch.bfloat16), _forward(ref_model, torch.bfloat16)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-2 * ref.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_fp8_weights_are_the_separate_ones_and_give_the_same_forward(tiny_dir, dtype):
    """Quantized after fusion, per row: the fused FP8 weight and its scales are the separate ones stacked
    bit for bit, and every token keeps its one activation scale, so only accumulation order may differ."""
    ref_model = _transformer(tiny_dir, dtype)
    model = copy.deepcopy(ref_model)
    fuse_projections(model)
    for m in (ref_model, model):
        quantize_linears_fp8(m, torch.float8_e4m3fn, in_blocks)
    attn, ref_attn = model.layers[0].attention, ref_model.layers[0].attention
    ff, ref_ff = model.layers[0].feed_forward, ref_model.layers[0].feed_forward
    assert isinstance(attn.to_qkv, Float8RowwiseLinear) and isinstance(ff.w13, Float8RowwiseLinear)
    for fused, parts, dim in ((attn.to_qkv, (ref_attn.to_q, ref_attn.to_k, ref_attn.to_v), 1), (ff.w13, (ref_ff.w1, ref_ff.w3), 1)):
        assert torch.equal(fused.weight.view(torch.uint8), torch.cat([p.weight.view(torch.uint8) for p in parts]))
        assert torch.equal(fused.weight_scale, torch.cat([p.weight_scale for p in parts], dim=dim))
    out, ref = _forward(model, dtype), _forward(ref_model, dtype)
    assert not torch.equal(ref, _forward(_transformer(tiny_dir, dtype), dtype))  # FP8 really ran
    atol = 1e-5 if dtype == torch.float32 else 1e-2 * ref.abs().max().item()
    torch.testing.assert_close(out, ref, rtol=0, atol=atol)


def test_engine_record_says_what_is_installed_and_the_latents_match(tiny_dir):
    model_cfg = ModelConfig(source="tiny", tiny_dir=str(tiny_dir))
    plain = DenoiserEngine(model_cfg, DenoiserConfig(), device=torch.device("cpu"))
    fused = DenoiserEngine(model_cfg, DenoiserConfig(fuse_projections=True), device=torch.device("cpu"))
    assert plain.build.fused_projections is False == installed_fusion(plain.transformer)
    assert fused.build.fused_projections is True == installed_fusion(fused.transformer)
    assert fused.info()["fused_projections"] is True  # what /v1/stats reports
    embeds = torch.randn(20, plain.cap_feat_dim, generator=torch.Generator().manual_seed(1))
    req = lambda: [DenoiseRequest(embeds=embeds, height=64, width=96, steps=2, seed=3)]
    torch.testing.assert_close(fused.denoise(req())[0], plain.denoise(req())[0], rtol=0, atol=1e-6)


def test_lora_with_fused_projections_is_refused_naming_both(tiny_dir):
    with pytest.raises(ValueError, match=r"denoiser\.fuse_projections: not with lora\.enabled"):
        AppConfig(model=ModelConfig(source="tiny"), denoiser=DenoiserConfig(fuse_projections=True), lora=LoraConfig(enabled=True))
    AppConfig(model=ModelConfig(source="tiny"), denoiser=DenoiserConfig(fuse_projections=True))  # either alone is fine
    AppConfig(model=ModelConfig(source="tiny"), lora=LoraConfig(enabled=True))
    # an engine built without AppConfig is refused as well, before anything loads
    with pytest.raises(ValueError, match="fuse_projections"):
        build_dit(ModelConfig(source="tiny", tiny_dir=str(tiny_dir)), DenoiserConfig(fuse_projections=True),
                  torch.device("cpu"), torch.float32, lora_max_rank=4)


def test_fa3_takes_the_fused_projections_views(tiny_dir, monkeypatch):
    """q, k, v split from one `to_qkv` output are strided views; on a (simulated) Hopper they go to FA3,
    key-padded batches through its varlen call, and the latents are the unfused SDPA engine's."""
    from reference_fa3 import install_reference_fa3, remove_reference_fa3, simulate_hopper

    model_cfg = ModelConfig(source="tiny", tiny_dir=str(tiny_dir))
    plain = DenoiserEngine(model_cfg, DenoiserConfig(), device=torch.device("cpu"))
    calls: list = []
    install_reference_fa3(calls)
    try:
        simulate_hopper(monkeypatch.setattr)
        fused = DenoiserEngine(model_cfg, DenoiserConfig(fuse_projections=True), device=torch.device("cpu"))
        assert set(fused.build.attention.values()) == {"fa3"} and fused.build.fused_projections is True
        reqs = lambda: [DenoiseRequest(embeds=torch.randn(n, plain.cap_feat_dim, generator=torch.Generator().manual_seed(n)),
                                       height=64, width=64, steps=2, seed=i) for i, n in enumerate((20, 40))]
        torch.testing.assert_close(torch.stack(fused.denoise(reqs())), torch.stack(plain.denoise(reqs())), rtol=0, atol=1e-5)
        assert any(c[0] == "varlen" for c in calls)
    finally:
        remove_reference_fa3()


def test_a_fused_fp8_block_traces_as_one_graph(tiny_dir):
    """What `compile_repeated_blocks(fullgraph=True)` asks on the GPU: Dynamo traces a fused FP8 block without
    a graph break (a recording backend, no Inductor), and the traced block computes the eager one."""
    from diffusers.models.transformers.transformer_z_image import ADALN_EMBED_DIM

    model = _transformer(tiny_dir)
    fuse_projections(model)
    quantize_linears_fp8(model, torch.float8_e4m3fn, in_blocks)
    block, cfg = model.layers[0], model.config
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 64, cfg.dim, generator=g)
    angles = torch.rand(1, 64, cfg.dim // cfg.n_heads // 2, generator=g)
    freqs = torch.polar(torch.ones_like(angles), angles)
    adaln = torch.randn(1, min(cfg.dim, ADALN_EMBED_DIM), generator=g)
    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad():
        eager = block(x, None, freqs, adaln)
        traced = torch.compile(block, backend=record, fullgraph=True)(x, None, freqs, adaln)
    assert len(graphs) == 1
    torch.testing.assert_close(traced, eager)


def test_fused_unless_lora_is_enabled_by_default():
    assert AppConfig(model=ModelConfig(source="tiny")).denoiser.fuse_projections is True
    assert AppConfig(model=ModelConfig(source="tiny"), lora=LoraConfig(enabled=True)).denoiser.fuse_projections is False
    assert AppConfig(model=ModelConfig(source="tiny"), denoiser=DenoiserConfig(fuse_projections=False)).denoiser.fuse_projections is False
    cfg = AppConfig.model_validate(AppConfig(model=ModelConfig(source="tiny")).model_dump(mode="json"))  # as the replicas read it
    assert cfg.denoiser.fuse_projections is True
