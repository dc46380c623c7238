"""Which device and dtype an engine runs on."""

from __future__ import annotations

import torch

from serve_app.config import ModelConfig

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def resolve_device(cfg: ModelConfig) -> torch.device:
    if cfg.device != "auto":
        return torch.device(cfg.device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_dtype(cfg: ModelConfig, device: torch.device) -> torch.dtype:
    if cfg.dtype != "auto":
        return _DTYPES[cfg.dtype]
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def placement(cfg: ModelConfig, device: torch.device | None = None) -> tuple[torch.device, torch.dtype]:
    """The device an engine runs on (`device`, else the config's) and its dtype there."""
    device = device or resolve_device(cfg)
    return device, resolve_dtype(cfg, device)


def cap_process_memory(gb: float | None, device: torch.device) -> None:
    """Let this process's caching allocator use at most `gb` of `device` (None: no cap)."""
    if gb is not None and device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, gb * 2**30 / total), device)


def process_memory_capped(device: torch.device) -> bool:
    """Whether this process may use less than all of `device` (`cap_process_memory`)."""
    if device.type != "cuda":
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()  # the getter wants one
    return torch.cuda.get_per_process_memory_fraction(index) < 1.0


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
