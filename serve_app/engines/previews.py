"""Cheap pictures of where a denoising run is heading, for streamed partial images (Ray-free model math).

At each step the flow-matching DiT predicts a velocity v; the current estimate of the clean latents is
x0 = x_t - sigma_t * v (with the scheduler's `model_output` = -DiT output, x0 = x_t - sigma_t * model_output).
`latent_rgb` projects x0 to RGB with one linear map per pixel of the 16-channel Flux VAE latent (1/8 of the
image's size): the factors and bias of ComfyUI's Flux latent preview (comfy/latent_formats.py, class Flux),
fitted in the space the DiT works in (the VAE's latents shifted by 0.1159 and scaled by 0.3611, which is
also what Z-Image's VAE config says), with RGB in [-1, 1]. The alternative, decoding x0 with the VAE, is
the final image's own decoder: exact but a full VAE decode per preview (`vae` kind, done by the VAE stage).
"""

from __future__ import annotations

import torch

PREVIEW_KINDS = ("latent_rgb", "vae")

# [16, 3]: RGB of each latent channel; bias [3]. ComfyUI's Flux latent_rgb_factors / latent_rgb_factors_bias.
FLUX_LATENT_RGB_FACTORS = (
    (-0.0346, 0.0244, 0.0681), (0.0034, 0.0210, 0.0687), (0.0275, -0.0668, -0.0433), (-0.0174, 0.0160, 0.0617),
    (0.0859, 0.0721, 0.0329), (0.0004, 0.0383, 0.0115), (0.0405, 0.0861, 0.0915), (-0.0236, -0.0185, -0.0259),
    (-0.0245, 0.0250, 0.1180), (0.1008, 0.0755, -0.0421), (-0.0515, 0.0201, 0.0011), (0.0428, -0.0012, -0.0036),
    (0.0817, 0.0765, 0.0749), (-0.1264, -0.0522, -0.1103), (-0.0280, -0.0881, -0.0499), (-0.1262, -0.0982, -0.0778),
)
FLUX_LATENT_RGB_BIAS = (-0.0329, -0.0718, -0.0851)


def preview_steps(steps: int, partial_images: int) -> tuple[int, ...]:
    """After which of a run's `steps` DiT steps (1-based) a partial image is sent: `partial_images` of them,
    spread evenly, never the last (the final image is the completed event). A run with fewer steps than
    that sends fewer (OpenAI: "you may receive fewer partial images than requested")."""
    if partial_images <= 0 or steps <= 1:
        return ()
    picks = {round((j + 1) * steps / (partial_images + 1)) for j in range(partial_images)}
    return tuple(sorted(s for s in picks if 1 <= s < steps))


def x0_estimate(latents: torch.Tensor, model_output: torch.Tensor, sigma: float) -> torch.Tensor:
    """The clean latents the step's prediction points at: x_t - sigma * model_output (flow matching)."""
    return latents - sigma * model_output


class LatentRGB:
    """x0 latents [N, 16, h, w] -> uint8 RGB [N, h, w, 3] on the latents' device, one matmul."""

    def __init__(self, channels: int, device: torch.device):
        self.ok = channels == len(FLUX_LATENT_RGB_FACTORS)
        self.weight = torch.tensor(FLUX_LATENT_RGB_FACTORS, dtype=torch.float32, device=device)  # [16, 3]
        self.bias = torch.tensor(FLUX_LATENT_RGB_BIAS, dtype=torch.float32, device=device)

    def __call__(self, x0: torch.Tensor) -> torch.Tensor:
        if not self.ok:  # not a Flux-style 16-channel latent: grey, rather than a wrong picture
            return torch.full((x0.shape[0], x0.shape[-2], x0.shape[-1], 3), 128, dtype=torch.uint8, device=x0.device)
        rgb = torch.nn.functional.linear(x0.float().movedim(1, -1), self.weight.T, self.bias)  # [N, h, w, 3]
        return ((rgb + 1.0) * 127.5).clamp(0, 255).round().to(torch.uint8)
