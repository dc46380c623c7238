"""Streaming's model math without Ray (serve_app/engines/previews.py and the DiT's step reports): which
steps send a preview, the latent-to-RGB projection, and `DenoiserEngine.denoise(on_step=...)` on the tiny
model: the same latents as without reports, one report per step per request of a batch, and an x0 estimate
that at the last step is the result itself."""

import pytest
import torch

from serve_app.engines.previews import FLUX_LATENT_RGB_BIAS, FLUX_LATENT_RGB_FACTORS, LatentRGB, preview_steps
from serve_app.stage_messages import DenoiseRequest


def test_preview_steps_are_spread_and_never_the_last():
    assert preview_steps(8, 0) == ()
    assert preview_steps(8, 1) == (4,)
    assert preview_steps(8, 2) == (3, 5)
    assert preview_steps(8, 3) == (2, 4, 6)
    assert preview_steps(4, 3) == (1, 2, 3)
    assert preview_steps(3, 3) == (1, 2)  # fewer steps than previews asked: fewer previews (as OpenAI says)
    assert preview_steps(1, 3) == ()


def test_latent_rgb_is_the_linear_map_of_each_latent_pixel():
    x0 = torch.randn(2, 16, 5, 7)
    got = LatentRGB(16, torch.device("cpu"))(x0)
    w, b = torch.tensor(FLUX_LATENT_RGB_FACTORS), torch.tensor(FLUX_LATENT_RGB_BIAS)
    want = ((torch.einsum("nchw,cr->nhwr", x0, w) + b + 1) * 127.5).clamp(0, 255).round().to(torch.uint8)
    assert got.shape == (2, 5, 7, 3) and got.dtype == torch.uint8
    assert (got.int() - want.int()).abs().max() <= 1


@pytest.fixture(scope="module")
def engine(tiny_dir):
    from serve_app.config import AppConfig
    from serve_app.engines.denoiser import DenoiserEngine

    cfg = AppConfig.model_validate({"model": {"source": "tiny", "device": "cpu", "tiny_dir": str(tiny_dir)}})
    return DenoiserEngine(cfg.model, cfg.denoiser)


def test_step_reports_per_request_of_a_batch(engine):
    embeds = torch.randn(20, engine.cap_feat_dim, generator=torch.Generator().manual_seed(0))
    a = DenoiseRequest(embeds=embeds, height=64, width=96, steps=4, seed=1, preview_steps=(1, 3))
    b = DenoiseRequest(embeds=embeds, height=64, width=96, steps=4, seed=2, preview_steps=(4,), preview_kind="vae")
    plain = engine.denoise([a, b])
    reports = []
    streamed = engine.denoise([a, b], on_step=lambda i, p: reports.append((i, p)))
    assert all(torch.equal(x, y) for x, y in zip(plain, streamed))  # reporting does not change the result
    assert engine.stats()["forward_batch_sizes"].get("2", 0) >= 8  # both runs batched the two requests
    for i, r in enumerate((a, b)):
        mine = [p for j, p in reports if j == i]
        assert [p.step for p in mine] == [1, 2, 3, 4] and all(p.steps == 4 for p in mine)
        assert [p.step for p in mine if p.preview is not None] == list(r.preview_steps)
    rgb = [p.preview for j, p in reports if j == 0 and p.preview is not None]
    assert all(x.shape == (8, 12, 3) and x.dtype == torch.uint8 for x in rgb)
    [last] = [p for j, p in reports if j == 1 and p.preview is not None]
    # at the last step the next sigma is 0: the x0 estimate is the step's result
    assert last.preview_kind == "vae" and torch.allclose(last.preview, streamed[1], atol=1e-5)
