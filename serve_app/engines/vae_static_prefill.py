"""The VAE's static graphs (`vae.static_sizes`) compiled in a child process while the replica compiles its
symbolic graph (`vae.prefill_static_graphs`).

One process compiles one graph at a time, and on an empty compile cache the VAE's three graphs were the
longest part of a start (H200: symbolic 45 s, then static 1024² 20 s and 512² 15 s, one after the other;
benchmarks/README.md, "cold start"). A static graph does not depend on anything compiled before it, so a
child process compiles the same graphs into the same cache (`TORCHINDUCTOR_CACHE_DIR`) meanwhile, and the
replica's own static compiles find them there. The child holds a VAE of its own on the same GPU for its
lifetime. It is stopped once the replica's symbolic graph came from the cache (a warm cache: the static
graphs are there too, and waiting for the child would only lengthen the start), and not started where the
replica's memory is capped (a small card); a failed child only means the replica compiles them itself.
Ours: torch has no API to compile graphs for another process.

    python -m serve_app.engines.vae_static_prefill '<ModelConfig JSON>' '[[h, w], ...]'   # latent sizes
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time

log = logging.getLogger(__name__)


def start_prefill(model_json: str, latent_shapes: list[tuple[int, int]], backend: str = "inductor") -> subprocess.Popen:
    """The child compiling `latent_shapes` (batch 1) into this process's compile cache."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    return subprocess.Popen([sys.executable, "-m", __name__, model_json, json.dumps(latent_shapes), backend], env=env)


def wait_prefill(child: subprocess.Popen, timeout_s: float = 300.0) -> bool:
    """Wait for the child; True when it compiled everything. A child past `timeout_s` is killed."""
    t0 = time.perf_counter()
    try:
        rc = child.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait()
        rc = None
    if rc != 0:
        log.warning("VAE static graph prefill %s; the replica compiles them itself",
                    "timed out" if rc is None else f"failed (exit status {rc})")
    else:
        log.info("VAE static graphs prefilled by a child process (waited %.1f s for it)", time.perf_counter() - t0)
    return rc == 0


def stop_prefill(child: subprocess.Popen) -> None:
    """The cache was warm (the replica's symbolic graph came from it): the child is not needed."""
    child.kill()
    child.wait()
    log.info("VAE static graph prefill stopped: the compile cache already holds the VAE's graphs")


def main(model_json: str, shapes_json: str, backend: str) -> None:
    import torch

    from serve_app.config import ModelConfig
    from serve_app.engines.compile_cache import use_compile_cache
    from serve_app.engines.devices import placement
    from serve_app.engines.model_sources import load_vae

    model_cfg = ModelConfig.model_validate_json(model_json)
    use_compile_cache(model_cfg.compile_cache_dir)
    device, dtype = placement(model_cfg)
    vae = load_vae(model_cfg, device, dtype)
    c = vae.config.latent_channels
    static = torch.compile(vae.decoder, backend=backend, dynamic=False)  # as StaticOrSymbolic compiles it
    with torch.no_grad():
        for h, w in json.loads(shapes_json):
            static(torch.zeros(1, c, h, w, device=device, dtype=dtype))


if __name__ == "__main__":
    main(*sys.argv[1:4])
