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
        and SP 2/4/8 nothing is padded), the pad positions masked out as keys (`_pad_for_sp`);
      - `layers.0`'s input `x` and every main layer's `attn_mask` / `freqs_cis` split on dim 1
        (diffusers' `ContextParallelSplitHook`), so each rank holds S/N tokens through the 30 main blocks;
      - the final layer runs on the rank's S/N tokens and its output (64 channels, not 3840) is gathered
        on dim 1 (`ContextParallelGatherHook`); `unpatchify` reads only the leading image tokens, so the
        trailing pad never reaches the latents.
  attention in the main blocks:
      - ring_degree == 1: diffusers' own Ulysses attention (all-to-all seq<->heads), any CP-capable backend
        (`native`, `_native_cudnn`, `flash`, ...); the key mask is all-gathered by diffusers.
      - ring_degree > 1: our `ZImageUSPAttnProcessor` (Ulysses all-to-all inside the ulysses group, then
        ring over the ring group, partial results merged by log-sum-exp). diffusers' ring does not fit
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

import contextlib
import logging
import math
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from serve_app.rotary import apply_rotary_emb, apply_rotary_emb_complex, output_projection, rotated_qkv

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------- plan


def zimage_cp_plan(transformer, shard_noise_refiner: bool = False) -> dict:
    """The context-parallel plan for `ZImageTransformer2DModel` (see module docstring)."""
    from diffusers.models._modeling_parallel import ContextParallelInput, ContextParallelOutput

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


# ------------------------------------------------------------------------------------ CPU workaround


@contextlib.contextmanager
def _accelerator_count_at_least_one():
    """`ModelMixin._resolve_parallel_config` computes `rank % torch.accelerator.device_count()`, which is
    a ZeroDivisionError on a CPU-only torch (count 0). The device it builds is only recorded on the
    config; our mesh is passed in, so pretending one device is harmless."""
    orig = torch.accelerator.device_count
    torch.accelerator.device_count = lambda: max(1, orig())
    try:
        yield
    finally:
        torch.accelerator.device_count = orig


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


# --------------------------------------------------------------------- Ulysses x ring attention (USP)


def _wait(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed._functional_collectives import AsyncCollectiveTensor

    return t.wait() if isinstance(t, AsyncCollectiveTensor) else t


def _seq_to_heads(x: torch.Tensor, group, n: int) -> torch.Tensor:
    """[B, S_local, H, D] -> [B, n*S_local, H/n, D]: all-to-all inside the Ulysses group."""
    from torch.distributed import _functional_collectives as funcol

    b, s, h, d = x.shape
    x = x.reshape(b, s, n, h // n, d).permute(2, 1, 0, 3, 4).contiguous()  # [dst, S, B, h, D]
    x = _wait(funcol.all_to_all_single(x.flatten(), None, None, group)).reshape(n, s, b, h // n, d)
    return x.flatten(0, 1).permute(1, 0, 2, 3).contiguous()  # src-rank chunks in order along S


def _heads_to_seq(x: torch.Tensor, group, n: int) -> torch.Tensor:
    """[B, n*S_local, h, D] -> [B, S_local, n*h, D]: the inverse all-to-all."""
    from torch.distributed import _functional_collectives as funcol

    b, sn, h, d = x.shape
    s = sn // n
    x = x.reshape(b, n, s, h, d).permute(1, 2, 0, 3, 4).contiguous()  # [dst, S, B, h, D]
    x = _wait(funcol.all_to_all_single(x.flatten(), None, None, group)).reshape(n, s, b, h, d)
    return x.permute(2, 1, 0, 3, 4).reshape(b, s, n * h, d)  # src rank = head group


def _all_gather_dim0(x: torch.Tensor, group, n: int) -> list[torch.Tensor]:
    from torch.distributed import _functional_collectives as funcol

    gather = getattr(funcol, "all_gather_single", None) or funcol.all_gather_tensor  # renamed in torch 2.12
    return list(_wait(gather(x.contiguous(), 0, group)).chunk(n))


_FAILED_KERNELS: set[str] = set()


def _attention_lse_math(q, k, v, bias):
    """Reference path, any device/dtype: fp32 scores. q/k/v [B, H, S, D]; returns out, lse [B, H, Sq]."""
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) / math.sqrt(q.shape[-1])
    if bias is not None:
        scores = scores + bias.float()
    lse = torch.logsumexp(scores, dim=-1)
    out = torch.matmul(torch.exp(scores - lse[..., None]), v.float())
    return out, lse


def _attention_with_lse(q, k, v, key_mask, backend: str | None):
    """softmax(q k^T / sqrt(d)) v over the given keys and its log-sum-exp. q/k/v [B, S, H, D] (model
    layout), key_mask [B, Sk] bool or None. Returns out [B, Sq, H, D] float32 and lse [B, Sq, H] float32.
    Samples whose keys are all masked in this chunk get lse = -inf and out = 0 (they add nothing)."""
    qt, kt, vt = (t.transpose(1, 2).contiguous() for t in (q, k, v))
    bias = None
    if key_mask is not None:
        # A large finite negative instead of -inf: a fully-masked chunk then gives finite garbage that
        # we zero below, never NaN inside a kernel.
        bias = torch.zeros(key_mask.shape, dtype=q.dtype, device=q.device).masked_fill(~key_mask, -1e30 if q.dtype != torch.float16 else -6e4)
        bias = bias[:, None, None, :]
    out = lse = None
    if q.device.type == "cpu" and "cpu_flash" not in _FAILED_KERNELS:
        try:  # PyTorch's CPU flash kernel returns the LSE and takes an additive mask
            out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(qt, kt, vt, 0.0, False, attn_mask=bias)
        except Exception as e:  # pragma: no cover - depends on the torch build
            _FAILED_KERNELS.add("cpu_flash")
            log.warning("CPU flash attention with LSE failed (%s); using the math path", e)
    elif q.device.type == "cuda" and q.dtype in (torch.float16, torch.bfloat16):
        kernel = "cuda_flash" if bias is None and backend in (None, "native", "flash", "_native_flash") else "cudnn"
        if kernel not in _FAILED_KERNELS:
            try:
                if kernel == "cuda_flash":
                    out, lse = torch.ops.aten._scaled_dot_product_flash_attention(qt, kt, vt, 0.0, False, False)[:2]
                else:
                    res = torch.ops.aten._scaled_dot_product_cudnn_attention(qt, kt, vt, bias, True, 0.0, False, False)
                    out, lse = res[0], res[1]
                    if lse.ndim == 4:  # (B, H, S, 1) on torch >= 2.9
                        lse = lse.squeeze(-1)
            except Exception as e:
                _FAILED_KERNELS.add(kernel)
                log.warning("%s attention with LSE failed (%s); using the math path from now on", kernel, e)
                out = lse = None
    if out is None:
        out, lse = _attention_lse_math(qt, kt, vt, bias)
    out, lse = out.float().transpose(1, 2), lse.float().transpose(1, 2)  # [B, Sq, H, D], [B, Sq, H]
    if key_mask is not None:
        empty = ~key_mask.any(dim=-1)  # [B]
        if bool(empty.any()):
            lse = lse.masked_fill(empty[:, None, None], float("-inf"))
            out = out.masked_fill(empty[:, None, None, None], 0.0)
    return out, lse


def _merge(out1, lse1, out2, lse2):
    """Combine two partial attentions over disjoint key sets (safe when either or both are empty)."""
    lse = torch.logaddexp(lse1, lse2)
    ref = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    w1, w2 = torch.exp(lse1 - ref)[..., None], torch.exp(lse2 - ref)[..., None]
    return out1 * w1 + out2 * w2, lse


def usp_attention(q, k, v, key_mask, cp_config, backend: str | None = None) -> torch.Tensor:
    """Ulysses x ring attention on the local shard. q/k/v [B, S_local, H, D], key_mask [B, S_local]
    bool or None. Returns [B, S_local, H, D] in q's dtype."""
    u, r = cp_config.ulysses_degree, cp_config.ring_degree
    if u > 1:
        group = cp_config._ulysses_mesh.get_group()
        q, k, v = (_seq_to_heads(t, group, u) for t in (q, k, v))
        if key_mask is not None:
            key_mask = torch.cat(_all_gather_dim0(key_mask[None], group, u), dim=-1)[0]
    if r > 1:
        group = cp_config._ring_mesh.get_group()
        kv = _all_gather_dim0(torch.stack([k, v]), group, r)  # allgather rotation, as diffusers does
        masks = _all_gather_dim0(key_mask[None], group, r) if key_mask is not None else [None] * r
        out = lse = None
        for kv_i, m_i in zip(kv, masks):
            o_i, l_i = _attention_with_lse(q, kv_i[0], kv_i[1], m_i[0] if m_i is not None else None, backend)
            out, lse = (o_i, l_i) if out is None else _merge(out, lse, o_i, l_i)
    else:
        out, _ = _attention_with_lse(q, k, v, key_mask, backend)
    out = out.to(q.dtype)
    if u > 1:
        out = _heads_to_seq(out, cp_config._ulysses_mesh.get_group(), u)
    return out


class ZImageUSPAttnProcessor:
    """`ZSingleStreamAttnProcessor` (diffusers 0.42.1) with the attention call replaced by
    `usp_attention`. Only installed on the main blocks, whose inputs are sequence shards."""

    _attention_backend = None
    _parallel_config = None

    def __init__(self, cp_config, backend: str | None = None, real_rope: bool = True):
        self.cp_config = cp_config
        self.backend = backend
        self.rope = apply_rotary_emb if real_rope else apply_rotary_emb_complex

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, freqs_cis=None):
        query, key, value = rotated_qkv(attn, hidden_states, freqs_cis, self.rope)
        if attention_mask is not None and attention_mask.ndim == 4:  # [B, 1, 1, S] -> [B, S]
            attention_mask = attention_mask[:, 0, 0, :]
        if attention_mask is not None and attention_mask.dtype != torch.bool:
            attention_mask = attention_mask > (-1e4 if attention_mask.is_floating_point() else 0)
        out = usp_attention(query, key, value, attention_mask, self.cp_config, self.backend)
        return output_projection(attn, out, query.dtype)


# ------------------------------------------------------------------------------------------- apply


def enable_sequence_parallel(
    transformer,
    ulysses_degree: int,
    ring_degree: int = 1,
    mesh_or_none=None,
    *,
    ulysses_anything: bool = False,
    attention: str = "auto",
    shard_noise_refiner: bool = False,
    real_rope: bool = True,
) -> SPInfo:
    """Shard `transformer`'s main blocks over `ulysses_degree * ring_degree` ranks of the (initialised)
    default process group. Every rank must call this, and then run the same forwards on the same inputs;
    every rank gets the full output.

    `mesh_or_none`: a DeviceMesh with dims ("ring", "ulysses"), or None to build one over all ranks.
    `ulysses_anything`: diffusers' Ulysses for head counts the degree does not divide (ring_degree 1).
    `attention`: "auto" (diffusers' Ulysses when ring_degree == 1, ours otherwise) or "usp" (always ours).
    `real_rope`: our processors apply RoPE in real arithmetic (`serve_app.rotary`), else as diffusers does.
    `shard_noise_refiner`: also shard the two noise-refiner blocks (image tokens only; ~6% of a 1024²
    forward that would otherwise run whole on every rank) at the cost of one all-gather per forward.
    """
    n = ulysses_degree * ring_degree
    if n == 1:
        return SPInfo(1, 1, "none", False)
    if attention not in ("auto", "usp"):
        raise ValueError(f"attention must be 'auto' or 'usp', got {attention!r}")
    use_usp = attention == "usp" or ring_degree > 1
    if ulysses_anything and use_usp:
        raise ValueError("ulysses_anything is diffusers' Ulysses-only path: it needs ring_degree 1 and attention 'auto'")
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
    if mesh_or_none is None and dist.get_world_size() != n:
        raise ValueError(f"ulysses_degree x ring_degree = {n} but the process group has {dist.get_world_size()} ranks")

    from diffusers import ContextParallelConfig

    mesh = mesh_or_none
    if mesh is None:
        device_type = "cuda" if next(transformer.parameters()).device.type == "cuda" else "cpu"
        mesh = dist.device_mesh.init_device_mesh(device_type, (ring_degree, ulysses_degree), mesh_dim_names=("ring", "ulysses"))
    cp = ContextParallelConfig(ulysses_degree=ulysses_degree, ring_degree=ring_degree, ulysses_anything=ulysses_anything, mesh=mesh)

    backend = None
    for m in transformer.layers.modules():
        if hasattr(getattr(m, "processor", None), "_attention_backend"):
            backend = m.processor._attention_backend
            break
    backend_name = getattr(backend, "value", backend)
    if use_usp and backend_name is not None:
        # enable_parallelism refuses backends without CP support; ours does not use the backend's CP path.
        for m in transformer.modules():
            if hasattr(getattr(m, "processor", None), "_attention_backend"):
                m.processor._attention_backend = None

    with _accelerator_count_at_least_one():
        transformer.enable_parallelism(config=cp, cp_plan=zimage_cp_plan(transformer, shard_noise_refiner))

    sharded = list(transformer.layers) + (list(transformer.noise_refiner) if shard_noise_refiner else [])
    unsharded = [transformer.context_refiner] + ([] if shard_noise_refiner else [transformer.noise_refiner])
    # Unsharded refiners run locally (see module docstring).
    for blocks in unsharded:
        for m in blocks.modules():
            if hasattr(getattr(m, "processor", None), "_parallel_config"):
                m.processor._parallel_config = None
                if use_usp and backend_name is not None:
                    m.processor._attention_backend = backend
    if use_usp:
        for block in sharded:
            block.attention.set_processor(ZImageUSPAttnProcessor(cp, backend_name, real_rope))

    _prime_split_hooks(transformer)
    if shard_noise_refiner:
        transformer.noise_refiner[-1].register_forward_hook(_gather_seq_hook(cp._flattened_mesh.get_group(), n))
    pads = not ulysses_anything
    if pads:
        for block in sharded:
            block.register_forward_pre_hook(_make_pad_hook(n), with_kwargs=True)
    attention_kind = "usp" if use_usp else ("diffusers-ulysses-anything" if ulysses_anything else "diffusers-ulysses")
    return SPInfo(ulysses_degree, ring_degree, attention_kind, pads, mesh, shard_noise_refiner)


def _gather_seq_hook(group, n: int):
    """Forward hook: [B, S/n, D] shards -> [B, S, D] in rank order, through a dim-0 all-gather (which
    Dynamo traces; a dim-1 one hits a helper it refuses to trace)."""

    def hook(module, args, output):
        return torch.cat(_all_gather_dim0(output, group, n), dim=1)

    return hook


def _prime_split_hooks(transformer) -> None:
    """diffusers' split hooks find an argument's position with `inspect.signature` on their first call,
    which Dynamo cannot trace (`compile_repeated_blocks(fullgraph=True)` fails on it): fill that cache now."""
    import inspect

    from diffusers.hooks.context_parallel import ContextParallelSplitHook

    for m in transformer.modules():
        registry = getattr(m, "_diffusers_hook", None)
        for hook in getattr(registry, "hooks", {}).values():
            meta = getattr(hook, "module_forward_metadata", None) if isinstance(hook, ContextParallelSplitHook) else None
            if meta is not None and meta.cached_parameter_indices is None and meta._cls is not None:
                names = list(inspect.signature(meta._cls.forward).parameters)[1:]
                meta.cached_parameter_indices = {name: i for i, name in enumerate(names)}
