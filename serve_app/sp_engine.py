"""Sequence-parallel DiT denoiser: one `DenoiserEngine` per rank, its transformer sharded over the ranks.

Every rank builds the same engine (same weights: rank 0's are broadcast), applies the Z-Image
context-parallel plan (serve_app/zimage_context_parallel.py) and runs `denoise(requests)` with the same
requests: same seeds, so the same starting noise and schedule on every rank; inside each DiT forward the
30 main blocks work on 1/N of the sequence, and the gathered output makes every rank step the same
latents. Rank 0's result is the answer (the others hold identical copies).

  init_sp_process_group(rank, world_size, master_addr, master_port)   # once per process
  sp = SequenceParallelDenoiser(model_cfg, denoiser_cfg)               # every rank
  latents = sp.denoise(requests)                                        # every rank, same requests
"""

from __future__ import annotations

import datetime
import logging
import os

import torch
import torch.distributed as dist

from serve_app.config import DenoiserConfig, ModelConfig
from serve_app.denoiser_engine import DenoiseRequest, DenoiserEngine
from serve_app.dit_acceleration import DEFAULT_ATTENTION_BACKEND, accelerate_transformer
from serve_app.platform import collective_for, detect_platform
from serve_app.zimage_context_parallel import SPInfo, choose_layout, enable_sequence_parallel

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


class SequenceParallelDenoiser:
    """A `DenoiserEngine` whose DiT runs over all ranks of the default process group.

    Layout: `cfg.ulysses_degree x cfg.ring_degree` must equal the world size; when both are 1 (the config
    only says "use this many GPUs") the layout is chosen from the head count (`choose_layout`).
    FP8 and compilation are applied after the plan (hooks first, then the compiled blocks see them)."""

    def __init__(
        self,
        model_cfg: ModelConfig,
        cfg: DenoiserConfig,
        device: torch.device | None = None,
        *,
        sync_weights: bool = True,
        ulysses_anything: bool = False,
        attention: str = "auto",
    ):
        if not dist.is_initialized():
            raise RuntimeError("call init_sp_process_group first")
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        if device is None:
            device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
        self.cfg = cfg
        base = cfg.model_copy(update={"fp8": False, "compile": False})
        self.engine = DenoiserEngine(model_cfg, base, device=device)
        self.engine.same_caption_length_batches = cfg.sp_same_caption_length_batches
        self.device = self.engine.device
        transformer = self.engine.transformer
        if sync_weights and self.world_size > 1:
            # Same weights on every rank whatever the source (random-full is seeded, but one broadcast
            # over NVLink is cheaper than trusting every GPU's RNG to agree).
            with torch.no_grad():
                for t in list(transformer.parameters()) + list(transformer.buffers()):
                    dist.broadcast(t.data, src=0)
        u, r = cfg.ulysses_degree, cfg.ring_degree
        if u * r == 1 and self.world_size > 1:
            u, r = (self.world_size, 1) if ulysses_anything else choose_layout(self.world_size, transformer.config.n_heads)
        if u * r != self.world_size:
            raise ValueError(f"ulysses_degree {u} x ring_degree {r} != world size {self.world_size}")
        self.sp: SPInfo = enable_sequence_parallel(
            transformer, u, r, None, ulysses_anything=ulysses_anything, attention=attention,
            shard_noise_refiner=cfg.sp_shard_noise_refiner, real_rope=cfg.real_rope,
        )
        if cfg.fp8 or cfg.compile:
            # the attention backend was chosen with the engine, before the plan; keep it (diffusers'
            # set_attention_backend would reach the Ulysses processors too)
            applied = accelerate_transformer(transformer, cfg.model_copy(update={"attention_backend": DEFAULT_ATTENTION_BACKEND}), self.device)
            acc = self.engine.acceleration
            acc.update(fp8=applied["fp8"], compile=applied["compile"])
            for key in ("fp8", "fp8_dtype", "compile"):
                acc["engine"][key] = applied["engine"][key]
            acc["engine"]["warnings"] += applied["engine"]["warnings"]

    @property
    def stats(self):
        return self.engine.stats

    @property
    def transformer(self):
        return self.engine.transformer

    def info(self) -> dict:
        return {
            "rank": self.rank,
            "world_size": self.world_size,
            "device": str(self.device),
            "backend": dist.get_backend(),
            "ulysses_degree": self.sp.ulysses_degree,
            "ring_degree": self.sp.ring_degree,
            "attention": self.sp.attention,
            "pads_sequence": self.sp.pads_sequence,
            "shards_noise_refiner": self.sp.shards_noise_refiner,
            "acceleration": dict(self.engine.acceleration),
        }

    def denoise(self, requests: list[DenoiseRequest]) -> list[torch.Tensor]:
        """Every rank calls this with the same requests (same order); all get the same latents."""
        return self.engine.denoise(requests)

    def warmup(self, sizes: list[tuple[int, int]], steps: int = 1, batch: int = 1) -> None:
        self.engine.warmup(sizes, steps, batch)

    def check_collectives(self, timeout_s: float | None = None) -> None:
        check_collectives(self.device, timeout_s or self.cfg.collective_timeout_s)

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()
