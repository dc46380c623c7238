"""CUDA graphs of the DiT forward (serve_app/dit_graphs.py) need fixed shapes, so captions are padded to
Z-Image's multiple of 32 before the forward and a hook puts the learned pad token in the padded rows. That
this gives the unpadded forward is tested here on CPU; capture and replay need a GPU
(benchmarks/bench_stages.py variants `*_graph` compare them with the eager forward)."""

import torch

from serve_app.config import DenoiserConfig, ModelConfig
from serve_app.denoiser_engine import DenoiseRequest, DenoiserEngine
from serve_app.dit_graphs import DiTGraphs, padded_length


def test_padded_captions_give_the_unpadded_forward(tiny_dir):
    engine = DenoiserEngine(ModelConfig(source="tiny", tiny_dir=str(tiny_dir)), DenoiserConfig())
    tr = engine.transformer
    with torch.no_grad():
        tr.cap_pad_token.normal_()  # a pad token far from the zeros we pad with, so a missed row shows
    graphs = DiTGraphs(tr)
    g = torch.Generator().manual_seed(0)
    for lengths in ([20], [20, 25], [33, 64], [32]):
        b = len(lengths)
        embeds = [torch.randn(n, engine.cap_feat_dim, generator=g) for n in lengths]
        lat = torch.randn(b, engine.in_channels, 1, 12, 16, generator=g)
        t = torch.rand(b, generator=g)
        with torch.no_grad():
            ref = torch.stack(tr(list(lat.unbind(0)), t, embeds, return_dict=False)[0])
            padded = padded_length(max(lengths))
            caps = DiTGraphs.pad_captions(embeds, padded)
            assert caps.shape == (b, padded, engine.cap_feat_dim)
            out = graphs.padded_forward(lat, t, caps, torch.tensor(lengths))
            torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
            if padded > min(lengths):  # without the hook, the zero rows would be read as caption
                bare = torch.stack(tr(list(lat.unbind(0)), t, list(caps.unbind(0)), return_dict=False)[0])
                assert (bare - ref).abs().max() > 1e-3
    # the hook is inert outside a padded forward
    with torch.no_grad():
        again = torch.stack(tr(list(lat.unbind(0)), t, embeds, return_dict=False)[0])
    torch.testing.assert_close(again, ref, rtol=0, atol=0)


def test_cuda_graphs_stay_off_on_cpu(tiny_dir):
    engine = DenoiserEngine(ModelConfig(source="tiny", tiny_dir=str(tiny_dir)), DenoiserConfig(cuda_graph=True))
    assert engine.graphs is None and engine.acceleration["cuda_graph"] is False
    [lat] = engine.denoise([DenoiseRequest(embeds=torch.zeros(7, engine.cap_feat_dim), height=64, width=64, steps=2, seed=1)])
    assert torch.isfinite(lat).all()
