"""LoRA adapters per request: read through diffusers' own loader, applied as a low-rank side path of fixed
size beside every linear of the DiT, so that switching adapters changes tensors, never the graph.

Reading (`read_adapter`): `ZImageLoraLoaderMixin.lora_state_dict` (the file, or a diffusers-format folder,
through diffusers' converters for community formats) and `load_lora_into_transformer`, the code
`ZImagePipeline.load_lora_weights` runs, into a weightless copy of the DiT (its parameters are zero-stride
views of one scalar: no memory). peft then holds, per adapted linear, the adapter's A [r, in], B [out, r]
and scaling (alpha / r, rank and alpha patterns, rsLoRA: peft computes it); we take those three and nothing
else. DoRA, LoRA biases and LoKr are refused.

Applying (`LoraSidePath`): every linear of the DiT is wrapped once, at build time and before compile, as
`base(x) + (x A^T) B^T` with buffers A [R, in] and B [out, R] of a fixed rank R (`lora.max_rank`). An
adapter set (one or several adapters, each with its scale) is written into those buffers in place:
adapter i's A rows and B columns side by side, B multiplied by scale_i x scaling_i, zeros after; their
sum is exactly peft's sum of each adapter's `B(A x) * scaling * scale`, up to float rounding. The buffers
never change shape, dtype or identity, so a compiled block sees the same graph whatever is active (no
recompile: tests/test_lora_parity.py counts them), and with nothing active the side path adds zeros, so the
output is the base model's bit for bit.

FP8 (`denoiser.fp8`): the side path is a separate bf16 low-rank path on the linear's bf16 input beside the
FP8 `_scaled_mm`; the FP8 weights are never re-quantized, so switching adapters costs a buffer copy
(benchmarks/bench_lora.py measures the side path's cost against the bf16 DiT and against none).
"""

from __future__ import annotations

import os
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch

ADAPTER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
WEIGHT_SUFFIX = ".safetensors"

AdapterSet = tuple[tuple[str, float], ...]  # ((name, scale), ...), in the request's order


class AdapterError(ValueError):
    """An adapter set a request may not use (its message names only adapters, never files)."""


class UnknownAdapter(AdapterError):
    """A name that is not an adapter inside the folder (malformed, escaping it, or not there)."""


def _inside(path: Path, folder: Path) -> bool:
    try:
        path.resolve(strict=True).relative_to(folder.resolve(strict=True))
        return True
    except (ValueError, OSError):
        return False


def _is_adapter(path: Path, folder: Path) -> bool:
    if not _inside(path, folder):  # a symlink out of the folder is no adapter
        return False
    if path.is_file():
        return path.suffix == WEIGHT_SUFFIX
    if path.is_dir():  # a diffusers-format folder: its weight files, each inside the folder too
        files = [f for f in path.iterdir() if f.suffix == WEIGHT_SUFFIX]
        return bool(files) and all(_inside(f, folder) and f.is_file() for f in files)
    return False


def list_adapters(folder: str | Path | None) -> list[str]:
    """The adapter names in `folder`: `<name>.safetensors` files and `<name>/` diffusers-format folders."""
    if folder is None or not Path(folder).is_dir():
        return []
    folder = Path(folder)
    names = set()
    for entry in folder.iterdir():
        name = entry.name.removesuffix(WEIGHT_SUFFIX) if entry.suffix == WEIGHT_SUFFIX else entry.name
        if ADAPTER_NAME.fullmatch(name) and _is_adapter(entry, folder):
            names.add(name)
    return sorted(names)


def resolve_adapter(folder: str | Path | None, name: str) -> Path:
    """The file or folder of adapter `name` inside `folder`; UnknownAdapter for anything else (a path, `..`,
    a symlink out of the folder, a name that is not there)."""
    if folder is None:
        raise UnknownAdapter("this server has no LoRA adapters (lora.dir is not set)")
    if not isinstance(name, str) or not ADAPTER_NAME.fullmatch(name) or name in (".", ".."):
        raise UnknownAdapter(f"{str(name)[:64]!r} is not an adapter name (letters, digits, '.', '_', '-'; see GET /v1/loras)")
    folder = Path(folder)
    file, directory = folder / (name + WEIGHT_SUFFIX), folder / name
    if os.path.lexists(file) and _is_adapter(file, folder):
        return file
    if directory.is_dir() and _is_adapter(directory, folder):  # `x.safetensors` names no adapter: `x` does
        return directory
    raise UnknownAdapter(f"unknown LoRA adapter {name!r}; GET /v1/loras lists them")


