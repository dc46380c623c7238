"""A sequence-parallel DiT group on Ray core: N rank actors in a placement group, driven as one engine.

`SPGroup` starts one `SPRankWorker` per bundle of the placement group it is given (inside a Serve replica
with `placement_group_bundles`, that is the replica's own group, `ray.util.get_current_placement_group()`;
the replica itself sits in bundle 0, so the ranks take bundles 1..N: `first_bundle_index=1`). Each worker
asks for one GPU when its bundle has one; a worker that finds no usable CUDA (a CPU-only torch with
pretend GPUs) runs on CPU with gloo. Rank 0's node IP and a free port there are the rendezvous; every
rank builds the same SP `DenoiserEngine`; `denoise(requests)` sends the same requests (CPU
tensors, one object in the store) to all ranks and returns rank 0's latents as CPU tensors.

`SPGroup` is a `serve_app.engines.denoiser.Denoiser`, as a local `DenoiserEngine` is.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time

import ray
import torch
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from serve_app.config import AppConfig
from serve_app.stage_messages import DenoiseRequest

log = logging.getLogger(__name__)


@ray.remote(concurrency_groups={"health": 1})
class SPRankWorker:
    """One rank: its process group membership and its `DenoiserEngine`.

    Everything that enters a collective runs in the default concurrency group, one call at a time (two
    threads issuing collectives on one process group would interleave differently on different ranks and
    deadlock); `ping` has its own group so that it answers while a denoise runs."""

    def __init__(self, rank: int, world_size: int, app_config: dict):
        self.rank, self.world_size = rank, world_size
        self.cfg = AppConfig.model_validate(app_config)
        self.engine = None

    def rendezvous_address(self) -> tuple[str, int]:
        """This node's IP and a port free on it (asked of rank 0)."""
        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        return ray.util.get_node_ip_address(), port

    def setup(self, master_addr: str, master_port: int) -> dict:
        from serve_app.engines.compile_watch import compile_watch
        from serve_app.engines.denoiser import DenoiserEngine
        from serve_app.sp.process_group import init_sp_process_group, sp_options, sp_rank_info

        self.compile_watch = compile_watch()

        device = init_sp_process_group(
            self.rank, self.world_size, master_addr, master_port, timeout_s=self.cfg.denoiser.collective_timeout_s
        )
        if device.type == "cpu":
            torch.set_num_threads(max(1, int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1))))
        self.engine = DenoiserEngine(self.cfg.model, self.cfg.denoiser, device=device, sp=sp_options(self.cfg.denoiser), lora=self.cfg.lora)
        return {**sp_rank_info(self.engine), "node_ip": ray.util.get_node_ip_address(), "gpu_ids": ray.get_gpu_ids()}

    def denoise(self, requests: list[DenoiseRequest]) -> list[torch.Tensor] | None:
        latents = self.engine.denoise(requests)
        return [t.cpu() for t in latents] if self.rank == 0 else None  # the others hold the same values

    def warmup(self, sizes: list[tuple[int, int]], steps: int = 1, batch: int = 1) -> None:
        self.engine.warmup([tuple(s) for s in sizes], steps, batch)
        self.compile_watch.serving()

    def load_adapter(self, name: str) -> None:  # every rank holds the same adapters
        self.engine.load_adapter(name)

    def unload_adapter(self, name: str) -> None:
        self.engine.unload_adapter(name)

    def check_adapters(self, adapters) -> None:
        self.engine.check_adapters(adapters)

    @ray.method(concurrency_group="health")
    def ping(self) -> int:
        return self.rank

    def check_collectives(self, timeout_s: float) -> bool:
        from serve_app.sp.process_group import check_collectives

        check_collectives(self.engine.device, timeout_s)
        return True

    def stats(self) -> dict:
        return {**self.engine.stats(), "compile": self.compile_watch.snapshot()}


