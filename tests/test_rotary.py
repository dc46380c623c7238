"""RoPE in real arithmetic (serve_app/engines/attention_processor.py) against diffusers' complex multiply, and what it
changes in the graph that torch.compile sees."""

import torch
from diffusers.models.transformers.transformer_z_image import ADALN_EMBED_DIM

from serve_app.config import DenoiserConfig, ModelConfig
from serve_app.engines.denoiser import DenoiseRequest, DenoiserEngine
from serve_app.engines.attention_processor import ZImageAttnProcessor, apply_rotary_emb, apply_rotary_emb_complex


def _inputs(dtype, b=2, s=37, h=3, d=32):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(b, s, h, d, generator=g).to(dtype)
    angles = torch.rand(b, s, d // 2, generator=g) * 100
    return x, torch.polar(torch.ones_like(angles), angles)


def test_real_rope_equals_the_complex_multiply():
    for dtype, atol in ((torch.float32, 1e-6), (torch.bfloat16, 0.0)):
        x, freqs = _inputs(dtype)
        ours, ref = apply_rotary_emb(x, freqs), apply_rotary_emb_complex(x, freqs)
        assert ours.dtype == dtype and ours.shape == x.shape
        # float32 products of the same operands; bf16 output rounds them the same way
        torch.testing.assert_close(ours.float(), ref.float(), rtol=0, atol=atol if dtype == torch.float32 else 1e-2)
        if dtype == torch.bfloat16:
            assert (ours != ref).float().mean() < 0.01  # at most an odd rounding tie differs


def _engine(tiny_dir, **cfg):
    return DenoiserEngine(ModelConfig(source="tiny", tiny_dir=str(tiny_dir)), DenoiserConfig(**cfg))


def test_engine_with_real_rope_gives_the_same_latents(tiny_dir):
    real, cplx = _engine(tiny_dir, real_rope=True), _engine(tiny_dir, real_rope=False)
    procs = lambda e: {type(m.processor) for m in e.transformer.modules() if hasattr(m, "processor")}
    assert procs(real) == procs(cplx) == {ZImageAttnProcessor}
    ropes = lambda e: {m.processor.rope for m in e.transformer.modules() if hasattr(m, "processor")}
    assert ropes(real) == {apply_rotary_emb} and real.build.real_rope is True
    assert ropes(cplx) == {apply_rotary_emb_complex} and cplx.build.real_rope is False
    embeds = torch.randn(20, real.cap_feat_dim, generator=torch.Generator().manual_seed(1))
    req = lambda: [DenoiseRequest(embeds=embeds, height=128, width=96, steps=4, seed=3)]
    a, b = real.denoise(req())[0], cplx.denoise(req())[0]
    assert a.abs().max() > 0.1
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def _block_graph_ops(engine):
    """The functions in the graph Dynamo hands the compiler for one block, and whether the compiled block
    computes what the eager one does."""
    block = engine.transformer.layers[0]
    cfg = engine.transformer.config
    seq = 64
    x = torch.randn(1, seq, cfg.dim)
    freqs = _inputs(torch.float32, b=1, s=seq, d=cfg.dim // cfg.n_heads)[1]
    adaln = torch.randn(1, min(cfg.dim, ADALN_EMBED_DIM))
    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    with torch.no_grad():
        eager = block(x, None, freqs, adaln)
        compiled = torch.compile(block, backend=record, fullgraph=True)(x, None, freqs, adaln)
    torch.testing.assert_close(compiled, eager)
    return {str(n.target) for g in graphs for n in g.graph.nodes if n.op in ("call_function", "call_method")}


def test_compiled_block_has_no_complex_arithmetic(tiny_dir):
    """With real RoPE no complex multiply is left for Inductor (which cannot generate code for one); the
    diffusers processor leaves two per attention."""
    assert not any("view_as_complex" in t for t in _block_graph_ops(_engine(tiny_dir, real_rope=True)))
    assert any("view_as_complex" in t for t in _block_graph_ops(_engine(tiny_dir, real_rope=False)))


def test_contiguous_rope_tables_fix_the_refiners_stride_and_keep_the_latents(tiny_dir):
    """A compiled block guards on its RoPE table's stride; diffusers hands the caption refiners a slice
    whose stride varies with the batch's caption lengths. `contiguous_rope_tables` makes it one layout,
    and changes no value."""
    from serve_app.engines.dit_builder import contiguous_rope_tables

    engine = DenoiserEngine(ModelConfig(source="tiny", tiny_dir=str(tiny_dir)), DenoiserConfig())
    g = torch.Generator().manual_seed(3)
    reqs = [DenoiseRequest(embeds=torch.randn(n, engine.cap_feat_dim, generator=g), height=64, width=64, steps=2, seed=i)
            for i, n in enumerate((40, 150, 20))]
    strides = []

    def record(module, args):
        freqs = args[2]
        strides.append(freqs.stride(0) == freqs.shape[1] * freqs.shape[2])

    for block in engine.transformer.context_refiner:
        block.register_forward_pre_hook(record)
    before = torch.stack(engine.denoise(reqs))
    assert not all(strides)  # diffusers' slice: a batch stride longer than the table
    strides.clear()
    contiguous_rope_tables(engine.transformer)
    after = torch.stack(engine.denoise(reqs))
    assert strides and all(strides)
    assert torch.equal(before, after)