@dataclass
class LoadedAdapter:
    """One adapter, ready for the side paths: per adapted linear (its name in the DiT), A [r, in] and
    B [out, r] already multiplied by peft's scaling, on the engine's device and dtype."""

    name: str
    layers: dict[str, tuple[torch.Tensor, torch.Tensor]]
    nbytes: int = 0

    def rank(self, module: str) -> int:
        return self.layers[module][0].shape[0] if module in self.layers else 0


def weightless_transformer(config: dict):
    """The DiT's architecture with no memory behind it: every parameter a zero-stride view of a CPU
    scalar (peft puts an adapter on its base layer's device, which must not be `meta`)."""
    from diffusers import ZImageTransformer2DModel

    with torch.device("meta"):
        model = ZImageTransformer2DModel.from_config(config)
    for module in model.modules():
        for pname, p in list(module.named_parameters(recurse=False)):
            setattr(module, pname, torch.nn.Parameter(torch.zeros((), dtype=torch.float32).expand(p.shape), requires_grad=False))
    return model.eval()


def read_adapter(path: str | Path, name: str, transformer_config: dict, device: torch.device, dtype: torch.dtype) -> LoadedAdapter:
    """Adapter `name` from `path` through diffusers' loader (converters included) and peft's config."""
    from diffusers import ZImagePipeline
    from peft.tuners.lora import LoraLayer
    from peft.tuners.tuners_utils import BaseTunerLayer

    path = Path(path)
    kwargs = {"weight_name": path.name} if path.is_file() else {}
    source = str(path.parent if path.is_file() else path)
    state_dict, metadata = ZImagePipeline.lora_state_dict(source, return_lora_metadata=True, local_files_only=True, **kwargs)
    if not state_dict or not all("lora" in k for k in state_dict):
        raise AdapterError(f"adapter {name!r} is not a LoRA checkpoint (LoKr and other formats are not served)")
    skeleton = weightless_transformer(transformer_config)
    key = "adapter"  # peft's name for it in the skeleton (ours may hold a '.', which peft refuses)
    ZImagePipeline.load_lora_into_transformer(state_dict, transformer=skeleton, adapter_name=key, metadata=metadata, low_cpu_mem_usage=True)
    layers, nbytes = {}, 0
    for fqn, module in skeleton.named_modules():
        if not isinstance(module, BaseTunerLayer):
            continue
        if not isinstance(module, LoraLayer) or key not in module.lora_A:
            raise AdapterError(f"adapter {name!r}: {fqn} is not a LoRA layer (LoKr and other formats are not served)")
        if module.use_dora.get(key) or getattr(module, "lora_bias", {}).get(key):
            raise AdapterError(f"adapter {name!r}: DoRA and LoRA biases are not served")
        if not isinstance(module.get_base_layer(), torch.nn.Linear):
            raise AdapterError(f"adapter {name!r}: {fqn} is not a linear layer")
        a = module.lora_A[key].weight.detach()
        b = module.lora_B[key].weight.detach() * module.scaling[key]
        layers[fqn] = (a.to(device, dtype).contiguous(), b.to(device, dtype).contiguous())
        nbytes += sum(t.numel() * t.element_size() for t in layers[fqn])
    if not layers:
        raise AdapterError(f"adapter {name!r} adapts no layer of this model")
    return LoadedAdapter(name=name, layers=layers, nbytes=nbytes)


class LoraSidePath(torch.nn.Module):
    """`base(x) + (x A^T) B^T` with A [R, in] and B [out, R] buffers of fixed rank R, written in place."""

    def __init__(self, base: torch.nn.Module, in_features: int, out_features: int, max_rank: int, device, dtype):
        super().__init__()
        self.base = base
        self.in_features, self.out_features, self.max_rank = in_features, out_features, max_rank
        self.register_buffer("lora_A", torch.zeros(max_rank, in_features, device=device, dtype=dtype), persistent=False)
        self.register_buffer("lora_B", torch.zeros(out_features, max_rank, device=device, dtype=dtype), persistent=False)

    @property
    def weight(self):  # diffusers reads e.g. `t_embedder.mlp[0].weight.dtype`
        return self.base.weight

    @property
    def bias(self):
        return self.base.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.nn.functional.linear(x.to(self.lora_A.dtype), self.lora_A)
        return self.base(x) + torch.nn.functional.linear(h, self.lora_B).to(x.dtype)

    def extra_repr(self) -> str:
        return f"max_rank={self.max_rank}"


