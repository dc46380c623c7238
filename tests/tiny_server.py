"""One local Ray and one Serve instance for every test file that talks to the tiny app over HTTP.

Starting Ray and deploying the app's four replicas is most of what those files cost on a 2-core CI
machine, so they share: the tiny app with `ROOT_ARGS` at "/" (name "z-image"), and any app a file needs
with other settings deployed next to it under its own route prefix (`TinyServe.app`) and deleted after.
Files that need a Ray of their own (fake GPUs, several nodes) ask for the `own_ray` fixture, which stops
this one first; tests/conftest.py runs the files that share it before those.
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

import httpx

# TINY_SERVER_PORT / TINY_SERVER_METRICS_PORT: for test sessions that run side by side on one machine
# (Serve's proxy binds with SO_REUSEPORT: two sessions on one port would answer each other's requests)
PORT = int(os.environ.get("TINY_SERVER_PORT", 18321))
METRICS_PORT = int(os.environ.get("TINY_SERVER_METRICS_PORT", 19321))  # Ray's Prometheus endpoint (tests/test_ops.py reads it)
BASE = f"http://127.0.0.1:{PORT}"
ROOT = Path(__file__).resolve().parents[1]


DEPLOYMENT_SECTIONS = ("text_encoder_deployment", "denoiser_deployment", "vae_deployment", "ingress_deployment")


def quick_drain(args: dict) -> dict:
    """Set every deployment's graceful_shutdown_wait_loop_s to 0.1 in `args` (in place) and return it.

    Serve's replica, told to stop, sleeps this long before it first counts its ongoing requests (default
    2 s): every app deletion, upgrade and replica replacement in the tests waited that out per replica.
    """
    for section in DEPLOYMENT_SECTIONS:
        args.setdefault(section, {})["graceful_shutdown_wait_loop_s"] = 0.1
    return args


def tiny_args(tiny_dir, **overrides) -> dict:
    """The root app's settings, with `overrides` merged into its sections."""
    args = {
        "model": {"source": "tiny", "device": "cpu", "tiny_dir": str(tiny_dir)},
        "server": {"max_size": 1024, "default_size": "64x64", "max_inflight_images": 8, "request_timeout_s": 120,
                   # small limits, so that the reliability and upload tests reach them with small bodies
                   "max_body_bytes": 65536, "max_upload_bytes": 150_000, "max_upload_pixels": 1_000_000},
        "text_encoder_deployment": {"ray_actor_options": {"num_cpus": 0.1}, "max_batch_size": 8, "batch_wait_timeout_s": 0.05},
        "denoiser_deployment": {
            "ray_actor_options": {"num_cpus": 0.1}, "max_batch_size": 4, "batch_wait_timeout_s": 0.3, "max_ongoing_requests": 4, "max_queued_requests": 32,
        },
        "vae_deployment": {"ray_actor_options": {"num_cpus": 0.1}, "max_batch_size": 4},
        "ingress_deployment": {"ray_actor_options": {"num_cpus": 0.1}, "max_ongoing_requests": 64, "max_queued_requests": 64},
    }
    for key, value in overrides.items():
        args.setdefault(key, {}).update(value)
    return quick_drain(args)


def wait_until(cond, timeout: float, what: str) -> None:
    """Poll `cond` until it is true; the deadline only guards against a hang."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if cond():
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"never: {what}")


ROOT_APP = "z-image"
STAGE_NAMES = ("TextEncoder", "Denoiser", "VaeDecoder")


def build_sharing(args: dict, shared: tuple[str, ...] = ()):
    """`serve_app.app.build_app(args)`, except that the stages named in `shared` are the root app's
    (handles to its deployments) instead of replicas of this app's own: a test of one stage's settings
    starts that stage and an ingress, not four replicas. A shared stage's section of `args` must be the
    root app's (the ingress validates requests with it)."""
    from ray import serve

    from serve_app.app import bind_app
    from serve_app.config import AppConfig

    assert set(shared) <= set(STAGE_NAMES), shared
    return bind_app(AppConfig.model_validate(args), {n: serve.get_deployment_handle(n, app_name=ROOT_APP) for n in shared})


class TinyServe:
    """The shared instance: started on first use, stopped by `stop()` (own_ray, or the session's end)."""

    def __init__(self):
        self.running = False
        self.root_dir: str | None = None

    def start(self) -> None:
        if self.running:
            return
        import ray
        from ray import serve

        # short autoscaling metric intervals, so that scaling is observable in seconds (tests/test_serving.py)
        os.environ["RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S"] = "0.5"
        os.environ["RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S"] = "0.5"
        # Serve's controller checks every replica and app 10 times a second by default: a twentieth of a
        # core for the whole session on a 2-core runner; twice a second is soon enough for these tests
        os.environ["RAY_SERVE_CONTROL_LOOP_INTERVAL_S"] = "0.5"
        from serve_app.request_ids import PROXY_ENV

        os.environ.update(PROXY_ENV)  # the proxy checks clients' X-Request-Id (serve_app/request_ids.py)
        # metrics reported every second instead of Ray's 10 s, so tests read them sooner
        ray.init(num_cpus=4, include_dashboard=False, runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}},
                 _metrics_export_port=METRICS_PORT, _system_config={"metrics_report_interval_ms": 1000})
        serve.start(http_options={"host": "127.0.0.1", "port": PORT})
        self.running = True

    def root(self, tiny_dir) -> str:
        """The root app ("z-image" at "/"), deployed once and ready; returns its base URL."""
        self.start()
        if self.root_dir != str(tiny_dir):
            self.deploy(ROOT_APP, "/", tiny_args(tiny_dir))
            self.root_dir = str(tiny_dir)
        return BASE

    def deploy(self, name: str, prefix: str, args: dict, ready: str = "/health/ready", timeout: float = 300,
               shared: tuple[str, ...] = ()) -> str:
        """Deploy (or redeploy) app `name` at `prefix` and wait until it is ready; `shared`: stages taken
        from the root app (`build_sharing`)."""
        from ray import serve

        self.start()
        serve.run(build_sharing(args, shared), name=name, route_prefix=prefix, blocking=False)
        base = BASE + prefix.rstrip("/")
        wait_until(lambda: httpx.get(base + ready, timeout=30).status_code == 200, timeout, f"{name} ready")
        return base

    @contextlib.contextmanager
    def app(self, name: str, args: dict, shared: tuple[str, ...] = (), **kwargs):
        """An app of a test file's own next to the root one, at /<name>; deleted afterwards. `shared`:
        stages taken from the root app (`build_sharing`)."""
        from ray import serve

        try:
            yield self.deploy(name, f"/{name}", args, shared=shared, **kwargs)
        finally:
            serve.delete(name)

    def front_door(self, name: str, args: dict):
        """An ingress of its own at /<name> over all three of the root app's stages, for a file that tests
        ingress settings (`server`, `ingress_deployment`): one replica to start instead of four."""
        return self.app(name, args, shared=STAGE_NAMES)

    def stop(self) -> None:
        if not self.running:
            return
        import ray
        from ray import serve

        serve.shutdown()
        ray.shutdown()
        self.running, self.root_dir = False, None


SHARED = TinyServe()
