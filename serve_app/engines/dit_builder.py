"""The one way to build the DiT: load, then attention processors -> context-parallel plan -> fused
projections (when on) -> FP8 -> LoRA side paths (when LoRA is on) -> compile, in that order, once, and a
frozen record of what was applied.

What the config asks for is first checked against the chip (`serve_app.engines.platform`): an attention
backend that cannot run here, FP8 without FP8 matrix cores, compile on CPU all fall back with a warning in
the record. The order matters: the plan's hooks and processors must exist before FP8 swaps the linears
inside them, the projections are fused before FP8 so that each fused weight is quantized once (one
scale per row, as the separate ones were), and compile must see the final modules.

    transformer, build = build_dit(model_cfg, cfg, device, dtype)                 # one GPU
    transformer, build = build_dit(model_cfg, cfg, device, dtype, sp=SPOptions(...))  # one SP rank
    build.as_dict()  # what /v1/stats reports; installed_attention(transformer) and installed_fusion(transformer)
                     # (serve_app/engines/fused_projections.py) are what is really there
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field

import torch

from serve_app.config import DenoiserConfig, ModelConfig
from serve_app.engines.attention_processor import ZImageAttnProcessor, install_attention_processors
from serve_app.engines.devices import process_memory_capped
from serve_app.engines.fp8_linear import quantize_linears_fp8
from serve_app.engines.fused_projections import fuse_projections
from serve_app.engines.library_internals import (
    check_library_versions,
    contiguous_rope_tables,
    processor_backend,
    processor_parallel_config,
    processors,
    raise_recompile_limits,
)
from serve_app.engines.model_sources import load_transformer
from serve_app.engines.platform import choose_engine_settings, detect_platform

log = logging.getLogger(__name__)

DEFAULT_ATTENTION_BACKEND = "native"  # diffusers' default: torch SDPA
BLOCK_GROUPS = ("noise_refiner", "context_refiner", "layers")


@dataclass(frozen=True)
class SPOptions:
    """How one rank of a sequence-parallel group shards the DiT (the default process group is the group)."""

    world_size: int
    ulysses_degree: int = 1  # 1 x 1 with world_size > 1: chosen from the head count (`choose_layout`)
    ring_degree: int = 1
    ulysses_anything: bool = False  # diffusers' Ulysses for head counts the degree does not divide
    shard_noise_refiner: bool = True
    attention: str = "diffusers"  # `denoiser.sp_attention`: ring_degree 1 through diffusers' Ulysses or ours, "packed"


@dataclass(frozen=True)
class DiTBuild:
    """What `build_dit` applied. `attention` maps each block group to how its attention runs:
    "fa3", a diffusers backend name ("native" is SDPA), "ulysses" (diffusers' Ulysses through that
    backend) or "usp" (our Ulysses x ring, q, k, v in one packed all-to-all; ring_degree 1 included under
    `denoiser.sp_attention: packed`)."""

    attention: dict[str, str]
    real_rope: bool
    fp8_dtype: str | None
    fp8_fast_accum: bool
    fused_projections: bool  # Q/K/V and w1/w3 as one linear each (serve_app/engines/fused_projections.py)
    compile: bool
    compile_dynamic: bool
    sp: dict | None  # ulysses_degree, ring_degree, attention, ulysses_exchange, pads_sequence, shards_noise_refiner
    lora_max_rank: int | None = None  # LoRA side paths of this rank beside every linear (None: none)
    platform: dict = field(default_factory=dict)
    warnings: tuple[str, ...] = ()

    def as_dict(self) -> dict:
        d = asdict(self)
        d["warnings"] = list(self.warnings)
        return d


def in_blocks(module: torch.nn.Module, fqn: str) -> bool:
    """The linears FP8 replaces: those inside the transformer blocks (embedders and final layer stay bf16)."""
    return isinstance(module, torch.nn.Linear) and fqn.startswith(tuple(f"{g}." for g in BLOCK_GROUPS))


def build_dit(model_cfg: ModelConfig, cfg: DenoiserConfig, device: torch.device, dtype: torch.dtype,
              sp: SPOptions | None = None, lora_max_rank: int | None = None):
    """(transformer, DiTBuild) for `device`; with `sp`, this rank's shard of an SP group; with
    `lora_max_rank`, a LoRA side path of that rank beside every linear (serve_app/engines/lora.py)."""
    check_library_versions()
    if cfg.fuse_projections and lora_max_rank is not None:  # AppConfig refuses it too; engines built directly
        raise ValueError("denoiser.fuse_projections: not with LoRA side paths (they wrap the separate linears)")
    settings = choose_engine_settings(detect_platform(device), cfg)
    warnings = list(settings.warnings)
    sharded = sp is not None and sp.world_size > 1
    # FP8 on one device: the bf16 weights stay in CPU memory and each linear reaches the device already
    # quantized, so the device never holds the bf16 model (its peak is the FP8 model's). Hub weights pass
    # through CPU memory anyway; random-full weights are drawn on the CPU only when the process is capped
    # (drawing 6B of them there is slower than on the device). An SP rank loads on its device: the weight
    # broadcast runs over the device's collectives.
    capped = process_memory_capped(device)
    staged = settings.fp8 and not sharded and device.type != "cpu" and (model_cfg.source != "random-full" or capped)
    transformer = load_transformer(model_cfg, torch.device("cpu") if staged else device, dtype)
    if sharded:  # rank 0's weights everywhere, before anything is applied
        from serve_app.sp.process_group import broadcast_weights

        broadcast_weights(transformer)

    # 1. attention processors: ours everywhere (FA3 where it imports), or a diffusers backend on them
    backend = settings.attention_backend
    fa3 = False
    if backend == "_flash_3":
        from serve_app.engines.fa3_attention import INTERFACE_MODULES, fa3_interface

        fa3 = fa3_interface() is not None
        if not fa3:  # installed but not loadable here (another torch or CUDA)
            warnings.append(f"attention backend '_flash_3': none of {', '.join(INTERFACE_MODULES)} imports; using SDPA")
            log.warning("%s", warnings[-1])
        backend = DEFAULT_ATTENTION_BACKEND
    install_attention_processors(transformer, real_rope=cfg.real_rope, fa3=fa3)
    if backend != DEFAULT_ATTENTION_BACKEND:
        try:
            transformer.set_attention_backend(backend)
        except Exception as e:  # an unavailable backend must not take the replica down
            warnings.append(f"attention backend {backend!r} failed: {e}; using SDPA")
            log.warning("%s", warnings[-1])
            backend = DEFAULT_ATTENTION_BACKEND
    local = "fa3" if fa3 else backend
    attention = dict.fromkeys(BLOCK_GROUPS, local)

    # 2. context-parallel plan
    sp_info = None
    if sp is not None and sp.world_size > 1:
        from serve_app.sp.plan import choose_layout, enable_sequence_parallel

        u, r = sp.ulysses_degree, sp.ring_degree
        if u * r == 1:
            u, r = (sp.world_size, 1) if sp.ulysses_anything else choose_layout(sp.world_size, transformer.config.n_heads)
        if u * r != sp.world_size:
            raise ValueError(f"ulysses_degree {u} x ring_degree {r} != world size {sp.world_size}")
        info = enable_sequence_parallel(
            transformer, u, r, ulysses_anything=sp.ulysses_anything, shard_noise_refiner=sp.shard_noise_refiner, real_rope=cfg.real_rope,
            attention=sp.attention,
        )
        sharded_kind = "usp" if info.attention == "usp" else "ulysses"
        for group in ("layers",) + (("noise_refiner",) if info.shards_noise_refiner else ()):
            attention[group] = sharded_kind
        sp_info = {"ulysses_degree": info.ulysses_degree, "ring_degree": info.ring_degree, "attention": info.attention,
                   "ulysses_exchange": info.ulysses_exchange, "pads_sequence": info.pads_sequence, "shards_noise_refiner": info.shards_noise_refiner}

    # 3. fused projections: weights rewritten where they are loaded (the CPU when staged), before FP8
    if cfg.fuse_projections:
        fuse_projections(transformer)

    # 4. FP8: only the big linears inside the transformer blocks; embedders and final layer stay bf16
    if settings.fp8:
        quantize_linears_fp8(transformer, settings.torch_fp8_dtype, in_blocks, device=device, fast_accum=cfg.fp8_fast_accum)
        transformer.to(device)  # what stays bf16 (embedders, norms, final layer)

    # 4b. LoRA side paths: after FP8 (they wrap the FP8 linears and stay bf16), before compile (the compiled
    # blocks hold them, and switching adapters only writes their buffers)
    if lora_max_rank is not None:
        from serve_app.engines.lora import install_side_paths

        install_side_paths(transformer, lora_max_rank, device, dtype)

    # 5. regional compile: one graph per block class
    if settings.compile.enabled:
        raise_recompile_limits()
        contiguous_rope_tables(transformer)
        transformer.compile_repeated_blocks(fullgraph=True, dynamic=settings.compile.dynamic)

    build = DiTBuild(
        attention=attention,
        real_rope=cfg.real_rope,
        fp8_dtype=settings.fp8_dtype if settings.fp8 else None,
        fp8_fast_accum=settings.fp8 and cfg.fp8_fast_accum,
        fused_projections=bool(cfg.fuse_projections),
        compile=settings.compile.enabled,
        compile_dynamic=settings.compile.enabled and settings.compile.dynamic,
        sp=sp_info,
        lora_max_rank=lora_max_rank,
        platform=settings.platform.as_dict(),
        warnings=tuple(warnings),
    )
    return transformer, build


def installed_attention(transformer) -> dict[str, str]:
    """How each block group's attention runs, read from the processors actually installed (the same
    vocabulary as `DiTBuild.attention`; "mixed" if a group's processors disagree)."""
    from serve_app.sp.attention import ZImageUSPAttnProcessor

    def kind(p) -> str:
        if isinstance(p, ZImageUSPAttnProcessor):
            return "usp"
        if processor_parallel_config(p) is not None:
            return "ulysses"
        if isinstance(p, ZImageAttnProcessor) and p.fa3_module is not None:
            return "fa3"
        return processor_backend(p) or DEFAULT_ATTENTION_BACKEND

    out = {}
    for group in BLOCK_GROUPS:
        kinds = {kind(p) for p in processors(getattr(transformer, group))}
        out[group] = kinds.pop() if len(kinds) == 1 else "mixed"
    return out
