"""A tiled decode through the compiled VAE decoder compiles nothing new once its first graph exists.

diffusers' tiled decode slices the latent into tiles inside `AutoencoderKL.decode`; marking only the
caller's latent dynamic left each tile shape (full tiles, then the edge tiles of every image size) to a
graph of its own, compiled on the request path (first 2048² request of the 24gb config on an H200: 78 s).
`SpatialDynamicCall` marks what the decoder itself receives. On CPU with Dynamo's `eager` backend: the
guards and recompiles are Dynamo's, the same as with Inductor on a GPU.
"""

import pytest
import torch
from diffusers import AutoencoderKL

from serve_app.engines.library_internals import mark_spatial_dims_dynamic
from serve_app.engines.vae import SpatialDynamicCall, StaticOrSymbolic


SIZES = [(24, 24), (20, 28), (28, 16)]  # latents of three tiled image sizes: their edge tiles differ


def _frames_compiled(tiny_dir, wrap: bool, sizes=SIZES) -> int:
    torch._dynamo.reset()
    vae = AutoencoderKL.from_pretrained(str(tiny_dir), subfolder="vae").eval()
    vae.enable_tiling()
    vae.tile_sample_min_size, vae.tile_latent_min_size = 64, 8  # tiles of 8x8 latents, overlapping by 2
    compiled = torch.compile(vae.decoder, backend="eager", dynamic=None)
    vae.decoder = SpatialDynamicCall(compiled) if wrap else compiled
    counts = torch._dynamo.utils.counters["frames"]
    before = counts["ok"]
    # oneDNN off: CPU convolutions otherwise pick their kernel by size, a guard of their own that GPUs lack
    with torch.no_grad(), torch.backends.mkldnn.flags(enabled=False):
        for h, w in sizes:
            z = torch.randn(1, vae.config.latent_channels, h, w)
            mark_spatial_dims_dynamic(z)  # what the engine did before: the caller's latent only
            vae.decode(z)
    return counts["ok"] - before


def test_tiles_reuse_the_decoders_graph(tiny_dir):
    assert _frames_compiled(tiny_dir, wrap=True) == 1


def test_unmarked_tiles_recompile(tiny_dir):
    # the failure the wrapper removes, kept visible: without it the tile shapes compile graphs of their own,
    # already within one image size (full tiles and its edge tiles)
    assert _frames_compiled(tiny_dir, wrap=False, sizes=SIZES[:1]) > 1


def test_static_sizes_get_their_own_graph_and_the_rest_share_the_symbolic_one(tiny_dir):
    torch._dynamo.reset()
    vae = AutoencoderKL.from_pretrained(str(tiny_dir), subfolder="vae").eval()
    decoder = StaticOrSymbolic(vae.decoder, [(8, 8)], backend="eager")
    counts = torch._dynamo.utils.counters["frames"]
    before = counts["ok"]
    with torch.no_grad(), torch.backends.mkldnn.flags(enabled=False):
        for h, w in [(8, 8), (10, 12), (8, 8), (12, 10), (8, 8)]:
            z = torch.randn(1, vae.config.latent_channels, h, w)
            torch.testing.assert_close(decoder(z), vae.decoder(z))
    # one static graph for 8x8, one symbolic for the other two shapes (all through one: 3+ graphs; none static: 1)
    assert counts["ok"] - before == 2


def test_static_sizes_must_decode_in_one_piece():
    from pydantic import ValidationError

    from serve_app.config import VaeConfig

    assert VaeConfig(static_sizes=[[1024, 1024], [512, 768]]).static_sizes == [(1024, 1024), (512, 768)]
    for bad in ([[1000, 1024]], [[4096, 4096]], [[0, 16]]):
        with pytest.raises(ValidationError, match="static_sizes"):
            VaeConfig(static_sizes=bad)
