"""Counts torch.compile work in this process, so a compile while serving is never silent.

Each stage process installs one `CompileWatch` (compiles are process-wide). Every Dynamo compile is
timed and logged with its cause (Dynamo's own recompile reason, captured from its `recompiles` log): at
start as information (where a start's seconds went), and after `serving()` as a warning, counted as on
the request path. Every time Dynamo gives up on a frame at its recompile limit (it then runs
that frame eagerly) is counted and logged as a warning.
"""

from __future__ import annotations

import logging
import threading
import time

from serve_app.engines.library_internals import log_recompile_reasons, on_dynamo_compile

log = logging.getLogger(__name__)

_WATCH: "CompileWatch | None" = None


class _DynamoLogTap(logging.Handler):
    """Reads Dynamo's log records: the latest recompile reason, and recompile-limit hits."""

    def __init__(self, watch: "CompileWatch"):
        super().__init__(level=logging.DEBUG)
        self.watch = watch

    def emit(self, record: logging.LogRecord) -> None:
        try:
            msg = record.getMessage()
        except Exception:
            return
        if "Recompiling function" in msg:
            lines = msg.strip().splitlines()  # "Recompiling function f in file:line", "triggered by ...", guards
            self.watch._reason = " ".join(line.strip() for line in (lines[:1] + lines[2:3]))[:300]
        elif "recompile_limit" in msg or "cache_size_limit" in msg:
            self.watch._limit_hit(msg)


class CompileWatch:
    def __init__(self):
        self._lock = threading.Lock()
        self._serving = False
        self._started: dict[str, float] = {}
        self._reason: str | None = None
        self.compiles = 0  # all Dynamo compiles in this process
        self.compile_s = 0.0
        self.compiles_while_serving = 0
        self.compile_s_while_serving = 0.0
        self.recompile_limit_hits = 0
        self.last_while_serving: str | None = None

    def install(self) -> "CompileWatch":
        on_dynamo_compile(self._start, self._end)
        log_recompile_reasons()
        logging.getLogger("torch._dynamo").addHandler(_DynamoLogTap(self))
        return self

    def serving(self) -> None:
        """From now on every compile is on the request path."""
        with self._lock:
            self._serving = True

    def _start(self, compile_id: str) -> None:
        with self._lock:
            self._started[compile_id] = time.perf_counter()

    def _end(self, compile_id: str) -> None:
        with self._lock:
            t0 = self._started.pop(compile_id, None)
            dt = time.perf_counter() - t0 if t0 is not None else 0.0
            reason, self._reason = self._reason or "first compile of this frame", None
            self.compiles += 1
            self.compile_s += dt
            serving = self._serving
            if serving:
                self.compiles_while_serving += 1
                self.compile_s_while_serving += dt
                self.last_while_serving = reason
        if serving:
            log.warning("torch.compile while serving (%.1f s, compile %s): %s", dt, compile_id, reason)
        else:
            log.info("torch.compile at start (%.1f s, compile %s): %s", dt, compile_id, reason)

    def _limit_hit(self, msg: str) -> None:
        with self._lock:
            self.recompile_limit_hits += 1
        log.warning("Dynamo hit its recompile limit; that frame now runs eagerly: %s", msg[:300])

    def snapshot(self) -> dict:
        with self._lock:
            return {
                "compiles": self.compiles,
                "compile_s": round(self.compile_s, 3),
                "compiles_while_serving": self.compiles_while_serving,
                "compile_s_while_serving": round(self.compile_s_while_serving, 3),
                "recompile_limit_hits": self.recompile_limit_hits,
                "last_compile_while_serving": self.last_while_serving,
            }


def compile_watch() -> CompileWatch:
    """This process's watch, installed on first use."""
    global _WATCH
    if _WATCH is None:
        _WATCH = CompileWatch().install()
    return _WATCH
