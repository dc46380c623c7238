"""FP8 linear layers with per-row scales: weights quantized once per output row, activations per token at
run time, one `torch._scaled_mm` (FP8 tensor cores) with the bf16 output and the bias fused.

The arithmetic of torchao's `Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())`, held in
plain tensors instead of a tensor subclass, so that `torch.compile` treats the FP8 weights and scales as
ordinary graph inputs and every DiT block shares one compiled graph (the subclass path's first compile
is far slower: benchmarks/README.md, "FP8 through torchao").
"""

from __future__ import annotations

import torch

from serve_app.engines.library_internals import scaled_mm


def _rowwise_scale(x: torch.Tensor, fp8_max: float) -> torch.Tensor:
    """float32 [rows, 1]: each row's absolute max mapped onto the FP8 format's largest finite value."""
    return (x.abs().amax(dim=-1, keepdim=True).float() / fp8_max).clamp(min=1e-12)


class Float8RowwiseLinear(torch.nn.Module):
    def __init__(self, linear: torch.nn.Linear, fp8_dtype: torch.dtype, fast_accum: bool = False):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.fp8_dtype = fp8_dtype
        self.fast_accum = fast_accum
        self.fp8_max = float(torch.finfo(fp8_dtype).max)
        w = linear.weight.detach()
        scale = _rowwise_scale(w, self.fp8_max)  # [out, 1]
        self.weight = torch.nn.Parameter((w.float() / scale).to(fp8_dtype), requires_grad=False)  # [out, in]
        self.weight_scale = torch.nn.Parameter(scale.t().contiguous(), requires_grad=False)  # [1, out]
        self.bias = None if linear.bias is None else torch.nn.Parameter(linear.bias.detach(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)
        x_scale = _rowwise_scale(x2, self.fp8_max)  # [tokens, 1]
        xq = (x2.float() / x_scale).clamp(-self.fp8_max, self.fp8_max).to(self.fp8_dtype)
        out = scaled_mm(xq, self.weight.t(), x_scale, self.weight_scale, self.bias, x.dtype, self.fast_accum)
        return out.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fp8={self.fp8_dtype}, fast_accum={self.fast_accum}"


def quantize_linears_fp8(model: torch.nn.Module, fp8_dtype: torch.dtype, filter_fn, device: torch.device | None = None,
                         fast_accum: bool = False) -> int:
    """Replace every `nn.Linear` for which `filter_fn(module, fqn)` holds by a Float8RowwiseLinear, in
    place, each moved to `device` first when given; returns how many were replaced."""
    # names only, so that each bf16 linear is freed as soon as it is replaced: holding them all would
    # keep a bf16 copy of the blocks next to the FP8 one until the end (the peak of a bf16 + FP8 model)
    names = [fqn for fqn, m in model.named_modules() if isinstance(m, torch.nn.Linear) and filter_fn(m, fqn)]
    for fqn in names:
        parent_name, _, child = fqn.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        linear = getattr(parent, child)
        setattr(parent, child, Float8RowwiseLinear(linear.to(device) if device is not None else linear, fp8_dtype, fast_accum))
        del linear
    return len(names)
