"""The process group of a sequence-parallel DiT: one `DenoiserEngine` per rank, its transformer sharded over the ranks.

Every rank builds the same engine (same weights: rank 0's are broadcast), applies the Z-Image
context-parallel plan (serve_app/sp/plan.py) and runs `denoise(requests)` with the same
requests: same seeds, so the same starting noise and schedule on every rank; inside each DiT forward the
30 main blocks work on 1/N of the sequence, and the gathered output makes every rank step the same
latents. Rank 0's result is the answer (the others hold identical copies).

  init_sp_process_group(rank, world_size, master_addr, master_port)        # once per process
  engine = DenoiserEngine(model_cfg, denoiser_cfg, sp=sp_options(denoiser_cfg))  # every rank
  latents = engine.denoise(requests)                                         # every rank, same requests
"""

from __future__ import annotations

import datetime
import logging
import os

import torch
import torch.distributed as dist

from serve_app.config import DenoiserConfig
from serve_app.engines.dit_builder import SPOptions
from serve_app.engines.platform import collective_for, detect_platform

log = logging.getLogger(__name__)


def init_sp_process_group(
    rank: int,
    world_size: int,
    master_addr: str,
    master_port: int,
    backend: str | None = None,
    timeout_s: float = 120.0,
    local_rank: int | None = None,
) -> torch.device:
    """Join the SP group and return this rank's device.

    NCCL when CUDA is usable (on ROCm torch's "nccl" is RCCL), after `torch.cuda.set_device(local_rank)`;
    gloo on CPU, including a CPU-only torch inside an actor that Ray gave a (pretend) GPU. `local_rank`
    defaults to `rank % visible GPUs`, which is 0 in a Ray actor that sees only its own GPU.
    `timeout_s` bounds the rendezvous and every collective (NCCL/gloo watchdog)."""
    use_cuda = torch.cuda.is_available() and backend in (None, "nccl")
    if use_cuda:
        local_rank = rank % torch.cuda.device_count() if local_rank is None else local_rank
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    # NCCL / RCCL / gloo by vendor, and the environment it wants (NCCL: NVLink multicast off; RCCL:
    # hipBLASLt, device kernel args), never overriding what the operator set.
    chosen, env = collective_for(detect_platform(device))
    backend = backend or chosen
    for k, v in env.items():
        os.environ.setdefault(k, v)
    if dist.is_initialized():
        raise RuntimeError("a default process group already exists in this process")
    dist.init_process_group(
        backend=backend,
        init_method=f"tcp://{master_addr}:{int(master_port)}",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=timeout_s),
    )
    return device


def check_collectives(device: torch.device, timeout_s: float) -> None:
    """A one-element all_reduce that must finish within `timeout_s` on every rank."""
    t = torch.ones(1, device=device)
    work = dist.all_reduce(t, async_op=True)
    if not work.wait(timeout=datetime.timedelta(seconds=timeout_s)):
        raise TimeoutError(f"all_reduce did not finish in {timeout_s} s")
    if int(t.item()) != dist.get_world_size():
        raise RuntimeError(f"all_reduce returned {t.item()}, expected {dist.get_world_size()}")


def broadcast_weights(module: torch.nn.Module) -> None:
    """Rank 0's parameters and buffers on every rank, whatever the weight source: one broadcast is cheaper
    than trusting every GPU's RNG to agree on random-full weights."""
    with torch.no_grad():
        for t in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(t.data, src=0)


def sp_options(cfg: DenoiserConfig, **overrides) -> SPOptions:
    """This process's `SPOptions` for `cfg` over the default process group."""
    return SPOptions(world_size=dist.get_world_size(), ulysses_degree=cfg.ulysses_degree, ring_degree=cfg.ring_degree,
                     shard_noise_refiner=cfg.sp_shard_noise_refiner, attention=cfg.sp_attention, **overrides)


def sp_rank_info(engine) -> dict:
    """A rank's `info()` with its place in the group."""
    return {**engine.info(), "rank": dist.get_rank(), "world_size": dist.get_world_size(), "backend": dist.get_backend()}
