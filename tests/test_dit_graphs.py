"""The DiT's CUDA graphs (serve_app/engines/dit_graphs.py) replay a forward on captions padded to Z-Image's
multiple of 32 with the pad token placed by a hook. What makes that exact, which batches get a graph and
which fall back, and the config's bounds are tested here on CPU; capture and replay themselves need a GPU
(benchmarks/bench_stages.py's `..._graphs` variants time them and compare their latents)."""

import pytest
import torch

from serve_app.config import AppConfig, DenoiserConfig, LoraConfig, ModelConfig
from serve_app.engines.denoiser import DenoiserEngine
from serve_app.engines.dit_graphs import DiTGraphs, _Graph, caption_buckets, padded_length
from serve_app.stage_messages import DenoiseRequest


@pytest.fixture(scope="module")
def engine(tiny_dir):
    return DenoiserEngine(ModelConfig(source="tiny", tiny_dir=str(tiny_dir)), DenoiserConfig(), device=torch.device("cpu"))


def _inputs(engine, lengths, seed=0, hw=(8, 12)):
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(len(lengths), engine.in_channels, 1, *hw, generator=g)
    embeds = [torch.randn(n, engine.cap_feat_dim, generator=g) for n in lengths]
    timestep = torch.rand(len(lengths), generator=g)
    return latents, timestep, embeds


class _EagerReplay:
    """Stands in for a captured torch.cuda.CUDAGraph on CPU: a replay runs the padded forward on the
    graph's static buffers into its static output, which is what the captured kernels do."""

    def __init__(self, graphs: DiTGraphs, g: _Graph):
        self.graphs, self.g = graphs, g

    def replay(self):
        self.g.out.copy_(self.graphs.padded_forward(self.g.latents, self.g.timestep, self.g.captions, self.g.valid))


def _install(graphs: DiTGraphs, batch: int, latent_shape: tuple, length: int) -> None:
    g = _Graph(torch.zeros(batch, *latent_shape), torch.zeros(batch), torch.zeros(batch, length, graphs.cap_feat_dim),
               torch.zeros(batch, dtype=torch.long))
    g.out, g.graph = torch.zeros(batch, *latent_shape), _EagerReplay(graphs, g)
    graphs.graphs[(batch, latent_shape, length, torch.float32)] = g


def test_padded_captions_with_the_hook_give_the_unpadded_forward(engine):
    graphs = DiTGraphs(engine.transformer)
    with torch.no_grad():
        for lengths in ([5], [32], [33], [47, 40], [64, 50]):
            latents, timestep, embeds = _inputs(engine, lengths)
            ref = torch.stack(engine.transformer(list(latents.unbind(0)), timestep, embeds, return_dict=False)[0])
            padded = padded_length(lengths[0])
            captions = torch.zeros(len(lengths), padded, engine.cap_feat_dim)
            for i, e in enumerate(embeds):
                captions[i, : e.shape[0]] = e
            out = graphs.padded_forward(latents, timestep, captions, torch.tensor(lengths))
            torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)
            if padded != lengths[0]:  # without the hook the pad rows would be zeros, not the pad token
                plain = torch.stack(engine.transformer(list(latents.unbind(0)), timestep, list(captions.unbind(0)), return_dict=False)[0])
                assert not torch.allclose(plain, ref, atol=1e-4)


def test_buckets():
    assert caption_buckets(512) == list(range(32, 513, 32)) and caption_buckets(100) == [32, 64, 96, 128]
    lat = torch.zeros(2, 16, 1, 64, 64)
    assert DiTGraphs.key(lat, [torch.zeros(33, 8), torch.zeros(64, 8)]) == (2, (16, 1, 64, 64), 64, torch.float32)
    assert DiTGraphs.key(lat, [torch.zeros(32, 8), torch.zeros(33, 8)])[2] is None  # a key mask: no graph


