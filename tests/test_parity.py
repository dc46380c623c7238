"""Our staged engines against diffusers' own ZImagePipeline on the same tiny weights and seeds (CPU, fp32)."""

import numpy as np
import pytest
import torch

from serve_app.config import AppConfig, ModelConfig, TextEncoderConfig
from serve_app.engines.denoiser import DenoiseRequest, DenoiserEngine
from serve_app.pipeline import StagedPipeline
from serve_app.engines.text_encoder import TextEncoderEngine

SIZE = 128
STEPS = 8
PROMPTS = [
    "a cat",
    "an astronaut riding a horse on the moon, digital art, highly detailed, dramatic lighting",
    "山水画，远处的群山和云雾",
]


def _cfg(tiny_dir, **te) -> AppConfig:
    return AppConfig(model=ModelConfig(source="tiny", tiny_dir=str(tiny_dir)), text_encoder=TextEncoderConfig(**te))


def _reference(pipe, prompt, seed, height=SIZE, width=SIZE, **kw) -> np.ndarray:
    out = pipe(
        prompt=[prompt],  # a fresh list: ZImagePipeline rewrites the caller's list in place
        height=height,
        width=width,
        num_inference_steps=STEPS,
        guidance_scale=kw.pop("guidance_scale", 0.0),
        generator=torch.Generator("cpu").manual_seed(seed),
        output_type="pil",
        **kw,
    )
    return np.asarray(out.images[0])


@pytest.fixture(scope="module")
def padded(tiny_dir):
    return StagedPipeline(_cfg(tiny_dir, pad_to_max_length=True))


@pytest.fixture(scope="module")
def unpadded(tiny_dir):
    return StagedPipeline(_cfg(tiny_dir))


def test_padded_like_diffusers_gives_identical_image(padded, diffusers_pipe):
    ref = _reference(diffusers_pipe, PROMPTS[1], seed=11)
    [ours] = padded.generate([PROMPTS[1]], [11], height=SIZE, width=SIZE, steps=STEPS)
    assert ours.pixels.shape == (SIZE, SIZE, 3) and ours.pixels.dtype == torch.uint8
    assert np.array_equal(ours.pixels.numpy(), ref)


@pytest.mark.parametrize("height, width", [(64, 128), (128, 64)])
def test_non_square_image_matches_diffusers(padded, diffusers_pipe, height, width):
    """Every other pipeline-level test is square, so height and width swapped anywhere between
    generate() and the VAE would go unseen."""
    ref = _reference(diffusers_pipe, PROMPTS[1], seed=11, height=height, width=width)
    assert ref.shape == (height, width, 3)
    [ours] = padded.generate([PROMPTS[1]], [11], height=height, width=width, steps=STEPS)
    assert ours.pixels.shape == (height, width, 3) and ours.pixels.dtype == torch.uint8
    assert np.array_equal(ours.pixels.numpy(), ref)


