"""Every use of a private diffusers or torch internal, in one place.

Written for diffusers 0.42.* and torch 2.11-2.13. `check_library_versions()` runs when an engine is built
and refuses another diffusers at start, with this message, rather than failing deep inside a forward: each
function below names what it reaches into, so a new release is checked here and nowhere else.
"""

from __future__ import annotations

import contextlib
import inspect

import torch

SUPPORTED_DIFFUSERS = "0.42."


def check_library_versions(diffusers_version: str | None = None) -> None:
    if diffusers_version is None:
        import diffusers

        diffusers_version = diffusers.__version__
    if not diffusers_version.startswith(SUPPORTED_DIFFUSERS):
        raise RuntimeError(
            f"serve_app needs diffusers {SUPPORTED_DIFFUSERS}* (found {diffusers_version}): its Z-Image sequence "
            "parallelism, attention processors and compiled-block fixes reach into that release's internals "
            "(serve_app/engines/library_internals.py); install diffusers==0.42.*"
        )


# ---- diffusers -------------------------------------------------------------------------------------


def context_parallel_io():
    """diffusers' plan entry types, which 0.42 does not export at the top level."""
    from diffusers.models._modeling_parallel import ContextParallelInput, ContextParallelOutput

    return ContextParallelInput, ContextParallelOutput


def prime_split_hooks(transformer) -> None:
    """diffusers' split hooks find an argument's position with `inspect.signature` on their first call,
    which Dynamo cannot trace (`compile_repeated_blocks(fullgraph=True)` fails on it): fill that cache now."""
    from diffusers.hooks.context_parallel import ContextParallelSplitHook

    for m in transformer.modules():
        registry = getattr(m, "_diffusers_hook", None)
        for hook in getattr(registry, "hooks", {}).values():
            meta = getattr(hook, "module_forward_metadata", None) if isinstance(hook, ContextParallelSplitHook) else None
            if meta is not None and meta.cached_parameter_indices is None and meta._cls is not None:
                names = list(inspect.signature(meta._cls.forward).parameters)[1:]
                meta.cached_parameter_indices = {name: i for i, name in enumerate(names)}


def processors(modules) -> list:
    """The attention processors under `modules` that take diffusers' backend / parallel settings (the
    `_attention_backend` and `_parallel_config` attributes `set_attention_backend` and
    `enable_parallelism` write)."""
    return [m.processor for m in modules.modules() if hasattr(getattr(m, "processor", None), "_parallel_config")]


def processor_backend(processor) -> str | None:
    backend = processor._attention_backend
    return getattr(backend, "value", backend)


def set_processor_backend(processor, backend) -> None:
    processor._attention_backend = backend


def processor_parallel_config(processor):
    return processor._parallel_config


def set_processor_parallel_config(processor, config) -> None:
    processor._parallel_config = config


@contextlib.contextmanager
def accelerator_count_at_least_one():
    """`ModelMixin._resolve_parallel_config` computes `rank % torch.accelerator.device_count()`, a
    ZeroDivisionError on a CPU-only torch (count 0). The device it builds is only recorded on the
    config (the mesh is ours), so pretending one device is harmless."""
    orig = torch.accelerator.device_count
    torch.accelerator.device_count = lambda: max(1, orig())
    try:
        yield
    finally:
        torch.accelerator.device_count = orig


def contiguous_rope_tables(transformer) -> None:
    """Hand the refiner blocks their RoPE table as a contiguous tensor. `_prepare_sequence` slices it out of
    a longer padded table, so its batch stride depends on the batch's caption lengths and a compiled block
    guarding on that stride recompiles mid-run (benchmarks/README.md, "RoPE-stride recompile")."""
    prepare = transformer._prepare_sequence

    def prepare_sequence(*args, **kwargs):
        feats, freqs_cis, *rest = prepare(*args, **kwargs)
        return (feats, freqs_cis.contiguous(), *rest)

    transformer._prepare_sequence = prepare_sequence


# ---- torch -----------------------------------------------------------------------------------------


