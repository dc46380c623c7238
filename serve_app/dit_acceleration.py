"""Speed switches for the DiT, each set in `DenoiserConfig` and measured on and off in benchmarks/.

What is asked for is checked against the chip the replica landed on (`serve_app.platform`): an attention
backend that cannot run here, FP8 without FP8 matrix cores, compile on CPU all fall back with a warning,
and the FP8 format follows the chip (e4m3fn on H100/H200/B200/MI355X, e4m3fnuz on MI300X/MI325X).
"""

from __future__ import annotations

import logging

import torch

from serve_app.config import DenoiserConfig
from serve_app.fp8_linear import quantize_linears_fp8
from serve_app.platform import choose_engine_settings, detect_platform
from serve_app.rotary import use_own_processor

log = logging.getLogger(__name__)

DEFAULT_ATTENTION_BACKEND = "native"  # diffusers' default: torch SDPA


def accelerate_transformer(transformer, cfg: DenoiserConfig, device: torch.device) -> dict:
    """Apply the attention backend, FP8 and regional compilation chosen for `device` from `cfg`; return
    what was applied, with the choice itself (and its fallbacks) under "engine"."""
    settings = choose_engine_settings(detect_platform(device), cfg)
    applied: dict = {"attention_backend": None, "fp8": False, "compile": False, "real_rope": False, "engine": settings.as_dict()}
    # FA3 is called by our processor (serve_app/fa3_attention.py), not through diffusers' `_flash_3`: that
    # one imports only the flash-attention repository's build and refuses masked calls.
    fa3 = False
    if settings.attention_backend == "_flash_3":
        from serve_app.fa3_attention import INTERFACE_MODULES, fa3_interface

        if fa3_interface() is not None:
            fa3 = True
        else:  # installed but not loadable here (another torch or CUDA): SDPA
            msg = f"attention backend '_flash_3': none of {', '.join(INTERFACE_MODULES)} imports; keeping the default"
            log.warning(msg)
            applied["engine"]["warnings"].append(msg)
            settings.attention_backend = applied["engine"]["attention_backend"] = DEFAULT_ATTENTION_BACKEND
    if cfg.real_rope or fa3:
        replaced = use_own_processor(transformer, real_rope=cfg.real_rope, fa3=fa3) > 0
        applied["real_rope"] = replaced and cfg.real_rope
        if fa3 and replaced:
            applied["attention_backend"] = "_flash_3"
    if settings.attention_backend not in (DEFAULT_ATTENTION_BACKEND, "_flash_3"):
        try:
            transformer.set_attention_backend(settings.attention_backend)
            applied["attention_backend"] = settings.attention_backend
        except Exception as e:  # an unavailable backend must not take the replica down
            log.warning("attention backend %r unavailable (%s); keeping the default", settings.attention_backend, e)
            applied["engine"]["warnings"].append(f"attention backend {settings.attention_backend!r} failed: {e}")
    if settings.fp8:
        # Only the big linears inside the transformer blocks; the embedders and final layer stay bf16.
        def _in_blocks(module, fqn):
            return isinstance(module, torch.nn.Linear) and fqn.startswith(("layers.", "noise_refiner.", "context_refiner."))

        fp8 = settings.torch_fp8_dtype
        if cfg.fp8_impl == "torchao":
            from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_

            quantize_(
                transformer,
                Float8DynamicActivationFloat8WeightConfig(activation_dtype=fp8, weight_dtype=fp8, granularity=PerRow()),
                filter_fn=_in_blocks,
            )
        else:
            quantize_linears_fp8(transformer, fp8, _in_blocks)
        applied["fp8"] = cfg.fp8_impl
    if settings.compile.enabled:
        # One block class serves the noise refiners (modulated, image tokens), the context refiners
        # (unmodulated, caption tokens) and the main layers (joint sequence): several graphs, more
        # than Dynamo's default limit of 8 once shapes vary.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        torch._dynamo.config.accumulated_recompile_limit = max(torch._dynamo.config.accumulated_recompile_limit, 512)
        contiguous_rope_tables(transformer)
        transformer.compile_repeated_blocks(fullgraph=settings.compile.fullgraph, dynamic=settings.compile.dynamic)
        applied["compile"] = True
    return applied


def contiguous_rope_tables(transformer) -> None:
    """Hand the refiner blocks their RoPE table as a contiguous tensor. diffusers slices it out of a longer
    padded table, so its batch stride depends on the batch's caption lengths; a compiled block guards on
    that stride (`freqs_cis.stride()[0] != 64 * x.size(1)`), and a batch where the slice happens to be
    the whole table recompiled the block mid-run (7.6 s on H100, 512², once per replica). A copy of a few
    hundred KB per forward makes the stride always the same."""
    prepare = transformer._prepare_sequence

    def prepare_sequence(*args, **kwargs):
        feats, freqs_cis, *rest = prepare(*args, **kwargs)
        return (feats, freqs_cis.contiguous(), *rest)

    transformer._prepare_sequence = prepare_sequence