def test_embeddings_match_diffusers(tiny_dir, diffusers_pipe):
    ref = diffusers_pipe.encode_prompt(list(PROMPTS), device="cpu", do_classifier_free_guidance=False)[0]
    for pad in (True, False):
        for skip_last in (True, False):
            te = TextEncoderEngine(ModelConfig(source="tiny", tiny_dir=str(tiny_dir)), TextEncoderConfig(pad_to_max_length=pad, skip_last_layer=skip_last))
            ours = te.encode(list(PROMPTS))
            for r, o in zip(ref, ours):
                assert o.shape == r.shape
                if pad:
                    # same padding, same kernels: skipping the unused last layer changes nothing
                    assert torch.equal(o, r)
                else:
                    # padded to the batch's longest prompt instead of 512: only the attention
                    # reduction lengths differ, so fp32 rounding (~1e-7 relative) is all that moves
                    torch.testing.assert_close(o, r, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("pad", [True, False])
def test_a_prompt_longer_than_max_sequence_length_is_truncated_as_diffusers_does(tiny_dir, diffusers_pipe, pad):
    """diffusers tokenizes the templated prompt with truncation at max_sequence_length (the tokenizer's
    right side: the end of the template goes too); our encoder must keep the same tokens."""
    max_len = 32
    long_prompt = ", ".join([PROMPTS[1]] * 4)  # ~360 characters
    prompts = [long_prompt, PROMPTS[0]]  # a long and a short one in one batch
    te = TextEncoderEngine(
        ModelConfig(source="tiny", tiny_dir=str(tiny_dir)),
        # pad_to_multiple_of must divide max_sequence_length (the tokenizer refuses otherwise)
        TextEncoderConfig(max_sequence_length=max_len, pad_to_multiple_of=16, pad_to_max_length=pad),
    )
    assert te.count_tokens(long_prompt) > 2 * max_len  # really over the limit
    ref = diffusers_pipe.encode_prompt(list(prompts), device="cpu", do_classifier_free_guidance=False, max_sequence_length=max_len)[0]
    assert ref[0].shape[0] == max_len
    ours = te.encode(list(prompts))
    for r, o in zip(ref, ours):
        assert o.shape == r.shape
        torch.testing.assert_close(o, r, rtol=1e-5, atol=1e-5)  # test_embeddings_match_diffusers' bound


def test_unpadded_image_within_one_level(unpadded, diffusers_pipe):
    ref = _reference(diffusers_pipe, PROMPTS[0], seed=5)
    [ours] = unpadded.generate([PROMPTS[0]], [5], height=SIZE, width=SIZE, steps=STEPS)
    diff = np.abs(ours.pixels.numpy().astype(int) - ref.astype(int))
    assert diff.max() <= 1


def test_latents_match_diffusers(tiny_dir, padded, diffusers_pipe):
    ref = diffusers_pipe(
        prompt=[PROMPTS[2]], height=SIZE, width=SIZE, num_inference_steps=STEPS, guidance_scale=0.0,
        generator=torch.Generator("cpu").manual_seed(9), output_type="latent",
    ).images[0]
    emb = padded.text_encoder.encode([PROMPTS[2]])[0]
    [lat] = padded.denoiser.denoise([DenoiseRequest(embeds=emb, height=SIZE, width=SIZE, steps=STEPS, seed=9)])
    assert torch.equal(lat, ref)


def test_classifier_free_guidance_matches_diffusers(padded, diffusers_pipe):
    ref = _reference(diffusers_pipe, PROMPTS[0], seed=4, guidance_scale=3.0, negative_prompt=["blurry"])
    [ours] = padded.generate([PROMPTS[0]], [4], height=SIZE, width=SIZE, steps=STEPS, guidance_scale=3.0, negative_prompt="blurry")
    assert np.array_equal(ours.pixels.numpy(), ref)


def test_batch_of_three_matches_single_requests(unpadded):
    seeds = [1, 2, 3]
    batch = unpadded.generate(list(PROMPTS), seeds, height=SIZE, width=SIZE, steps=STEPS)
    assert unpadded.denoiser.stats()["forward_batch_sizes"]["3"] >= STEPS  # really one forward for all three
    for prompt, seed, b in zip(PROMPTS, seeds, batch):
        [single] = unpadded.generate([prompt], [seed], height=SIZE, width=SIZE, steps=STEPS)
        # In a batch, shorter captions are padded (with the DiT's pad token, masked out) to the longest
        # and the text encoder pads to the longest prompt: the masked attention then reduces over
        # longer rows, which moves fp32 results by rounding only (~1e-6), rarely flipping a rounded level.
        diff = np.abs(b.pixels.numpy().astype(int) - single.pixels.numpy().astype(int))
        assert diff.max() <= 1, diff.max()


def test_mixed_shapes_split_into_groups(unpadded):
    emb = unpadded.text_encoder.encode(["a cat"])[0]
    reqs = [
        DenoiseRequest(embeds=emb, height=64, width=64, steps=2, seed=1),
        DenoiseRequest(embeds=emb, height=64, width=128, steps=2, seed=1),
        DenoiseRequest(embeds=emb, height=64, width=64, steps=2, seed=2),
    ]
    before = unpadded.denoiser.stats()["forwards"]
    out = unpadded.denoiser.denoise(reqs)
    assert [tuple(o.shape) for o in out] == [(16, 8, 8), (16, 8, 16), (16, 8, 8)]
    assert unpadded.denoiser.stats()["forwards"] - before == 4  # two shape groups x two steps
    [alone] = unpadded.denoiser.denoise([reqs[1]])
    torch.testing.assert_close(out[1], alone, rtol=0, atol=1e-5)


def test_different_step_counts_in_one_call_each_run_their_own_steps(unpadded):
    """Same size, same prompt, 2 and 3 steps in one call: each request gets the latents it gets alone,
    and the forwards are one group's 2 plus the other's 3 (the two 2-step requests share theirs)."""
    emb = unpadded.text_encoder.encode(["a cat"])[0]
    reqs = [
        DenoiseRequest(embeds=emb, height=64, width=64, steps=2, seed=1),
        DenoiseRequest(embeds=emb, height=64, width=64, steps=3, seed=2),
        DenoiseRequest(embeds=emb, height=64, width=64, steps=2, seed=3),
    ]
    before = unpadded.denoiser.stats()
    out = unpadded.denoiser.denoise(reqs)
    after = unpadded.denoiser.stats()
    assert after["forwards"] - before["forwards"] == 2 + 3
    assert after["batches"] - before["batches"] == 2
    sizes = {k: after["forward_batch_sizes"].get(k, 0) - before["forward_batch_sizes"].get(k, 0) for k in ("1", "2")}
    assert sizes == {"1": 3, "2": 2}  # the 3-step request alone, the two 2-step ones together
    for req, got in zip(reqs, out):
        [alone] = unpadded.denoiser.denoise([req])
        torch.testing.assert_close(got, alone, rtol=0, atol=1e-5)  # test_mixed_shapes_split_into_groups' bound


def test_seeds_are_deterministic_and_distinct(unpadded):
    a = unpadded.generate(["a cat"], [42], height=64, width=64, steps=2)[0].pixels
    b = unpadded.generate(["a cat"], [42], height=64, width=64, steps=2)[0].pixels
    c = unpadded.generate(["a cat"], [43], height=64, width=64, steps=2)[0].pixels
    assert a.numpy().tobytes() == b.numpy().tobytes()
    assert not torch.equal(a, c)


def test_bad_requests_are_refused(unpadded):
    emb = unpadded.text_encoder.encode(["a cat"])[0]
    with pytest.raises(ValueError, match="multiples of 16"):
        unpadded.denoiser.denoise([DenoiseRequest(embeds=emb, height=70, width=64, steps=2, seed=0)])
    with pytest.raises(ValueError, match="negative_embeds"):
        unpadded.denoiser.denoise([DenoiseRequest(embeds=emb, height=64, width=64, steps=2, seed=0, guidance_scale=2)])
