"""Liveness and readiness, apart, answered from published state without touching the stages' queues.

`/health/live`: the ingress answers at all (its event loop runs). `/health/ready` (and `/health`): every
stage deployment (each size route's denoiser among them) has a RUNNING replica, as Ray Serve's
controller publishes it, and one warm-up generation has gone through every stage. A replica is RUNNING only once its constructor returned (model
loaded, warmed up) and while its health check passes; a stage's `check_health` fails for a dead or hung
SP rank and for a DiT batch past `denoiser.max_batch_s`, and Serve counts a health check that does not
return within `health_check_timeout_s` as failed, so a wedged stage (a replica that stops answering)
turns readiness off within

    3 x (health_check_period_s + health_check_timeout_s) + server.health_refresh_s

(3: Serve's REPLICA_HEALTH_CHECK_UNHEALTHY_THRESHOLD). The ingress re-reads the controller's state every
`server.health_refresh_s` in the background; the probe reads the last result, so a loaded server never
queues a probe behind generation work. A state older than 5 refreshes (the controller does not answer)
reads as not ready.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Awaitable, Callable

log = logging.getLogger("ray.serve")

STAGES = ("TextEncoder", "Denoiser", "VaeDecoder")


class Readiness:
    def __init__(self, refresh_s: float, warmup: Callable[[], Awaitable[None]] | None, stages: tuple[str, ...] = STAGES):
        """`stages`: the deployments that each need a RUNNING replica (every denoiser route's among them)."""
        self.refresh_s = refresh_s
        self.required = stages
        self.warmup = warmup  # None: no warm-up generation needed
        self.warm = warmup is None
        self.stages: dict[str, dict] = {}
        self.reason = "starting"
        self.checked_at: float | None = None
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run())

    def _read(self) -> dict[str, dict]:
        from ray import serve

        app_name = serve.get_replica_context().app_name
        app = serve.status().applications[app_name]
        return {name: {"status": str(getattr(dep.status, "value", dep.status)), "running": dep.replica_states.get("RUNNING", 0)}
                for name, dep in app.deployments.items() if name in self.required}

    async def _run(self) -> None:
        while True:
            try:
                stages = await asyncio.wait_for(asyncio.to_thread(self._read), timeout=max(5.0, 5 * self.refresh_s))
                self.stages = stages
                self.checked_at = time.monotonic()
                missing = [n for n in self.required if stages.get(n, {}).get("running", 0) < 1]
                if missing:
                    self.reason = "no running replica of " + ", ".join(missing)
                elif not self.warm:
                    self.reason = "warming up"
                    try:
                        await self.warmup()
                        self.warm = True
                        self.reason = ""
                    except Exception as e:  # tried again on the next refresh
                        log.warning("warm-up generation failed: %s", type(e).__name__)
                else:
                    self.reason = ""
            except Exception as e:
                log.warning("reading the stages' state failed: %s", type(e).__name__)
            await asyncio.sleep(self.refresh_s)

    def ready(self) -> tuple[bool, str]:
        if self.checked_at is None:
            return False, self.reason
        if time.monotonic() - self.checked_at > 5 * self.refresh_s + 5:
            return False, "the stages' state is stale (Serve's controller does not answer)"
        if self.reason:
            return False, self.reason
        return self.warm, "" if self.warm else "warming up"

    def body(self) -> dict:
        ok, reason = self.ready()
        out = {"status": "ok" if ok else "unavailable", "stages": self.stages}
        if not ok:
            out["reason"] = reason
        return out
