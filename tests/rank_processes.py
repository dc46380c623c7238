"""Processes for a test's process-group ranks (torch.multiprocessing), forked from one fork server that
imported the engine's libraries once, instead of fresh interpreters that each import torch, diffusers,
transformers and peft (~6 s of CPU a process on a 2-core runner). Not forked from pytest's own process:
it has run OpenMP regions, which a forked child can hang on."""

from __future__ import annotations

import socket

import torch.multiprocessing as mp

# what every rank imports (the DiT engine with its SP and LoRA parts), loaded once by the fork server
RANK_IMPORTS = ["torch", "diffusers", "peft", "diffusers.models.transformers.transformer_z_image", "serve_app.engines.denoiser",
                "serve_app.engines.dit_builder", "serve_app.engines.lora", "serve_app.sp.process_group"]


def run_ranks(fn, args: tuple, nprocs: int) -> None:
    """`fn(rank, *args)` in `nprocs` processes; returns when all have exited, raises if one failed."""
    mp.set_forkserver_preload(RANK_IMPORTS)  # read when the server starts: the first call of the session
    mp.start_processes(fn, args=args, nprocs=nprocs, join=True, start_method="forkserver")


def free_ports(n: int) -> list[int]:
    """`n` distinct ports free on 127.0.0.1 now (one per process group a test sets up)."""
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports
