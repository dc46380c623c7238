"""Third-party start-up noise we know to be harmless, filtered narrowly (by logger and message, or by
warning category and message), with what and why. `install()` runs when serve_app is imported, so in
every process: replicas, proxies, the CLI. Anything not listed here still shows.

| what | where | why it is harmless here |
| --- | --- | --- |
| "Failed to load .../torchao/_C_mxfp8..." / "_C_cutlass_90a" | torchao's import, which diffusers' and transformers' quantizer registries pull in where torchao is installed (not a dependency of ours; the GPU images have it) | optional CUDA kernels torchao ships for other torch builds; we use none of torchao's kernels (FP8 is ours, serve_app/engines/fp8_linear.py) |
| "Detected no triton" | torchao.kernel.intmm | CPU / Triton-less machines; compile is off there (serve_app/engines/platform.py) |
| "Unable to import `torchao` Tensor objects" | diffusers' torchao quantizer | only for loading torchao-serialized checkpoints, which we never load |
| "... is an Enum subclass and is now natively supported by torch.compile" | torch.utils._pytree, at torchao's import | a deprecation torchao must act on; nothing we call |
| ZeroCopyTensorsWarning, "The given NumPy array is not writable" | Ray's zero-copy tensor serialization | what the stages pass each other are CPU tensors nobody writes to: the reason serve_app/app.py turns zero-copy on |
"""

from __future__ import annotations

import logging
import re
import warnings

_LOG_FILTERS = {
    "torchao": re.compile(r"Failed to load .*torchao/_C_"),
    "torchao.kernel.intmm": re.compile(r"Detected no triton"),
    "diffusers.quantizers.torchao.torchao_quantizer": re.compile(r"Unable to import `torchao` Tensor objects"),
    "torch.utils._pytree": re.compile(r"is an Enum subclass and is now natively supported by torch\.compile"),
}
_installed = False


class _Drop(logging.Filter):
    def __init__(self, pattern: re.Pattern):
        super().__init__()
        self.pattern = pattern

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            return not self.pattern.search(record.getMessage())
        except Exception:
            return True


def install() -> None:
    global _installed
    if _installed:
        return
    _installed = True
    for name, pattern in _LOG_FILTERS.items():
        logging.getLogger(name).addFilter(_Drop(pattern))
    warnings.filterwarnings("ignore", message=r"Zero-copy tensor serialization is enabled")
    warnings.filterwarnings("ignore", message=r"The given NumPy array is not writable", category=UserWarning)
