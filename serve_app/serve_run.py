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


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    config = next((a for a in argv if a.endswith((".yaml", ".yml"))), None)
    if config is not None:
        check_port_free(*http_address(config))
    os.environ["SERVE_SOCKET_REUSE_PORT_ENABLED"] = "0"  # inherited by the local cluster's proxy
    signal.signal(signal.SIGTERM, _sigterm)
    from ray.serve.scripts import cli

    cli.main(args=["run", *argv], prog_name="serve run")


if __name__ == "__main__":
    main()