class SPGroup:
    """N rank workers in `placement_group`, bundles `first_bundle_index .. first_bundle_index + N - 1`."""

    def __init__(
        self,
        app_cfg: AppConfig,
        n: int | None = None,
        *,
        placement_group=None,
        first_bundle_index: int = 0,
        num_cpus_per_worker: float | None = None,
        setup_timeout_s: float | None = None,
    ):
        self.cfg = app_cfg
        self.n = n or app_cfg.denoiser.sp_degree
        if app_cfg.denoiser.sp_degree not in (1, self.n):
            raise ValueError(f"denoiser ulysses_degree x ring_degree = {app_cfg.denoiser.sp_degree} but the group has {self.n} ranks")
        self.timeout_s = app_cfg.denoiser.collective_timeout_s
        self.device = torch.device("cpu")  # where `denoise` returns its latents
        self.workers: list = []
        pg = placement_group if placement_group is not None else ray.util.get_current_placement_group()
        if pg is not None and len(pg.bundle_specs) < first_bundle_index + self.n:
            raise ValueError(f"placement group has {len(pg.bundle_specs)} bundles, need {first_bundle_index + self.n}")
        as_dict = app_cfg.model_dump(mode="json")
        for rank in range(self.n):
            opts: dict = {}
            if pg is not None:
                bundle = pg.bundle_specs[first_bundle_index + rank]
                opts["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
                    placement_group=pg, placement_group_bundle_index=first_bundle_index + rank
                )
                opts["num_gpus"] = 1 if bundle.get("GPU", 0) >= 1 else bundle.get("GPU", 0)
                opts["num_cpus"] = min(1.0, bundle.get("CPU", 0)) if num_cpus_per_worker is None else num_cpus_per_worker
            else:
                log.warning("SPGroup without a placement group: ranks may land on different nodes")
                opts["num_gpus"] = 1 if torch.cuda.is_available() else 0
                opts["num_cpus"] = 1 if num_cpus_per_worker is None else num_cpus_per_worker
            self.workers.append(SPRankWorker.options(**opts).remote(rank, self.n, as_dict))
        try:
            addr, port = ray.get(self.workers[0].rendezvous_address.remote(), timeout=setup_timeout_s)
            self.rank_info = ray.get([w.setup.remote(addr, port) for w in self.workers], timeout=setup_timeout_s)
        except BaseException:
            self.shutdown()
            raise
        self._lock = threading.Lock()
        self._in_flight = 0  # denoise / warmup calls running on the ranks

    @contextlib.contextmanager
    def _busy(self):
        with self._lock:
            self._in_flight += 1
        try:
            yield
        finally:
            with self._lock:
                self._in_flight -= 1

    def info(self) -> dict:
        """Rank 0's build record, and every rank's place (rank, device, node, GPU)."""
        return {**self.rank_info[0], "ranks": list(self.rank_info)}

    def stats(self) -> dict:
        return ray.get(self.workers[0].stats.remote(), timeout=self.timeout_s)

    def _refs(self, method: str, *args) -> list:
        return [getattr(w, method).remote(*args) for w in self.workers]

    def denoise(self, requests: list[DenoiseRequest], timeout_s: float | None = None) -> list[torch.Tensor]:
        """Rank 0's latents [C, h, w] (float32, CPU) per request, in order."""
        with self._busy():
            reqs = ray.put(requests)  # CPU tensors (stage_messages), stored once for every rank
            return _get_all(self._refs("denoise", reqs), timeout_s)[0]

    def load_adapter(self, name: str) -> None:
        """Every rank reads LoRA adapter `name` (each rank's side paths compute the same adapter set)."""
        _get_all(self._refs("load_adapter", name), self.timeout_s)

    def unload_adapter(self, name: str) -> None:
        _get_all(self._refs("unload_adapter", name), self.timeout_s)

    def check_adapters(self, adapters) -> None:
        _get_all(self._refs("check_adapters", tuple(adapters)), self.timeout_s)

    def warmup(self, sizes: list[tuple[int, int]], steps: int = 1, batch: int = 1) -> None:
        with self._busy():
            _get_all(self._refs("warmup", [tuple(s) for s in sizes], steps, batch), None)

    def check_health(self, timeout_s: float | None = None) -> None:
        """Raise if a rank is dead (RayActorError) or a tiny all_reduce does not finish in time
        (GetTimeoutError / the worker's TimeoutError). Pings first, so that survivors of a dead rank do not
        enter a collective that can never finish."""
        timeout_s = timeout_s or self.timeout_s
        deadline = time.monotonic() + timeout_s
        _get_all(self._refs("ping"), timeout_s)
        if self._in_flight:
            # The ranks are inside a denoise (its collectives are the check; a hung one fails it with the
            # process group's timeout); a health all_reduce would only queue behind it.
            return
        _get_all(self._refs("check_collectives", timeout_s), max(0.1, deadline - time.monotonic()))

    def shutdown(self) -> None:
        for w in self.workers:
            try:
                ray.kill(w, no_restart=True)
            except Exception:  # already gone
                pass
        self.workers = []

    def __del__(self):  # pragma: no cover - best effort
        try:
            if self.workers and ray.is_initialized():
                self.shutdown()
        except Exception:
            pass


def _get_all(refs: list, timeout_s: float | None) -> list:
    """`ray.get` of all refs, but raising as soon as any of them fails (a dead rank) instead of first
    waiting for ranks that are stuck in a collective with it."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    pending = list(refs)
    while pending:
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        ready, pending = ray.wait(pending, num_returns=1, timeout=left)
        if not ready:
            raise ray.exceptions.GetTimeoutError(f"{len(pending)} of {len(refs)} ranks did not answer within {timeout_s} s")
        ray.get(ready)  # raises RayActorError / the task's error
    return ray.get(refs)

