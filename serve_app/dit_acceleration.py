"""Speed switches for the DiT, each set in `DenoiserConfig` and measured on and off in benchmarks/."""

from __future__ import annotations

import logging
import os

import torch

from serve_app.config import DenoiserConfig

log = logging.getLogger(__name__)


def fp8_supported(device: torch.device) -> bool:
    """FP8 tensor cores: NVIDIA compute capability 8.9+ (Ada, Hopper, Blackwell); MI300-class on ROCm."""
    if device.type != "cuda":
        return False
    if torch.version.hip:
        return "gfx94" in torch.cuda.get_device_properties(device).gcnArchName or "gfx95" in torch.cuda.get_device_properties(device).gcnArchName
    return torch.cuda.get_device_capability(device) >= (8, 9)


def accelerate_transformer(transformer, cfg: DenoiserConfig, device: torch.device) -> dict:
    """Apply the configured attention backend, FP8 and regional compilation; return what was applied."""
    applied: dict = {"attention_backend": None, "fp8": False, "compile": False}
    if cfg.attention_backend:
        try:
            transformer.set_attention_backend(cfg.attention_backend)
            applied["attention_backend"] = cfg.attention_backend
        except Exception as e:  # an unavailable backend must not take the replica down
            log.warning("attention backend %r unavailable (%s); keeping the default", cfg.attention_backend, e)
    if cfg.fp8:
        if fp8_supported(device):
            from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_

            # Only the big linears inside the transformer blocks; the embedders and final layer stay bf16.
            def _in_blocks(module, fqn):
                return isinstance(module, torch.nn.Linear) and fqn.startswith(("layers.", "noise_refiner.", "context_refiner."))

            quantize_(transformer, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()), filter_fn=_in_blocks)
            applied["fp8"] = True
        else:
            log.warning("fp8 requested but %s has no FP8 support; running in %s", device, transformer.dtype)
    if cfg.compile:
        if cfg.compile_cache_dir:
            os.makedirs(cfg.compile_cache_dir, exist_ok=True)
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = cfg.compile_cache_dir
            os.environ.setdefault("TORCHINDUCTOR_FX_GRAPH_CACHE", "1")
            os.environ.setdefault("TORCHINDUCTOR_AUTOGRAD_CACHE", "1")
        # One block class serves the noise refiners (modulated, image tokens), the context refiners
        # (unmodulated, caption tokens) and the main layers (joint sequence): several graphs, more
        # than Dynamo's default limit of 8 once shapes vary.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        torch._dynamo.config.accumulated_recompile_limit = max(torch._dynamo.config.accumulated_recompile_limit, 512)
        transformer.compile_repeated_blocks(fullgraph=True, dynamic=True)
        applied["compile"] = True
    return applied