def test_a_batch_replays_only_its_captured_bucket_and_falls_back_otherwise(engine):
    engine.graphs = DiTGraphs(engine.transformer)
    try:
        latent_shape = (engine.in_channels, 1, 8, 12)
        _install(engine.graphs, 1, latent_shape, 32)
        _install(engine.graphs, 2, latent_shape, 64)
        cases = [([20], True), ([32], True), ([33], False), ([40, 64], True), ([40, 30], False), ([20, 20, 20], False)]
        for k, (lengths, graphed) in enumerate(cases):
            for hw, captured in (((8, 12), graphed), ((8, 8), False)):
                latents, timestep, embeds = _inputs(engine, lengths, seed=k, hw=hw)
                before = engine.stats()["graph_forwards"]
                with torch.no_grad():
                    ref = engine.transformer(list(latents.unbind(0)), timestep, embeds, return_dict=False)[0]
                    out = engine.forward(latents, timestep, embeds)
                assert engine.stats()["graph_forwards"] - before == captured, (lengths, hw)
                for a, b in zip(out, ref):
                    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
        # the whole loop: a request whose bucket is captured gives the latents of the uncaptured engine
        req = [DenoiseRequest(embeds=torch.randn(21, engine.cap_feat_dim), height=64, width=96, steps=3, seed=4)]
        before = engine.stats()["graph_forwards"]
        graphed = engine.denoise(req)[0]
        assert engine.stats()["graph_forwards"] - before == 3
        graphs, engine.graphs = engine.graphs, None
        torch.testing.assert_close(graphed, engine.denoise(req)[0], rtol=0, atol=1e-6)
        engine.graphs = graphs
    finally:
        engine.graphs = None


def test_warmup_captures_only_the_small_sizes_and_a_failed_capture_leaves_the_model(tiny_dir, caplog):
    cfg = DenoiserConfig(cuda_graph_max_pixels=64 * 96, cuda_graph_max_batch=2)
    engine = DenoiserEngine(ModelConfig(source="tiny", tiny_dir=str(tiny_dir)), cfg, device=torch.device("cpu"))
    assert engine.graphs is None and engine.info()["cuda_graphs"] is None  # no CUDA: nothing to capture
    assert engine.graph_sizes([(64, 96), (96, 96)]) == []
    engine.graphs = DiTGraphs(engine.transformer)  # as on a GPU; on CPU no capture can succeed
    assert engine.graph_sizes([(64, 96), (96, 96), (32, 64)]) == [(64, 96), (32, 64)]
    req = [DenoiseRequest(embeds=torch.randn(21, engine.cap_feat_dim), height=64, width=96, steps=2, seed=4)]
    ref = engine.denoise(req)[0]
    with caplog.at_level("WARNING", logger="serve_app.engines.dit_graphs"):
        engine.warmup([(64, 96), (96, 96)], steps=1, batch=2)
    assert "DiT CUDA graphs off" in caplog.text and engine.info()["cuda_graphs"]["graphs"] == 0
    before = engine.stats()["graph_forwards"]
    torch.testing.assert_close(engine.denoise(req)[0], ref, rtol=0, atol=0)
    assert engine.stats()["graph_forwards"] == before == 0


def test_config_bounds():
    assert DenoiserConfig().cuda_graph_max_pixels is None  # off unless asked for
    with pytest.raises(ValueError, match="cuda_graph_max_pixels: not with ulysses_degree"):
        DenoiserConfig(cuda_graph_max_pixels=512 * 512, ulysses_degree=2)
    with pytest.raises(ValueError, match="cuda_graph_max_pixels: not with lora.enabled"):
        AppConfig(model=ModelConfig(source="tiny"), denoiser=DenoiserConfig(cuda_graph_max_pixels=512 * 512), lora=LoraConfig(enabled=True))
    with pytest.raises(ValueError):
        DenoiserConfig(cuda_graph_max_batch=0)
    AppConfig(model=ModelConfig(source="tiny"), denoiser=DenoiserConfig(cuda_graph_max_pixels=512 * 512, cuda_graph_max_batch=4))
