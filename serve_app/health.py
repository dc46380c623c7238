"""Liveness and readiness, apart, answered from published state without touching the stages' queues.

`/health/live`: the ingress answers at all (its event loop runs). `/health/ready` (and `/health`): every
stage deployment (each size route's denoiser among them) has a RUNNING replica, as Ray Serve's
controller publishes it, and one warm-up generation has gone through every stage. A replica is RUNNING only once its constructor returned (model
loaded, warmed up) and while its health check passes; a stage's `check_health` fails for a dead or hung
SP rank and for a DiT batch past `denoiser.max_batch_s`, and Serve counts a health check that does not
return within `health_check_timeout_s` as failed, so a wedged stage (a replica that stops answering)
turns readiness off within

    3 x (health_check_period_s + health_check_timeout_s) + server.health_refresh_s

(3: Serve's REPLICA_HEALTH_CHECK_UNHEALTHY_THRESHOLD). Until the warm-up has gone through, the ingress
reads the controller's state every `server.health_refresh_s` in the background (the warm-up starts
without waiting for a probe); after that a probe re-reads it when the last read is older than
`health_refresh_s` (probes at once share one read), so an idle server polls nobody (each read is a full
`serve.status()`: ~0.1 of a core per ingress at one a second). The read goes to the controller, never
to a stage, so a loaded server never queues a probe behind generation work. A state older than 5
refreshes whose re-read fails (the controller does not answer) reads as not ready.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Awaitable, Callable

log = logging.getLogger("ray.serve")

class Readiness:
    def __init__(self, refresh_s: float, warmup: Callable[[], Awaitable[None]] | None, stages: list[tuple[str, str]]):
        """`stages`: (application, deployment) of each stage the ingress calls (every denoiser route's among
        them), each of which needs a RUNNING replica; taken from the ingress's handles, so a front door
        over another application's stages reads that application's."""
        self.refresh_s = refresh_s
        self.required = stages
        self.warmup = warmup  # None: no warm-up generation needed
        self.warm = warmup is None
        self.stages: dict[str, dict] = {}
        self.missing: list[str] = []  # required deployments without a RUNNING replica at the last read
        self.checked_at: float | None = None
        self._until_warm_task: asyncio.Task | None = None
        self._read_task: asyncio.Task | None = None

    def start(self) -> None:
        """Poll in the background until the warm-up has gone through (then probes read on demand)."""
        if not self.warm and (self._until_warm_task is None or self._until_warm_task.done()):
            self._until_warm_task = asyncio.get_running_loop().create_task(self._until_warm())

    def _read(self) -> dict[str, dict]:
        from ray import serve

        apps = serve.status().applications
        out = {}
        for app_name, name in self.required:
            dep = apps[app_name].deployments.get(name) if app_name in apps else None
            if dep is not None:
                out[name] = {"status": str(getattr(dep.status, "value", dep.status)), "running": dep.replica_states.get("RUNNING", 0)}
        return out

    async def _read_once(self) -> None:
        try:
            self.stages = await asyncio.wait_for(asyncio.to_thread(self._read), timeout=max(5.0, 5 * self.refresh_s))
            self.checked_at = time.monotonic()
            self.missing = [n for _, n in self.required if self.stages.get(n, {}).get("running", 0) < 1]
        except Exception as e:
            log.warning("reading the stages' state failed: %s", type(e).__name__)

    async def refresh(self) -> None:
        """Re-read the controller's state unless the last read is younger than `refresh_s`; callers at
        once share one read."""
        if self.checked_at is not None and time.monotonic() - self.checked_at < self.refresh_s:
            return
        if self._read_task is None or self._read_task.done():
            self._read_task = asyncio.get_running_loop().create_task(self._read_once())
        await asyncio.shield(self._read_task)

    async def _until_warm(self) -> None:
        while not self.warm:
            await self.refresh()
            if self.checked_at is not None and not self.missing:
                try:
                    await self.warmup()
                    self.warm = True
                except Exception as e:  # tried again on the next refresh
                    log.warning("warm-up generation failed: %s", type(e).__name__)
            await asyncio.sleep(self.refresh_s)

    def ready(self) -> tuple[bool, str]:
        if self.checked_at is None:
            return False, "starting"
        if time.monotonic() - self.checked_at > 5 * self.refresh_s + 5:
            return False, "the stages' state is stale (Serve's controller does not answer)"
        if self.missing:
            return False, "no running replica of " + ", ".join(self.missing)
        return self.warm, "" if self.warm else "warming up"

    def body(self) -> dict:
        ok, reason = self.ready()
        out = {"status": "ok" if ok else "unavailable", "stages": self.stages}
        if not ok:
            out["reason"] = reason
        return out
