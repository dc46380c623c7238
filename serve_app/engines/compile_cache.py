"""Where torch.compile keeps its kernels: one directory for every stage that compiles (DiT, VAE,
text encoder), so that a restarted or scaled-out replica loads compiled kernels instead of building
them (Inductor's FX-graph and AOTAutograd caches, and Triton's kernels under the same directory).

`model.compile_cache_dir` set: that directory. Unset: `TORCHINDUCTOR_CACHE_DIR` from the environment
(the Kubernetes workers point it at the model PVC, shared by every pod), else Inductor's default
`/tmp/torchinductor_<user>`, shared by the replicas on one node.
"""

from __future__ import annotations

import os


def use_compile_cache(path: str | None) -> str | None:
    """Point this process's Inductor cache at `path` (before anything compiles); returns the cache
    directory in effect, or None for Inductor's default."""
    if path:
        os.makedirs(path, exist_ok=True)
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.abspath(path)
    os.environ.setdefault("TORCHINDUCTOR_FX_GRAPH_CACHE", "1")
    os.environ.setdefault("TORCHINDUCTOR_AUTOGRAD_CACHE", "1")
    return os.environ.get("TORCHINDUCTOR_CACHE_DIR")
