"""Prometheus metrics of every stage, through Ray Serve's metrics API (`ray.serve.metrics`).

Ray exports them on each node's metrics endpoint (`ray start --metrics-export-port`, or
`ray.init(_metrics_export_port=...)`; `serve_app.serve_run` sets it from `server.metrics_export_port`),
prefixed `ray_`, with Serve's own tags added (`application`, `deployment`, `replica`). The names, as
scraped (counters get `_total`, histograms `_bucket` / `_sum` / `_count`):

| metric | tags | what |
| --- | --- | --- |
| `ray_zimage_requests_total` | route, status | HTTP requests answered, by route and status code |
| `ray_zimage_images_total` | route | images returned |
| `ray_zimage_latency_seconds` | stage | per image: queue, text_encoder, denoiser, vae, encode, total |
| `ray_zimage_inflight_images` | | images admitted by an ingress replica and not yet answered |
| `ray_zimage_dit_queued_requests` | | DiT requests waiting for a batch |
| `ray_zimage_dit_batch_size` | | requests per DiT batch |
| `ray_zimage_dit_forwards_total` | batch_size | DiT forwards, by the batch size they ran at |
| `ray_zimage_stage_batches_total` | stage | batches a stage ran (text_encoder, denoiser, vae_decode, vae_encode) |
| `ray_zimage_gpu_memory_in_use_bytes`, `ray_zimage_gpu_memory_peak_bytes` | stage | GPU memory of the stage's process (peak since it became ready); GPU stages only |
| `ray_zimage_compiles_while_serving_total` | stage | torch.compile work on the request path (0 once warm) |

A size-routed app's DiT deployments (`denoiser_routes`) report apart through Serve's `deployment` tag
(`Denoiser`, `Denoiser-<name>`).

Tests (tests/test_metrics.py) read these names from the endpoint; k8s/grafana-dashboard.json is built on them.
"""

from __future__ import annotations

import threading

# Every metric as Prometheus names it (Ray adds `ray_`; counters `_total`; histograms `_bucket/_sum/_count`)
METRIC_NAMES = {
    "ray_zimage_requests_total": "counter", "ray_zimage_images_total": "counter", "ray_zimage_latency_seconds": "histogram",
    "ray_zimage_inflight_images": "gauge", "ray_zimage_dit_queued_requests": "gauge", "ray_zimage_dit_batch_size": "histogram",
    "ray_zimage_dit_forwards_total": "counter", "ray_zimage_stage_batches_total": "counter",
    "ray_zimage_gpu_memory_in_use_bytes": "gauge", "ray_zimage_gpu_memory_peak_bytes": "gauge",
    "ray_zimage_compiles_while_serving_total": "counter",
}

# seconds: from a 64² CPU image to a 2K GPU batch under load
LATENCY_BOUNDARIES = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0]
BATCH_BOUNDARIES = [1, 2, 3, 4, 6, 8, 12, 16, 32]
LATENCY_STAGES = ("queue", "text_encoder", "denoiser", "vae", "encode", "total")


def _metrics():
    from ray.serve import metrics

    return metrics


class IngressMetrics:
    """The ingress's: requests by route and status, images, per-stage latency, images in flight."""

    def __init__(self):
        m = _metrics()
        self.requests = m.Counter("zimage_requests", "HTTP requests answered, by route and status code", tag_keys=("route", "status"))
        self.images = m.Counter("zimage_images", "images returned", tag_keys=("route",))
        self.latency = m.Histogram("zimage_latency_seconds", "per image, seconds in each stage (queue: waiting between stages)",
                                   boundaries=LATENCY_BOUNDARIES, tag_keys=("stage",))
        self.inflight = m.Gauge("zimage_inflight_images", "images admitted and not yet answered")
        self.inflight.set(0)

    def request(self, route: str, status: int) -> None:
        self.requests.inc(1, tags={"route": route, "status": str(status)})

    def image_timings(self, route: str, timings: list[dict]) -> None:
        """One observation per image and stage, from the `timings` each `data[]` item carries."""
        for t in timings:
            for stage in LATENCY_STAGES:
                value = t.get(f"{stage}_s")
                if value is not None:
                    self.latency.observe(float(value), tags={"stage": stage})
        if timings:
            self.images.inc(len(timings), tags={"route": route})


class StageMetrics:
    """A model stage's: batches, GPU memory, compiles while serving; the DiT's batch sizes, forwards and queue."""

    def __init__(self, stage: str):
        m = _metrics()
        self.stage = stage
        self._lock = threading.Lock()
        self.batches = m.Counter("zimage_stage_batches", "batches a stage ran", tag_keys=("stage",))
        self.memory_in_use = m.Gauge("zimage_gpu_memory_in_use_bytes", "GPU memory allocated by the stage's process", tag_keys=("stage",))
        self.memory_peak = m.Gauge("zimage_gpu_memory_peak_bytes", "peak GPU memory of the stage's process since it became ready",
                                   tag_keys=("stage",))
        self.compiles = m.Counter("zimage_compiles_while_serving", "torch.compile work on the request path", tag_keys=("stage",))
        self._compiles_seen = 0

    def batch(self, kind: str, snapshot_memory: tuple[int, int] | None, compiles_while_serving: int) -> None:
        """After a batch: count it, publish the process's GPU memory, and any compile it caused."""
        self.batches.inc(1, tags={"stage": kind})
        if snapshot_memory is not None:
            in_use, peak = snapshot_memory
            self.memory_in_use.set(in_use, tags={"stage": self.stage})
            self.memory_peak.set(peak, tags={"stage": self.stage})
        with self._lock:
            new = compiles_while_serving - self._compiles_seen
            self._compiles_seen = max(compiles_while_serving, self._compiles_seen)
        if new > 0:
            self.compiles.inc(new, tags={"stage": self.stage})


class DenoiserMetrics:
    """The DiT's batch sizes, forwards by batch size and queued requests."""

    def __init__(self):
        m = _metrics()
        self.batch_size = m.Histogram("zimage_dit_batch_size", "requests per DiT batch", boundaries=BATCH_BOUNDARIES)
        self.forwards = m.Counter("zimage_dit_forwards", "DiT forwards, by the batch size they ran at", tag_keys=("batch_size",))
        self.queued = m.Gauge("zimage_dit_queued_requests", "DiT requests waiting for a batch")
        self.queued.set(0)
        self._forwards_seen: dict[str, int] = {}

    def batch(self, size: int, forward_batch_sizes: dict[str, int]) -> None:
        """`forward_batch_sizes`: the engine's running count of forwards per batch size; the increase since
        the last call is what this batch ran."""
        self.batch_size.observe(size)
        for key, count in forward_batch_sizes.items():
            new = count - self._forwards_seen.get(key, 0)
            if new > 0:
                self.forwards.inc(new, tags={"batch_size": str(key)})
            self._forwards_seen[key] = count