def install_side_paths(transformer: torch.nn.Module, max_rank: int, device: torch.device, dtype: torch.dtype) -> dict[str, LoraSidePath]:
    """Wrap every linear of the DiT (`nn.Linear`, or its FP8 replacement) in a LoraSidePath, in place;
    returns them by the linear's own name (the name adapters use)."""
    from serve_app.engines.fp8_linear import Float8RowwiseLinear

    names = [fqn for fqn, m in transformer.named_modules() if isinstance(m, (torch.nn.Linear, Float8RowwiseLinear))]
    out = {}
    for fqn in names:
        parent_name, _, child = fqn.rpartition(".")
        parent = transformer.get_submodule(parent_name) if parent_name else transformer
        base = getattr(parent, child)
        wrapped = LoraSidePath(base, base.in_features, base.out_features, max_rank, device, dtype)
        if isinstance(parent, torch.nn.ModuleDict):
            parent[child] = wrapped
        else:
            setattr(parent, child, wrapped)
        out[fqn] = wrapped
    return out


def side_paths(transformer: torch.nn.Module) -> dict[str, LoraSidePath]:
    """The side paths installed in `transformer`, by the wrapped linear's name."""
    return {fqn: m for fqn, m in transformer.named_modules() if isinstance(m, LoraSidePath)}


@dataclass
class LoraStats:
    loads: int = 0
    unloads: int = 0
    switches: int = 0  # adapter-set changes written into the side paths
    load_s: float = 0.0
    loaded: list = field(default_factory=list)


class LoraAdapters:
    """The adapters one DiT holds, by name, and the set its side paths compute now. Thread-safe: the
    deployment loads from its event loop's threads while the GPU thread denoises."""

    def __init__(self, folder: str | Path | None, side_paths: dict[str, LoraSidePath], transformer_config: dict,
                 device: torch.device, dtype: torch.dtype):
        self.folder = None if folder is None else Path(folder)
        self.side_paths = side_paths
        self.max_rank = next(iter(side_paths.values())).max_rank if side_paths else 0
        self.transformer_config = transformer_config
        self.device, self.dtype = device, dtype
        self._lock = threading.RLock()
        self._loaded: dict[str, LoadedAdapter] = {}
        self._active: AdapterSet = ()
        self._stats = LoraStats()

    def is_loaded(self, name: str) -> bool:
        return name in self._loaded

    def load(self, name: str) -> LoadedAdapter:
        """The adapter, read now if it is not held yet."""
        import time

        with self._lock:
            if name in self._loaded:
                return self._loaded[name]
        path = resolve_adapter(self.folder, name)
        t = time.perf_counter()
        adapter = read_adapter(path, name, self.transformer_config, self.device, self.dtype)
        unknown = sorted(set(adapter.layers) - set(self.side_paths))
        if unknown:
            raise AdapterError(f"adapter {name!r} adapts layers this DiT does not have: {', '.join(unknown[:3])}")
        with self._lock:
            self._loaded.setdefault(name, adapter)
            self._stats.loads += 1
            self._stats.load_s += time.perf_counter() - t
            return self._loaded[name]

    def unload(self, name: str) -> None:
        with self._lock:
            if self._loaded.pop(name, None) is not None:
                self._stats.unloads += 1

    def check(self, adapters: AdapterSet) -> None:
        """AdapterError if the set's ranks, summed per layer, pass the side paths' rank (lora.max_rank)."""
        loaded = [self.load(n) for n, _ in adapters]
        for module in {m for a in loaded for m in a.layers}:
            total = sum(a.rank(module) for a in loaded)
            if total > self.max_rank:
                raise AdapterError(f"the adapters' ranks add up to {total} at {module}; this server computes at most "
                                 f"lora.max_rank={self.max_rank}")

    def activate(self, adapters: AdapterSet) -> None:
        """Write `adapters` into the side paths (nothing if they are active already); () turns them off."""
        adapters = tuple((n, float(s)) for n, s in adapters)
        with self._lock:
            if adapters == self._active:
                return
            self.check(adapters)
            loaded = [(self.load(n), s) for n, s in adapters]
            with torch.no_grad():
                for fqn, side in self.side_paths.items():
                    side.lora_A.zero_()
                    side.lora_B.zero_()
                    offset = 0
                    for adapter, scale in loaded:
                        if fqn not in adapter.layers:
                            continue
                        a, b = adapter.layers[fqn]
                        r = a.shape[0]
                        side.lora_A[offset:offset + r].copy_(a)
                        side.lora_B[:, offset:offset + r].copy_(b * scale)
                        offset += r
            self._active = adapters
            self._stats.switches += 1

    def stats(self) -> dict:
        with self._lock:
            return {"max_rank": self.max_rank, "loaded": sorted(self._loaded), "active": [list(a) for a in self._active],
                    "loads": self._stats.loads, "unloads": self._stats.unloads, "switches": self._stats.switches,
                    "load_s": round(self._stats.load_s, 4),
                    "loaded_bytes": sum(a.nbytes for a in self._loaded.values())}
