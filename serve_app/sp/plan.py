"""Sequence parallelism (Ulysses x ring) for Z-Image's DiT through diffusers' context-parallel hooks.

diffusers 0.42 ships no `_cp_plan` for `ZImageTransformer2DModel`; `zimage_cp_plan` is ours. What it does
to one forward (every rank runs the same forward on the same inputs):

  patchify, embedders, 2 context refiners (caption tokens): UNSHARDED, on every rank (short sequences).
  2 noise refiners (image tokens): with `shard_noise_refiner` (on in `DenoiserConfig`) split on dim 1 like
      the main blocks (own Ulysses / ring attention, pad to the degree) and gathered after the last one.
      At 1024² they are ~6% of a forward: left whole they cap SP 2 at ~1.9x and SP 4 at ~3.4x (Amdahl).
  unified sequence [image tokens | caption tokens] (each padded to a multiple of 32 by Z-Image, the
      batch padded to its longest sample with a key mask):
      - padded further to a multiple of the SP degree when it does not divide (SP 3, 6, ...; at 1024x1024
        and SP 2/4/8 nothing is padded), the pad positions masked out as keys (`_make_pad_hook`);
      - `layers.0`'s input `x` and every main layer's `attn_mask` / `freqs_cis` split on dim 1
        (diffusers' `ContextParallelSplitHook`), so each rank holds S/N tokens through the 30 main blocks;
      - the final layer runs on the rank's S/N tokens and its output (64 channels, not 3840) is gathered
        on dim 1 (`ContextParallelGatherHook`); `unpatchify` reads only the leading image tokens, so the
        trailing pad never reaches the latents.
  attention in the main blocks:
      - ring_degree == 1 (`denoiser.sp_attention: diffusers`, the default): diffusers' own Ulysses
        attention (all-to-all seq<->heads, three of them, q, k, v, each waited before the next), any
        CP-capable backend (`native`, `_native_cudnn`, `flash`, ...); the key mask is all-gathered by diffusers.
      - ring_degree > 1, or `sp_attention: packed`: our `ZImageUSPAttnProcessor` (serve_app/sp/attention.py:
        q, k, v in one packed Ulysses all-to-all inside the ulysses group, issued async, then ring over the
        ring group, partial results merged by log-sum-exp). diffusers' ring does not fit
        Z-Image here: its `native` forward op cannot return the LSE ("Native attention does not support
        return_lse=True"), no CP-capable backend returns an LSE on CPU (`_native_flash` has no CPU kernel,
        `_native_cudnn` is CUDA + half only, `_native_math` has no LSE), it passes the *local* key mask to
        every ring step instead of the mask of the K/V chunk it is looking at, and its Ulysses x ring path
        never gathers the mask at all: wrong results as soon as a mask exists (padding for SP 3/6, a batch
        with different caption lengths).
  The refiners' processors get `_parallel_config = None` back: `enable_parallelism` sets it on every
  attention processor, which would run the unsharded refiners through Ulysses all-to-alls over duplicated
  sequences (correct, since duplicated keys do not change a softmax, but U times the attention work).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from serve_app.engines.library_internals import (
    accelerator_count_at_least_one,
    context_parallel_io,
    prime_split_hooks,
    processor_backend,
    processors,
    set_processor_backend,
    set_processor_parallel_config,
)
from serve_app.sp.attention import SPGroups, ZImageUSPAttnProcessor, gather_chunks

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------- plan


def zimage_cp_plan(transformer, shard_noise_refiner: bool = False) -> dict:
    """The context-parallel plan for `ZImageTransformer2DModel` (see module docstring)."""
    ContextParallelInput, ContextParallelOutput = context_parallel_io()

    def blocks(name: str) -> dict:
        return {
            f"{name}.0": {"x": ContextParallelInput(split_dim=1, expected_dims=3)},
            f"{name}.*": {
                "attn_mask": ContextParallelInput(split_dim=1, expected_dims=2),
                "freqs_cis": ContextParallelInput(split_dim=1, expected_dims=3),
            },
        }

    plan: dict = blocks("layers")
    if shard_noise_refiner:
        # The image tokens alone, sharded through both noise refiners; gathered after the last one by
        # `_gather_seq_hook` (not diffusers' gather: its dim-1 all-gather does not trace inside the
        # compiled block). `_build_unified_sequence` slices each sample to its length, so a trailing SP
        # pad never leaks.
        plan.update(blocks("noise_refiner"))
    for key in transformer.all_final_layer.keys():  # one per patch size, "2-1" for Z-Image
        plan[f"all_final_layer.{key}"] = ContextParallelOutput(gather_dim=1, expected_dims=3)
    return plan


def choose_layout(sp_degree: int, n_heads: int) -> tuple[int, int]:
    """(ulysses, ring) for an SP degree: the largest Ulysses degree that divides both the degree and the
    head count, the rest as ring. 30 heads: 2 -> 2x1, 3 -> 3x1, 4 -> 2x2, 6 -> 6x1, 8 -> 2x4."""
    u = max(d for d in range(1, sp_degree + 1) if sp_degree % d == 0 and n_heads % d == 0)
    return u, sp_degree // u


@dataclass
class SPInfo:
    ulysses_degree: int
    ring_degree: int
    attention: str  # "diffusers-ulysses", "diffusers-ulysses-anything", "usp" or "none"
    pads_sequence: bool
    mesh: object = field(default=None, repr=False)
    shards_noise_refiner: bool = False
    # how q, k, v cross the Ulysses group: "packed" (ours: one all-to-all), "diffusers" (three), None (ring only)
    ulysses_exchange: str | None = None


# ----------------------------------------------------------------------------- padding to the degree


def _layer_arg(args: list, kwargs: dict, index: int, name: str):
    if name in kwargs:
        return kwargs[name]
    return args[index] if index < len(args) else None


def _set_layer_arg(args: list, kwargs: dict, index: int, name: str, value) -> None:
    if name in kwargs or index >= len(args):
        kwargs[name] = value
    else:
        args[index] = value


def _make_pad_hook(world_size: int):
    """Forward pre-hook for each main block: pad the unified sequence to a multiple of `world_size`.

    Runs before diffusers' split hook (torch pre-hooks run in `__call__`, diffusers' hooks replace
    `forward`). `freqs_cis` always arrives at full length; `x` only for `layers.0` (later blocks get the
    shard). Pad keys are masked out; pad queries attend to real keys and are dropped by `unpatchify`."""

    def hook(module, args, kwargs):
        args = list(args)
        x = _layer_arg(args, kwargs, 0, "x")
        mask = _layer_arg(args, kwargs, 1, "attn_mask")
        freqs = _layer_arg(args, kwargs, 2, "freqs_cis")
        if _layer_arg(args, kwargs, 4, "noise_mask") is not None:
            raise NotImplementedError("Z-Image omni mode (noise_mask) is not supported under sequence parallelism")
        seq = freqs.shape[1]
        pad = (-seq) % world_size
        if pad == 0:
            return None
        bsz = freqs.shape[0]
        freqs = torch.cat([freqs, freqs.new_zeros(bsz, pad, *freqs.shape[2:])], dim=1)
        if mask is None:
            mask = torch.ones(bsz, seq, dtype=torch.bool, device=freqs.device)
        mask = torch.cat([mask, mask.new_zeros(bsz, pad)], dim=1)
        _set_layer_arg(args, kwargs, 1, "attn_mask", mask)
        _set_layer_arg(args, kwargs, 2, "freqs_cis", freqs)
        if x.shape[1] == seq:
            _set_layer_arg(args, kwargs, 0, "x", torch.cat([x, x.new_zeros(bsz, pad, *x.shape[2:])], dim=1))
        return tuple(args), kwargs

    return hook


# ------------------------------------------------------------------------------------------- apply


def enable_sequence_parallel(
    transformer,
    ulysses_degree: int,
    ring_degree: int = 1,
    *,
    ulysses_anything: bool = False,
    shard_noise_refiner: bool = False,
    real_rope: bool = True,
    attention: str = "diffusers",
) -> SPInfo:
    """Shard `transformer`'s main blocks over the `ulysses_degree * ring_degree` ranks of the (initialised)
    default process group. Every rank must call this, and then run the same forwards on the same inputs;
    every rank gets the full output. The attention processors must already be installed: the unsharded
    refiners keep theirs (and their backend), the sharded blocks get diffusers' Ulysses through them or ours.

    `ulysses_anything`: diffusers' Ulysses for head counts the degree does not divide (ring_degree 1).
    `attention` (`denoiser.sp_attention`): the sharded blocks' attention when ring_degree == 1, "diffusers"
    (diffusers' Ulysses) or "packed" (ours, one packed all-to-all); ring_degree > 1 always runs ours.
    `real_rope`: our USP processors apply RoPE in real arithmetic, else as diffusers does.
    `shard_noise_refiner`: also shard the two noise-refiner blocks (image tokens only) at the cost of one
    all-gather per forward.
    """
    n = ulysses_degree * ring_degree
    if n == 1:
        return SPInfo(1, 1, "none", False)
    if attention not in ("diffusers", "packed"):
        raise ValueError(f"denoiser.sp_attention: {attention!r} is not one of 'diffusers', 'packed'")
    use_usp = ring_degree > 1 or attention == "packed"
    if ulysses_anything and ring_degree > 1:
        raise ValueError("ulysses_anything is diffusers' Ulysses-only path: it needs ring_degree 1")
    if ulysses_anything and use_usp:
        raise ValueError("ulysses_anything is diffusers' Ulysses-only path: not with denoiser.sp_attention 'packed'")
    heads = transformer.config.n_heads
    if heads % ulysses_degree and not ulysses_anything:
        u, r = choose_layout(n, heads)
        raise ValueError(
            f"ulysses_degree={ulysses_degree} does not divide the model's {heads} attention heads; use "
            f"ulysses_degree={u} x ring_degree={r} for SP {n}, or ulysses_anything (ring_degree 1 only)"
        )
    if ulysses_anything and heads % ulysses_degree:
        pad_heads = ulysses_degree - heads % ulysses_degree
        if pad_heads >= (heads + pad_heads) // ulysses_degree:
            # diffusers asserts this deep inside the attention; fail here, on every rank alike.
            raise ValueError(f"ulysses_anything cannot split {heads} heads over {ulysses_degree} ranks ({pad_heads} padded heads >= heads per rank)")

    if not dist.is_initialized():
        raise RuntimeError("torch.distributed must be initialised before enable_sequence_parallel")
    if dist.get_world_size() != n:
        raise ValueError(f"ulysses_degree x ring_degree = {n} but the process group has {dist.get_world_size()} ranks")

    from diffusers import ContextParallelConfig

    device_type = "cuda" if next(transformer.parameters()).device.type == "cuda" else "cpu"
    mesh = dist.device_mesh.init_device_mesh(device_type, (ring_degree, ulysses_degree), mesh_dim_names=("ring", "ulysses"))
    cp = ContextParallelConfig(ulysses_degree=ulysses_degree, ring_degree=ring_degree, ulysses_anything=ulysses_anything, mesh=mesh)

    backends = {id(p): processor_backend(p) for p in processors(transformer)}
    if use_usp:
        # enable_parallelism refuses backends without CP support; ours does not use the backend's CP path.
        for p in processors(transformer):
            set_processor_backend(p, None)
    with accelerator_count_at_least_one():
        transformer.enable_parallelism(config=cp, cp_plan=zimage_cp_plan(transformer, shard_noise_refiner))

    sharded = list(transformer.layers) + (list(transformer.noise_refiner) if shard_noise_refiner else [])
    unsharded = [transformer.context_refiner] + ([] if shard_noise_refiner else [transformer.noise_refiner])
    for blocks in unsharded:  # local attention again, with the backend it had (see module docstring)
        for p in processors(blocks):
            set_processor_parallel_config(p, None)
            set_processor_backend(p, backends[id(p)])
    if use_usp:
        groups = SPGroups(mesh, ulysses_degree, ring_degree)
        backend_name = backends.get(id(processors(transformer.layers)[0]))
        for block in sharded:
            block.attention.set_processor(ZImageUSPAttnProcessor(groups, backend_name, real_rope))

    prime_split_hooks(transformer)
    if shard_noise_refiner:
        transformer.noise_refiner[-1].register_forward_hook(_gather_seq_hook(dist.group.WORLD, n))
    pads = not ulysses_anything
    if pads:
        for block in sharded:
            block.register_forward_pre_hook(_make_pad_hook(n), with_kwargs=True)
    attention_kind = "usp" if use_usp else ("diffusers-ulysses-anything" if ulysses_anything else "diffusers-ulysses")
    exchange = None if ulysses_degree == 1 else ("packed" if use_usp else "diffusers")
    return SPInfo(ulysses_degree, ring_degree, attention_kind, pads, mesh, shard_noise_refiner, exchange)


def _gather_seq_hook(group, n: int):
    """Forward hook: [B, S/n, D] shards -> [B, S, D] in rank order, through a dim-0 all-gather (which
    Dynamo traces; a dim-1 one hits a helper it refuses to trace)."""

    def hook(module, args, output):
        return torch.cat(gather_chunks(output, group, n), dim=1)

    return hook