def raise_recompile_limits(per_frame: int = 64, accumulated: int = 512) -> None:
    """One block class serves refiners and main layers, several graphs each: more than Dynamo's default 8."""
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, per_frame)
    torch._dynamo.config.accumulated_recompile_limit = max(torch._dynamo.config.accumulated_recompile_limit, accumulated)


def scaled_mm(a, b, scale_a, scale_b, bias, out_dtype, use_fast_accum: bool = False):
    """FP8 GEMM with per-row scales (`torch._scaled_mm`, what torchao's FP8 linears call too).
    `use_fast_accum`: Hopper's FP8 accumulation without the periodic promotion to float32 (torchao's
    inference default)."""
    return torch._scaled_mm(a, b, scale_a=scale_a, scale_b=scale_b, bias=bias, out_dtype=out_dtype,
                            use_fast_accum=use_fast_accum)


def _wait(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed._functional_collectives import AsyncCollectiveTensor

    return t.wait() if isinstance(t, AsyncCollectiveTensor) else t


def all_to_all_single(x: torch.Tensor, group) -> torch.Tensor:
    """Functional (Dynamo-traceable) even all-to-all over dim 0 of a flat tensor."""
    return _wait(all_to_all_single_async(x, group))


def all_to_all_single_async(x: torch.Tensor, group) -> torch.Tensor:
    """`all_to_all_single`, issued and not waited: the result is in flight (on the collective's own
    stream under NCCL) until `wait_collective` or its first use, so compute issued meanwhile overlaps it."""
    from torch.distributed import _functional_collectives as funcol

    return funcol.all_to_all_single(x, None, None, group)


def wait_collective(t: torch.Tensor) -> torch.Tensor:
    """The result of a collective issued by `all_to_all_single_async`, once it has arrived."""
    return _wait(t)


def all_gather_dim0(x: torch.Tensor, group) -> torch.Tensor:
    """Functional all-gather, concatenated on dim 0 (renamed `all_gather_single` in torch 2.12)."""
    from torch.distributed import _functional_collectives as funcol

    gather = getattr(funcol, "all_gather_single", None) or funcol.all_gather_tensor
    return _wait(gather(x.contiguous(), 0, group))


def attention_with_lse(q, k, v, bias, kernel: str):
    """Attention of [B, H, S, D] tensors that also returns the log-sum-exp, through one of SDPA's kernels
    (the public `scaled_dot_product_attention` does not return it): `kernel` "cpu_flash", "cuda_flash"
    (no bias) or "cudnn". Returns (out, lse [B, H, S]) or raises."""
    if kernel == "cpu_flash":
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False, attn_mask=bias)[:2]
    if kernel == "cuda_flash":
        return torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, False, False)[:2]
    res = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, bias, True, 0.0, False, False)
    lse = res[1]
    return res[0], (lse.squeeze(-1) if lse.ndim == 4 else lse)  # (B, H, S, 1) on torch >= 2.9


def on_dynamo_compile(start, end) -> None:
    """Call `start(compile_id)` / `end(compile_id)` around every Dynamo compile in this process."""
    from torch._dynamo.callback import callback_handler

    callback_handler.register_start_callback(lambda args: start(str(args.compile_id)))
    callback_handler.register_end_callback(lambda args: end(str(args.compile_id)))


def fx_graph_cache_misses() -> int:
    """How many graphs Inductor has compiled in this process without finding them in its FX-graph cache."""
    from torch._dynamo.utils import counters

    return counters["inductor"]["fxgraph_cache_miss"]


def mark_spatial_dims_dynamic(t: torch.Tensor) -> None:
    """Compile `t`'s height and width (dims 2, 3) as symbols, so that one graph serves every size."""
    torch._dynamo.maybe_mark_dynamic(t, 2)
    torch._dynamo.maybe_mark_dynamic(t, 3)


def log_recompile_reasons() -> None:
    """Dynamo logs each recompile's failed guard (what TORCH_LOGS=recompiles turns on)."""
    import torch._logging

    torch._logging.set_logs(recompiles=True)
