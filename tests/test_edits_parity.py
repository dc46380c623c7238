"""Edits against diffusers' own ZImageImg2ImgPipeline and ZImageInpaintPipeline on the same tiny weights,
image, mask, seed and strength (CPU, fp32), through our upload path (PNG bytes -> serve_app/uploads.py)."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from serve_app.config import AppConfig, ModelConfig, ServerConfig, TextEncoderConfig
from serve_app.engines.denoiser import DenoiseRequest
from serve_app.pipeline import StagedPipeline
from serve_app.uploads import load_edit_inputs, output_size

STEPS = 8
SERVER = ServerConfig(min_size=32, max_size=512, default_size="64x64")
PROMPT = "a red fox in the snow, oil painting"


def png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def photo(w=100, h=70) -> Image.Image:
    """Smooth colour ramps plus noise: not a multiple of 16, so the size rule and diffusers' rounding both act."""
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x * 255 / w, y * 255 / h, 128 + 100 * np.sin(x / 7.0)], -1)
    noise = np.random.default_rng(3).normal(0, 12, base.shape)
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8), "RGB")


def openai_mask_png(w=100, h=70) -> tuple[bytes, Image.Image]:
    """OpenAI's mask (RGBA, transparent = paint) and the same mask in diffusers' convention (L, white = paint)."""
    alpha = np.full((h, w), 255, np.uint8)
    alpha[10:45, 20:70] = 0
    rgba = Image.fromarray(np.dstack([np.zeros((h, w, 3), np.uint8), alpha]), "RGBA")
    return png(rgba), Image.fromarray(255 - alpha, "L")


@pytest.fixture(scope="module")
def ours(tiny_dir):
    # padded as diffusers pads: embeddings identical (tests/test_parity.py)
    return StagedPipeline(AppConfig(model=ModelConfig(source="tiny", tiny_dir=str(tiny_dir)), text_encoder=TextEncoderConfig(pad_to_max_length=True)))


def _inputs(mask_bytes=None):
    data = png(photo())
    width, height = output_size(data, SERVER)
    assert (width, height) == (96, 64)  # 100x70 within bounds: rounded down to 16, as diffusers rounds
    return load_edit_inputs(data, mask_bytes, width, height, SERVER), Image.open(io.BytesIO(data)).convert("RGB")


@pytest.mark.parametrize("strength", [0.3, 0.6, 1.0])
def test_img2img_is_identical_to_diffusers(ours, diffusers_pipe, strength):
    from diffusers import ZImageImg2ImgPipeline

    inputs, pil = _inputs()
    ref = ZImageImg2ImgPipeline(**diffusers_pipe.components)(
        prompt=[PROMPT], image=pil, strength=strength, num_inference_steps=STEPS, guidance_scale=0.0,
        generator=torch.Generator("cpu").manual_seed(21),
    ).images[0]
    before = ours.denoiser.stats()["forwards"]
    [out] = ours.edit([PROMPT], [21], inputs.pixels, strength, steps=STEPS)
    # only the schedule's last steps run: diffusers' get_timesteps, int(k - k*s) skipped
    assert ours.denoiser.stats()["forwards"] - before == STEPS - int(STEPS - STEPS * strength)
    assert np.asarray(ref).shape == out.pixels.shape == (64, 96, 3)
    assert np.array_equal(out.pixels.numpy(), np.asarray(ref))


def test_img2img_with_guidance_is_identical_to_diffusers(ours, diffusers_pipe):
    from diffusers import ZImageImg2ImgPipeline

    inputs, pil = _inputs()
    ref = ZImageImg2ImgPipeline(**diffusers_pipe.components)(
        prompt=[PROMPT], image=pil, strength=0.7, num_inference_steps=STEPS, guidance_scale=3.0, negative_prompt=["blurry"],
        generator=torch.Generator("cpu").manual_seed(8),
    ).images[0]
    [out] = ours.edit([PROMPT], [8], inputs.pixels, 0.7, steps=STEPS, guidance_scale=3.0, negative_prompt="blurry")
    assert np.array_equal(out.pixels.numpy(), np.asarray(ref))


