"""Counters every stage deployment reports through `stats()`: batches, batch sizes, busy time and
peak device memory, so tests and benchmarks read behaviour instead of inferring it from timing."""

from __future__ import annotations

import collections
import logging
import os
import threading
import time
from typing import Any, Callable

import torch

from serve_app.engines.compile_watch import compile_watch
from serve_app.engines.devices import cap_process_memory


def startup_line(stage: str, engine: Any, startup_s: dict[str, float], compiles: int = 0) -> str:
    """One line per stage at start: where it runs and with what, and where its start went."""
    info = engine.info() if hasattr(engine, "info") else {}
    attention = info.get("attention") or {}
    parts = [f"{stage} ready: device {engine.device}", f"dtype {str(getattr(engine, 'dtype', '?')).removeprefix('torch.')}"]
    if attention:
        parts.append("attention " + ",".join(sorted(set(attention.values()))))
    if "fp8_dtype" in info:
        parts.append(f"fp8 {info['fp8_dtype'] or 'off'}")
    compiled = info.get("compile", getattr(engine, "compiled", None))
    if compiled is not None:
        parts.append(f"compile {'on' if compiled else 'off'}")
    if info.get("sp"):
        parts.append(f"SP {info['sp'].get('ulysses_degree')}x{info['sp'].get('ring_degree')}")
    parts.append(f"build {startup_s.get('build', 0):.1f} s, warm-up {startup_s.get('warmup', 0):.1f} s")
    if compiles:
        parts[-1] += f" ({startup_s.get('compile', 0):.1f} s of it compiling {compiles} torch.compile graphs)"
    return ", ".join(parts)


def log_through_serve() -> None:
    """Our own modules' log lines (serve_app.*: each torch.compile at start, warnings)
    at INFO through the replica's Serve logger: its log file and console, with the replica's context."""
    ours, serve_logger = logging.getLogger("serve_app"), logging.getLogger("ray.serve")
    for handler in serve_logger.handlers:
        if handler not in ours.handlers:
            ours.addHandler(handler)
    if serve_logger.handlers:
        ours.setLevel(logging.INFO)


class StageStats:
    def __init__(self, device: torch.device):
        from serve_app.engines.platform import detect_platform

        self.device = device
        self.platform = detect_platform(device).as_dict()  # vendor, chip, arch: what the replica landed on
        self._lock = threading.Lock()
        self.batches = 0
        self.items = 0
        self.busy_s = 0.0
        self.batch_sizes: collections.Counter = collections.Counter()
        # where the replica's start went: build (load + switches), warmup; compile(s): torch.compile within them
        self.startup_s: dict[str, float] = {}
        self.startup_compiles = 0  # torch.compile graphs built during build + warm-up
        self.startup_peak_memory_bytes: int | None = None
        self.compile_watch = None
        self.metrics = None  # serve_app.metrics.StageMetrics once serving (Prometheus, through Ray Serve)
        self.on_batch_start: Callable[[], None] | None = None  # e.g. the DiT's queue gauge

    @classmethod
    def start(cls, build: Callable[[], Any], warmup: Callable[[Any], Any], gpu_memory_gb: float | None = None,
              stage: str | None = None) -> tuple[Any, "StageStats"]:
        """Build a stage's engine (this process capped at `gpu_memory_gb`), then warm it up; the stats know
        where the start went."""
        if gpu_memory_gb is not None and torch.cuda.is_available():
            cap_process_memory(gpu_memory_gb, torch.device("cuda", torch.cuda.current_device()))
        log_through_serve()
        watch = compile_watch()
        before = watch.snapshot()
        t0 = time.perf_counter()
        engine = build()
        t1 = time.perf_counter()
        stats = cls(engine.device)
        warmup(engine)
        compiled = watch.snapshot()
        stats.startup_s = {"build": t1 - t0, "warmup": time.perf_counter() - t1,  # compile: within build + warm-up
                           "compile": compiled["compile_s"] - before["compile_s"]}
        stats.startup_compiles = compiled["compiles"] - before["compiles"]
        watch.serving()  # a compile from now on is on the request path: counted and logged
        stats.compile_watch = watch
        if engine.device.type == "cuda":  # what start-up needed, then the serving peak from here on
            stats.startup_peak_memory_bytes = torch.cuda.max_memory_allocated(engine.device)
            torch.cuda.reset_peak_memory_stats(engine.device)
        if stage is not None:
            from serve_app.metrics import StageMetrics

            stats.metrics = StageMetrics(stage)
            logging.getLogger("ray.serve").info("%s", startup_line(stage, engine, stats.startup_s, stats.startup_compiles))
        return engine, stats

    def timed(self, fn: Callable[[list], list], items: list, kind: str | None = None) -> tuple[list, float]:
        """fn(items), recorded as one batch (of `kind`, default the stage's name, in the metrics); returns
        its results and seconds."""
        if self.on_batch_start is not None:
            self.on_batch_start()
        t0 = time.perf_counter()
        out = fn(items)
        dt = time.perf_counter() - t0
        self.record(len(items), dt)
        if self.metrics is not None:
            memory = None
            if self.device.type == "cuda":
                memory = (torch.cuda.memory_allocated(self.device), torch.cuda.max_memory_allocated(self.device))
            compiles = self.compile_watch.compiles_while_serving if self.compile_watch is not None else 0
            self.metrics.batch(kind or self.metrics.stage, memory, compiles)
        return out, dt

    def record(self, batch_size: int, seconds: float) -> None:
        with self._lock:
            self.batches += 1
            self.items += batch_size
            self.busy_s += seconds
            self.batch_sizes[batch_size] += 1

    def snapshot(self) -> dict:
        peak = torch.cuda.max_memory_allocated(self.device) if self.device.type == "cuda" else None
        with self._lock:
            return {
                "pid": os.getpid(),
                "device": str(self.device),
                "platform": self.platform,
                "batches": self.batches,
                "items": self.items,
                "busy_s": round(self.busy_s, 4),
                "batch_sizes": {str(k): v for k, v in sorted(self.batch_sizes.items())},
                "peak_memory_bytes": peak,  # since the replica became ready
                "startup_peak_memory_bytes": self.startup_peak_memory_bytes,
                "memory_in_use_bytes": torch.cuda.memory_allocated(self.device) if self.device.type == "cuda" else None,
                "startup_s": {k: round(v, 3) for k, v in self.startup_s.items()},
                "startup_compiles": self.startup_compiles,
                # torch.compile in this process; for an SP denoiser the ranks' (rank 0) replace it
                "compile": self.compile_watch.snapshot() if self.compile_watch is not None else None,
            }
