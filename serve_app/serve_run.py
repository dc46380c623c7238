"""`python -m serve_app.serve_run CONFIG.yaml [serve run options]`: Ray Serve's `serve run`, plus what it
lacks for a server that has to behave:

- a port already bound by another server (another `serve run`'s proxy, anything) is an error at start,
  named, instead of a second cluster whose proxy shares the port through SO_REUSEPORT; and this cluster's
  proxy binds without SO_REUSEPORT (`SERVE_SOCKET_REUSE_PORT_ENABLED=0`), so a later one cannot share it;
- SIGTERM drains like Ctrl-C: `serve run` shuts Serve down, each replica stops taking new work and
  finishes what is in flight within its `graceful_shutdown_timeout_s` (serve_app/config.py sets it from
  `server.request_timeout_s` unless the config does), then the process exits.
"""

from __future__ import annotations

import errno
import os
import signal
import socket
import sys

import yaml

DEFAULT_HOST, DEFAULT_PORT = "127.0.0.1", 8000  # Serve's


class PortInUse(SystemExit):
    pass


def http_address(config_path: str) -> tuple[str, int]:
    with open(config_path) as f:
        http = (yaml.safe_load(f) or {}).get("http_options") or {}
    return str(http.get("host", DEFAULT_HOST)), int(http.get("port", DEFAULT_PORT))


def metrics_export_port(config_path: str) -> int | None:
    """`server.metrics_export_port` of the config's first application: Ray's Prometheus endpoint."""
    with open(config_path) as f:
        apps = (yaml.safe_load(f) or {}).get("applications") or [{}]
    port = (((apps[0] or {}).get("args") or {}).get("server") or {}).get("metrics_export_port")
    return int(port) if port is not None else None


def check_port_free(host: str, port: int) -> None:
    """Bind the address without SO_REUSEPORT: that fails while any other socket listens there."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a TIME_WAIT leftover is not a server
        try:
            s.bind((host, port))
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise PortInUse(f"serve_app: {host}:{port} is already bound by another server (another `serve run`?); "
                                "stop it or set http_options.port in the config") from None
            raise


def _sigterm(signum, frame):
    raise KeyboardInterrupt  # `serve run` shuts Serve down on KeyboardInterrupt


def drain_apps(poll_s: float = 0.5) -> None:
    """Before Serve shuts down: every app's ingress stops taking new requests, then in-flight ones finish
    (each ingress says how long they may take). Serve's own shutdown would stop the proxy at once and
    cut them off; its replicas' graceful_shutdown_timeout_s covers a replica stopped on its own
    (an upgrade, a downscale)."""
    import time

    from ray import serve

    try:
        names = list(serve.status().applications)
    except Exception:
        return
    deadline, handles, inflight = time.monotonic(), [], 0
    for name in names:
        try:
            handle = serve.get_app_handle(name)
            grace = handle.drain.remote().result(timeout_s=30)
            inflight += handle.inflight.remote().result(timeout_s=30)
        except Exception:  # not ours, or gone
            continue
        handles.append(handle)
        deadline = max(deadline, time.monotonic() + float(grace))
    print(f"serve_app: draining {len(handles)} app(s) before shutdown, {inflight} image(s) in flight", file=sys.stderr, flush=True)
    for handle in handles:
        while time.monotonic() < deadline:
            try:
                if handle.inflight.remote().result(timeout_s=30) == 0:
                    break
            except Exception:
                break
            time.sleep(poll_s)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    config = next((a for a in argv if a.endswith((".yaml", ".yml"))), None)
    metrics_port = None
    if config is not None:
        check_port_free(*http_address(config))
        metrics_port = metrics_export_port(config)
    os.environ["SERVE_SOCKET_REUSE_PORT_ENABLED"] = "0"  # inherited by the local cluster's proxy
    from serve_app.request_ids import PROXY_ENV

    os.environ.update(PROXY_ENV)  # the local cluster's proxy checks clients' X-Request-Id (serve_app/request_ids.py)
    import ray

    # ray.init installs SIGTERM handlers of its own (exit, or tear the local node down at once); ours
    # goes in after it, so that SIGTERM takes serve run's Ctrl-C path: serve.shutdown(), which drains.
    ray_init = ray.init

    def init_then_drain_on_sigterm(*args, **kwargs):
        starts_local = not (kwargs.get("address") or (args[0] if args else None) or os.environ.get("RAY_ADDRESS"))
        if metrics_port is not None and starts_local:  # a cluster's nodes set theirs: ray start --metrics-export-port
            kwargs.setdefault("_metrics_export_port", metrics_port)
        out = ray_init(*args, **kwargs)
        signal.signal(signal.SIGTERM, _sigterm)
        return out

    ray.init = init_then_drain_on_sigterm
    from ray import serve

    shutdown = serve.shutdown

    def drain_then_shutdown(*args, **kwargs):  # serve run calls serve.shutdown() on KeyboardInterrupt
        drain_apps()
        return shutdown(*args, **kwargs)

    serve.shutdown = drain_then_shutdown
    signal.signal(signal.SIGTERM, _sigterm)
    from ray.serve.scripts import cli

    cli.main(args=["run", *argv], prog_name="serve run")


if __name__ == "__main__":
    main()