@pytest.mark.parametrize("strength", [0.6, 1.0])
def test_inpaint_matches_diffusers(ours, diffusers_pipe, strength):
    """Latents identical (torch.equal). Pixels: identical to diffusers' decode of those latents, but not
    to the pipeline's output as is: its blend `(1 - mask) * x + mask * y` with a [B, 1, h, w] mask leaves
    the latents channels-last in memory, and the CPU VAE decoder's convolutions round differently for
    that layout (here: at most one uint8 level, in about 0.01% of the pixels). The test shows the layout is
    the whole difference: diffusers' own decode of its channels-last latents gives its output, of the same
    latents contiguous gives our pixels, exactly."""
    from diffusers import ZImageInpaintPipeline

    mask_bytes, mask_l = openai_mask_png()
    inputs, pil = _inputs(mask_bytes)
    assert inputs.mask is not None and 0 < inputs.mask.float().mean() < 1
    pipe = ZImageInpaintPipeline(**diffusers_pipe.components)
    kw = dict(prompt=[PROMPT], image=pil, mask_image=mask_l, strength=strength, num_inference_steps=STEPS, guidance_scale=0.0)
    held = {}  # the final latents as the pipeline holds them when it decodes

    def keep_last(_, i, t, kwargs):
        held["latents"] = kwargs["latents"].clone()  # clone keeps the strides
        return {}

    ref = np.asarray(pipe(**kw, generator=torch.Generator("cpu").manual_seed(4), callback_on_step_end=keep_last).images[0])
    ref_latents = held["latents"][0]

    emb = ours.text_encoder.encode([PROMPT])[0]
    [image_latents] = ours.vae.encode([inputs.pixels], [[4]])
    req = DenoiseRequest(embeds=emb, height=64, width=96, steps=STEPS, seed=4, image_latents=image_latents[0], strength=strength, mask=inputs.mask)
    [lat] = ours.denoiser.denoise([req])
    assert torch.equal(lat, ref_latents)

    [out] = ours.edit([PROMPT], [4], inputs.pixels, strength, mask=inputs.mask, steps=STEPS)
    vae = diffusers_pipe.vae

    def diffusers_decode(latents):  # the pipelines' own decode + postprocess
        with torch.no_grad():
            x = vae.decode(latents / vae.config.scaling_factor + vae.config.shift_factor, return_dict=False)[0]
        return np.asarray(pipe.image_processor.postprocess(x, output_type="pil")[0])

    # diffusers' latents as diffusers holds them (channels-last strides): its decode gives its output ...
    assert not held["latents"].is_contiguous()
    assert np.array_equal(diffusers_decode(held["latents"]), ref)
    # ... and the same latents contiguous, as ours are: our pixels exactly
    assert np.array_equal(diffusers_decode(held["latents"].contiguous()), out.pixels.numpy())
    diff = np.abs(out.pixels.numpy().astype(int) - ref.astype(int))
    print(f"inpaint strength {strength}: pixels differing from the pipeline's {np.mean(diff > 0):.4f}, max {diff.max()}")
    assert diff.max() <= 1
    # the kept region is the image's own latents after the last step; the painted region is not
    keep = inputs.mask == 0
    assert torch.equal(lat[:, keep], image_latents[0][:, keep])
    assert not torch.equal(lat[:, ~keep], image_latents[0][:, ~keep])


def test_a_batch_of_edits_with_different_strengths(ours):
    """One denoise call: a generation, edits at strengths 1.0, 0.6 and 0.3 and an inpaint at 0.6. Requests
    share forwards only when they run the same timesteps (strength 1.0 runs all 8, as a generation does),
    and each gets the latents it gets alone."""
    emb = ours.text_encoder.encode([PROMPT])[0]
    inputs, _ = _inputs(openai_mask_png()[0])
    lats = ours.vae.encode([inputs.pixels], [[1, 2, 3, 4, 5]])[0]
    kw = dict(embeds=emb, height=64, width=96, steps=STEPS)
    reqs = [
        DenoiseRequest(**kw, seed=0),
        DenoiseRequest(**kw, seed=1, image_latents=lats[0], strength=1.0),
        DenoiseRequest(**kw, seed=2, image_latents=lats[1], strength=0.6),
        DenoiseRequest(**kw, seed=3, image_latents=lats[2], strength=0.6, mask=inputs.mask),
        DenoiseRequest(**kw, seed=4, image_latents=lats[3], strength=0.3),
    ]
    assert [r.start_step for r in reqs] == [0, 0, 3, 3, 5]
    before = ours.denoiser.stats()
    out = ours.denoiser.denoise(reqs)
    after = ours.denoiser.stats()
    assert after["forwards"] - before["forwards"] == 8 + 5 + 3
    sizes = {k: after["forward_batch_sizes"].get(k, 0) - before["forward_batch_sizes"].get(k, 0) for k in ("1", "2")}
    assert sizes == {"1": 3, "2": 8 + 5}  # start 0: two requests x 8 steps; start 3: two x 5; start 5: one x 3
    assert after["mixed_shape_forwards"] == 0
    for req, got in zip(reqs, out):
        [alone] = ours.denoiser.denoise([req])
        torch.testing.assert_close(got, alone, rtol=0, atol=1e-5)  # tests/test_parity.py's batch bound


def test_bad_edit_requests_are_refused_by_the_engine(ours):
    emb = ours.text_encoder.encode([PROMPT])[0]
    lat = torch.zeros(16, 8, 12)
    kw = dict(embeds=emb, height=64, width=96, steps=STEPS, seed=0)
    with pytest.raises(ValueError, match="image_latents"):
        ours.denoiser.denoise([DenoiseRequest(**kw, image_latents=torch.zeros(16, 8, 8))])
    with pytest.raises(ValueError, match="strength"):
        ours.denoiser.denoise([DenoiseRequest(**kw, image_latents=lat, strength=0.0)])
    with pytest.raises(ValueError, match="mask"):
        ours.denoiser.denoise([DenoiseRequest(**kw, image_latents=lat, mask=torch.zeros(4, 4, dtype=torch.uint8))])
