#!/usr/bin/env python3
"""Render the KubeRay RayService manifests under k8s/<variant>/ from one template and a `serve run`
config, so that a RayService's `serveConfigV2` is always exactly the config file it names.

    python k8s/generate.py            # (re)write k8s/base/*, k8s/<variant>/*
    python k8s/generate.py --check    # exit 1, with a diff, if a committed file differs

Variants (VARIANTS below): `nvidia` (configs/z-image-turbo.yaml on 1-GPU H100 pods), `amd`
(k8s/configs/z-image-turbo-amd.yaml on 1-GPU MI300X pods), `mixed` (k8s/configs/z-image-turbo-mixed.yaml:
text encoder + VAE on MI300X, sequence-parallel DiT on 2-GPU H100 pods). Apply one with
`k8s/apply.sh VARIANT` (= `kubectl apply -k k8s/VARIANT`).

Only the standard library and PyYAML are needed; the collective environment of each vendor comes
from serve_app/engines/platform.py (stdlib-only at import), the same table the engines use.
"""

from __future__ import annotations

import argparse
import difflib
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

K8S = Path(__file__).resolve().parent
ROOT = K8S.parent
sys.path.insert(0, str(ROOT))

RAY_VERSION = "2.60.0"
# Images: built from k8s/images/Dockerfile.{cuda,rocm} (our package and its pinned deps on top of a
# Ray 2.60 / Python 3.12 base; every node of one Ray cluster must run the same Ray and Python).
# The names below are what `docker build -t ...` in k8s/README.md produces; point them at your
# registry with kustomize (`images:` in k8s/<variant>/kustomization.yaml) or SERVE_APP_IMAGE_* for apply.sh.
IMAGES = {"nvidia": "serve-app-cuda:0.1.0", "amd": "serve-app-rocm:0.1.0"}
MODEL_ID = "Tongyi-MAI/Z-Image-Turbo"
HF_HOME = "/models/hf"
# torch.compile's kernels on the PVC too, so a pod the autoscaler adds loads them instead of compiling
# (serve_app/engines/compile_cache.py; Inductor keys its entries by GPU and versions, so chips can share it)
INDUCTOR_CACHE = "/models/inductor-cache"
PVC_NAME = "z-image-model-cache"
SERVE_PORT = 8000
METRICS_PORT = 8080  # Ray's Prometheus endpoint on every pod (serve_app/metrics.py); k8s/monitoring scrapes it
# The API keys (serve_app/api_keys.py): a Secret that k8s/apply.sh creates with a random key if it is absent
API_KEYS_SECRET, API_KEYS_ENV = "z-image-api-keys", "SERVE_APP_API_KEYS"
GPU_RESOURCE = {"nvidia": "nvidia.com/gpu", "amd": "amd.com/gpu"}
# Taints GPU node pools commonly carry (GPU Operator / AMD GPU Operator); tolerating a taint that is
# absent is harmless.
TOLERATIONS = {
    "nvidia": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
    "amd": [{"key": "amd.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
}


@dataclass(frozen=True)
class WorkerGroup:
    name: str
    vendor: str  # nvidia | amd
    accelerator_type: str  # Ray's accelerator type: "H100", "AMD-Instinct-MI300X-OAM"
    gpus: int  # per pod: a whole SP group must fit in one pod (STRICT_PACK)
    cpus: int
    memory: str
    min_replicas: int
    max_replicas: int
    # Kubernetes node labels that pick the chip: NVIDIA GPU Feature Discovery's product label, the
    # AMD node labeller's PCI device id (74a1 = MI300X OAM, as in Ray's amd_product_dict). Remove if
    # the cluster has one GPU type per vendor and no labeller.
    node_selector: tuple[tuple[str, str], ...] = ()
    object_store_bytes: int = 8 * 1024**3
    shm: str = "10Gi"


@dataclass(frozen=True)
class Variant:
    name: str
    config: str  # relative to the repository root
    head_vendor: str  # which image the (GPU-less) head runs: it imports serve_app to build the app
    groups: tuple[WorkerGroup, ...]
    description: str


H100_SELECTOR = (("nvidia.com/gpu.product", "NVIDIA-H100-80GB-HBM3"),)
MI300X_SELECTOR = (("amd.com/gpu.device-id", "74a1"),)

VARIANTS = {
    v.name: v
    for v in (
        Variant(
            name="nvidia",
            config="configs/z-image-turbo.yaml",
            head_vendor="nvidia",
            groups=(WorkerGroup("h100-1gpu", "nvidia", "H100", gpus=1, cpus=8, memory="96Gi", min_replicas=1, max_replicas=4,
                                node_selector=H100_SELECTOR),),
            description="Z-Image-Turbo, the three stages sharing one H100 per pod (configs/z-image-turbo.yaml)",
        ),
        Variant(
            name="amd",
            config="k8s/configs/z-image-turbo-amd.yaml",
            head_vendor="amd",
            groups=(WorkerGroup("mi300x-1gpu", "amd", "AMD-Instinct-MI300X-OAM", gpus=1, cpus=8, memory="96Gi",
                                min_replicas=1, max_replicas=4, node_selector=MI300X_SELECTOR),),
            description="Z-Image-Turbo on AMD Instinct MI300X, DiT autoscaled 1-4 (k8s/configs/z-image-turbo-amd.yaml)",
        ),
        Variant(
            name="mixed",
            config="k8s/configs/z-image-turbo-mixed.yaml",
            head_vendor="nvidia",
            groups=(
                WorkerGroup("mi300x-1gpu", "amd", "AMD-Instinct-MI300X-OAM", gpus=1, cpus=8, memory="64Gi",
                            min_replicas=1, max_replicas=2, node_selector=MI300X_SELECTOR),
                WorkerGroup("h100-2gpu", "nvidia", "H100", gpus=2, cpus=16, memory="160Gi", min_replicas=1, max_replicas=3,
                            node_selector=H100_SELECTOR, object_store_bytes=12 * 1024**3, shm="14Gi"),
            ),
            description="text encoder + VAE on MI300X, SP2 DiT on 2-GPU H100 pods (k8s/configs/z-image-turbo-mixed.yaml)",
        ),
    )
}

# The SP2 configuration of the main configs/ set, once it exists: the DiT over 2 H100s of one pod.
if (ROOT / "configs/z-image-turbo-sp2.yaml").exists():
    VARIANTS["nvidia-sp2"] = Variant(
        name="nvidia-sp2",
        config="configs/z-image-turbo-sp2.yaml",
        head_vendor="nvidia",
        groups=(WorkerGroup("h100-2gpu", "nvidia", "H100", gpus=2, cpus=16, memory="160Gi", min_replicas=1, max_replicas=4,
                            node_selector=H100_SELECTOR, object_store_bytes=12 * 1024**3, shm="14Gi"),),
        description="Z-Image-Turbo with a sequence-parallel DiT over the 2 H100s of one pod (configs/z-image-turbo-sp2.yaml)",
    )


# ---------------------------------------------------------------------------------------------------


def vendor_env(vendor: str) -> list[dict]:
    """The collective / runtime environment serve_app.engines.platform chooses for the vendor."""
    from types import SimpleNamespace

    from serve_app.engines.platform import TorchInfo, choose_engine_settings, detect_platform

    platform = detect_platform(torch_info=TorchInfo(vendor=vendor, capability=(9, 0) if vendor == "nvidia" else None))
    settings = choose_engine_settings(platform, SimpleNamespace(attention_backend=None, fp8=False, compile=False),
                                      importable=lambda name: False, diffusers_backends={"native"})
    return [{"name": k, "value": v} for k, v in sorted(settings.collective_env.items())]


def serve_config_text(config_path: Path) -> str:
    """serveConfigV2: the config file's content (comments dropped), keys in file order."""
    data = yaml.safe_load(config_path.read_text())
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=False, width=1000)


def _ray_resources_param(resources: dict) -> str:
    # KubeRay's documented form for rayStartParams.resources: '"{\"Custom\": 1}"' (a quoted, escaped
    # JSON object); Ray's KubeRay autoscaler parses exactly that (autoscaling_config._get_custom_resources).
    return '"' + json.dumps(resources).replace('"', '\\"') + '"'


def _common_env() -> list[dict]:
    from serve_app.request_ids import PROXY_ENV

    return [
        {"name": "HF_HOME", "value": HF_HOME},
        # weights were put on the PVC by the model-download Job; replicas never download
        {"name": "HF_HUB_OFFLINE", "value": "1"},
        {"name": "RAY_USAGE_STATS_ENABLED", "value": "0"},
        {"name": "TOKENIZERS_PARALLELISM", "value": "false"},
        # every node's Serve proxy checks clients' X-Request-Id (serve_app/request_ids.py)
        *({"name": k, "value": v} for k, v in PROXY_ENV.items()),
        # the ingress's API keys (the configs set server.require_api_keys): from the Secret, never the manifest
        {"name": API_KEYS_ENV, "valueFrom": {"secretKeyRef": {"name": API_KEYS_SECRET, "key": "keys"}}},
    ]


def _readiness_probe() -> dict:
    # Worker pods join the serve Service only when the app answers GET /health/ready with 200: every
    # stage has a RUNNING replica (loaded, warmed, passing its health check) and one warm-up generation
    # went through; answered from published state, so a loaded pod stays ready (serve_app/health.py). The probe keeps KubeRay's default checks (raylet health and the
    # node's Serve proxy), which a custom probe replaces. Not on the head: KubeRay submits
    # serveConfigV2 only once the head pod is Ready, so the head keeps KubeRay's own probe.
    cmd = (
        "wget -T 2 -q -O- http://localhost:52365/api/local_raylet_healthz | grep success"
        f" && wget -T 2 -q -O- http://localhost:{SERVE_PORT}/-/healthz | grep success"
        f" && wget -T 5 -q -O /dev/null http://localhost:{SERVE_PORT}/health/ready"
    )
    return {
        "exec": {"command": ["bash", "-c", cmd]},
        "initialDelaySeconds": 30,
        "periodSeconds": 10,
        "timeoutSeconds": 10,
        "failureThreshold": 6,
        "successThreshold": 1,
    }


def _liveness_probe() -> dict:
    # Restart a pod only when its raylet is gone or the app's ingress no longer answers at all
    # (/health/live touches no stage); a pod that is merely busy or still loading is not restarted.
    cmd = (
        "wget -T 2 -q -O- http://localhost:52365/api/local_raylet_healthz | grep success"
        f" && wget -T 5 -q -O /dev/null http://localhost:{SERVE_PORT}/health/live"
    )
    return {
        "exec": {"command": ["bash", "-c", cmd]},
        "initialDelaySeconds": 600,  # the first start loads and warms (compiles) every stage
        "periodSeconds": 20,
        "timeoutSeconds": 10,
        "failureThreshold": 6,
        "successThreshold": 1,
    }


# A deleted pod (downscale, RayService upgrade) gets SIGTERM; Serve's replicas then finish in-flight work
# within graceful_shutdown_timeout_s (serve_app/config.py: server.request_timeout_s, default 300 s; the
# ingress 10 s more), so the pod must be given longer than that before SIGKILL.
TERMINATION_GRACE_S = 330


def _volumes(shm: str) -> list[dict]:
    return [
        {"name": "model-cache", "persistentVolumeClaim": {"claimName": PVC_NAME}},
        # Ray's object store lives in /dev/shm; the container default (64 MiB) would push it to disk.
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": shm}},
    ]


def _mounts() -> list[dict]:
    return [{"name": "model-cache", "mountPath": "/models"}, {"name": "dshm", "mountPath": "/dev/shm"}]


def head_group(variant: Variant) -> dict:
    res = {"cpu": "4", "memory": "16Gi"}
    return {
        # num-cpus 0: no Serve replica lands on the GPU-less head (the Serve controller and proxy need
        # no CPU reservation and still run there).
        # dashboard-host 0.0.0.0: KubeRay submits serveConfigV2 through the head's dashboard; with
        # authOptions (token) it and every Ray API need the cluster's token (a Secret KubeRay creates).
        "rayStartParams": {"num-cpus": "0", "dashboard-host": "0.0.0.0", "metrics-export-port": str(METRICS_PORT)},
        "template": {
            "metadata": {"labels": {"app.kubernetes.io/name": "serve-app", "app.kubernetes.io/component": "ray-head"}},
            "spec": {
                "containers": [
                    {
                        "name": "ray-head",
                        "image": IMAGES[variant.head_vendor],
                        "imagePullPolicy": "IfNotPresent",
                        "ports": [
                            {"containerPort": 6379, "name": "gcs-server"},
                            {"containerPort": 8265, "name": "dashboard"},
                            {"containerPort": 10001, "name": "client"},
                            {"containerPort": SERVE_PORT, "name": "serve"},
                            {"containerPort": METRICS_PORT, "name": "metrics"},
                        ],
                        "env": _common_env(),
                        "resources": {"requests": dict(res), "limits": dict(res)},
                        "volumeMounts": [{"name": "dshm", "mountPath": "/dev/shm"}],
                    }
                ],
                "volumes": [{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "2Gi"}}],
            },
        },
    }


def worker_group(group: WorkerGroup) -> dict:
    gpu_key = GPU_RESOURCE[group.vendor]
    res = {"cpu": str(group.cpus), "memory": group.memory, gpu_key: str(group.gpus)}
    spec: dict = {
        "containers": [
            {
                "name": "ray-worker",
                "image": IMAGES[group.vendor],
                "imagePullPolicy": "IfNotPresent",
                "ports": [{"containerPort": SERVE_PORT, "name": "serve"}, {"containerPort": METRICS_PORT, "name": "metrics"}],
                "env": _common_env() + [{"name": "TORCHINDUCTOR_CACHE_DIR", "value": INDUCTOR_CACHE}] + vendor_env(group.vendor),
                "resources": {"requests": dict(res), "limits": dict(res)},
                "readinessProbe": _readiness_probe(),
                "livenessProbe": _liveness_probe(),
                "volumeMounts": _mounts(),
            }
        ],
        "terminationGracePeriodSeconds": TERMINATION_GRACE_S,
        "volumes": _volumes(group.shm),
        "tolerations": TOLERATIONS[group.vendor],
    }
    if group.node_selector:
        spec["nodeSelector"] = dict(group.node_selector)
    return {
        "groupName": group.name,
        "replicas": group.min_replicas,
        "minReplicas": group.min_replicas,
        "maxReplicas": group.max_replicas,
        "rayStartParams": {
            # explicit GPU count (KubeRay derives it from nvidia.com/gpu only) and the accelerator
            # resource, so that the autoscaler knows which group serves `accelerator_type:X` demand
            # before any pod of it exists (Ray sets the same resource itself once the node starts).
            "num-gpus": str(group.gpus),
            "resources": _ray_resources_param({f"accelerator_type:{group.accelerator_type}": 1}),
            "object-store-memory": str(group.object_store_bytes),
            "metrics-export-port": str(METRICS_PORT),
        },
        # Ray node labels (KubeRay >= 1.5): label selectors and the autoscaler see the chip and vendor.
        "labels": {"ray.io/accelerator-type": group.accelerator_type, "gpu-vendor": group.vendor},
        "template": {
            "metadata": {"labels": {"app.kubernetes.io/name": "serve-app", "app.kubernetes.io/component": f"ray-worker-{group.name}"}},
            "spec": spec,
        },
    }


def rayservice(variant: Variant) -> dict:
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayService",
        "metadata": {
            "name": "z-image",
            "labels": {"app.kubernetes.io/name": "serve-app", "app.kubernetes.io/part-of": "z-image",
                       "serve-app/variant": variant.name},
            "annotations": {"serve-app/config": variant.config},
        },
        "spec": {
            # GPU pods take minutes to pull, load 33 GB of weights and compile: be patient before
            # KubeRay declares the app unhealthy and rebuilds the cluster.
            "serviceUnhealthySecondThreshold": 1800,
            "deploymentUnhealthySecondThreshold": 1800,
            "excludeHeadPodFromServeSvc": True,
            "serveConfigV2": serve_config_text(ROOT / variant.config),
            "rayClusterConfig": {
                "rayVersion": RAY_VERSION,
                # Ray's token authentication (Ray >= 2.52, KubeRay >= 1.5.1): KubeRay generates the token into
                # a Secret and sets RAY_AUTH_MODE / RAY_AUTH_TOKEN on every Ray container
                "authOptions": {"mode": "token"},
                "enableInTreeAutoscaling": True,
                "autoscalerOptions": {
                    "version": "v2",
                    "upscalingMode": "Default",
                    "idleTimeoutSeconds": 600,
                    "resources": {"requests": {"cpu": "500m", "memory": "1Gi"}, "limits": {"cpu": "1", "memory": "2Gi"}},
                },
                "headGroupSpec": head_group(variant),
                "workerGroupSpecs": [worker_group(g) for g in variant.groups],
            },
        },
    }


def model_cache_pvc() -> dict:
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {"name": PVC_NAME, "labels": {"app.kubernetes.io/name": "serve-app"}},
        "spec": {
            # Every GPU pod mounts it: needs a ReadWriteMany class (NFS, CephFS, EFS, Filestore,
            # Azure Files...). Set storageClassName to yours; the weights take about 33 GB.
            "accessModes": ["ReadWriteMany"],
            "resources": {"requests": {"storage": "100Gi"}},
        },
    }


def model_download_job() -> dict:
    script = (
        "pip install --no-cache-dir -q 'huggingface_hub>=0.34' && "
        "python -c \"import os; from huggingface_hub import snapshot_download; "
        f"print(snapshot_download('{MODEL_ID}', token=os.environ.get('HF_TOKEN') or None))\""
    )
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": "z-image-model-download", "labels": {"app.kubernetes.io/name": "serve-app"}},
        "spec": {
            "backoffLimit": 4,
            "ttlSecondsAfterFinished": 86400,
            "template": {
                "metadata": {"labels": {"app.kubernetes.io/name": "serve-app", "app.kubernetes.io/component": "model-download"}},
                "spec": {
                    "restartPolicy": "OnFailure",
                    "containers": [
                        {
                            "name": "download",
                            "image": "python:3.12-slim",
                            "command": ["bash", "-c", script],
                            "env": [
                                {"name": "HF_HOME", "value": HF_HOME},
                                {"name": "HF_HUB_ENABLE_HF_TRANSFER", "value": "0"},
                                # optional: a token for gated or rate-limited downloads
                                {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf-token", "key": "token", "optional": True}}},
                            ],
                            "resources": {"requests": {"cpu": "1", "memory": "2Gi"}, "limits": {"cpu": "2", "memory": "4Gi"}},
                            "volumeMounts": [{"name": "model-cache", "mountPath": "/models"}],
                        }
                    ],
                    "volumes": [{"name": "model-cache", "persistentVolumeClaim": {"claimName": PVC_NAME}}],
                },
            },
        },
    }


# --- monitoring: a PodMonitor for the Prometheus Operator and a Grafana dashboard on our metric names ------


def pod_monitor() -> dict:
    # Ray's metrics endpoint of every pod (head: Serve controller and proxy; workers: the replicas, whose
    # ray_zimage_* metrics serve_app/metrics.py defines), port `metrics`
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PodMonitor",
        "metadata": {"name": "z-image", "labels": {"app.kubernetes.io/name": "serve-app", "release": "prometheus"}},
        "spec": {
            "selector": {"matchLabels": {"app.kubernetes.io/name": "serve-app"}},
            "podMetricsEndpoints": [{"port": "metrics", "path": "/metrics", "interval": "15s"}],
        },
    }


def _panel(i: int, title: str, exprs: list[tuple[str, str]], unit: str = "short") -> dict:
    return {
        "id": i + 1, "type": "timeseries", "title": title, "datasource": {"type": "prometheus", "uid": "${datasource}"},
        "gridPos": {"h": 8, "w": 12, "x": 12 * (i % 2), "y": 8 * (i // 2)},
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "targets": [{"refId": chr(65 + j), "expr": e, "legendFormat": legend} for j, (e, legend) in enumerate(exprs)],
    }


def grafana_dashboard() -> dict:
    """Built on serve_app/metrics.py's names (tests/test_k8s.py checks every query names only those and
    that every one is shown)."""
    q = "histogram_quantile({p}, sum by (le, stage) (rate(ray_zimage_latency_seconds_bucket[5m])))"
    panels = [
        ("Requests / s by route and status", [("sum by (route, status) (rate(ray_zimage_requests_total[1m]))", "{{route}} {{status}}")], "reqps"),
        ("Images / s", [("sum by (route) (rate(ray_zimage_images_total[1m]))", "{{route}}")], "short"),
        ("Latency p50 by stage", [(q.format(p=0.5), "{{stage}}")], "s"),
        ("Latency p95 by stage", [(q.format(p=0.95), "{{stage}}")], "s"),
        ("In flight and queued", [("sum(ray_zimage_inflight_images)", "images in flight (ingress)"),
                                  ("sum(ray_zimage_dit_queued_requests)", "DiT requests queued")], "short"),
        ("DiT batch size (mean) and forwards / s by batch size",
         [("sum(rate(ray_zimage_dit_batch_size_sum[5m])) / sum(rate(ray_zimage_dit_batch_size_count[5m]))", "mean batch"),
          ("sum by (batch_size) (rate(ray_zimage_dit_forwards_total[5m]))", "forwards at batch {{batch_size}}")], "short"),
        ("Stage batches / s", [("sum by (stage) (rate(ray_zimage_stage_batches_total[1m]))", "{{stage}}")], "short"),
        ("GPU memory by stage and replica", [("max by (stage, replica) (ray_zimage_gpu_memory_in_use_bytes)", "in use {{stage}} {{replica}}"),
                                             ("max by (stage, replica) (ray_zimage_gpu_memory_peak_bytes)", "peak {{stage}} {{replica}}")], "bytes"),
        ("torch.compile while serving (should stay 0)", [("sum by (stage) (increase(ray_zimage_compiles_while_serving_total[1h]))", "{{stage}}")], "short"),
        ("Error ratio (4xx, 5xx)", [('sum(rate(ray_zimage_requests_total{status=~"4.."}[5m])) / sum(rate(ray_zimage_requests_total[5m]))', "4xx"),
                                    ('sum(rate(ray_zimage_requests_total{status=~"5.."}[5m])) / sum(rate(ray_zimage_requests_total[5m]))', "5xx")],
         "percentunit"),
    ]
    return {
        "title": "Z-Image-Turbo on Ray Serve", "uid": "z-image-serve", "schemaVersion": 39, "version": 1, "editable": True,
        "time": {"from": "now-1h", "to": "now"}, "refresh": "30s", "tags": ["serve-app", "ray-serve"],
        "templating": {"list": [{"name": "datasource", "type": "datasource", "query": "prometheus", "label": "Prometheus"}]},
        "panels": [_panel(i, title, exprs, unit) for i, (title, exprs, unit) in enumerate(panels)],
    }


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (serveConfigV2, scripts) as `|` blocks, readable in review and kubectl."""


def _str_representer(dumper, data):
    style = "|" if "\n" in data else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", data, style=style)


_Dumper.add_representer(str, _str_representer)

HEADER = "# Generated by k8s/generate.py from {source}; edit that (or the config file) and re-run it.\n"


def _dump(doc: dict, source: str) -> str:
    return HEADER.format(source=source) + yaml.dump(doc, Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=1000)


def render() -> dict[str, str]:
    """Every generated file: path relative to k8s/ -> content."""
    out = {
        "base/model-cache-pvc.yaml": _dump(model_cache_pvc(), "k8s/generate.py"),
        "base/model-download-job.yaml": _dump(model_download_job(), "k8s/generate.py"),
        "base/kustomization.yaml": _dump(
            {"apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
             "resources": ["model-cache-pvc.yaml", "model-download-job.yaml"]}, "k8s/generate.py"),
    }
    out["monitoring/podmonitor.yaml"] = _dump(pod_monitor(), "k8s/generate.py")
    out["monitoring/grafana-dashboard.json"] = json.dumps(grafana_dashboard(), indent=2) + "\n"
    out["monitoring/kustomization.yaml"] = _dump(
        {"apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization", "resources": ["podmonitor.yaml"],
         # Grafana's dashboard sidecar (kube-prometheus-stack) loads ConfigMaps labelled grafana_dashboard=1
         "configMapGenerator": [{"name": "z-image-grafana-dashboard", "files": ["grafana-dashboard.json"],
                                 "options": {"labels": {"grafana_dashboard": "1"}, "disableNameSuffixHash": True}}]},
        "k8s/generate.py")
    for v in VARIANTS.values():
        out[f"{v.name}/rayservice.yaml"] = (
            f"# {v.description}\n" + _dump(rayservice(v), f"k8s/generate.py + {v.config}")
        )
        images = sorted({IMAGES[v.head_vendor]} | {IMAGES[g.vendor] for g in v.groups})
        out[f"{v.name}/kustomization.yaml"] = _dump(
            {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                "resources": ["../base", "rayservice.yaml"],
                # Point these at your registry (newName / newTag), or let k8s/apply.sh do it from
                # SERVE_APP_IMAGE_CUDA / SERVE_APP_IMAGE_ROCM without editing this file.
                "images": [{"name": i.rsplit(":", 1)[0], "newName": i.rsplit(":", 1)[0], "newTag": i.rsplit(":", 1)[1]}
                           for i in images],
            },
            "k8s/generate.py",
        )
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="fail if a committed manifest differs from what would be generated")
    args = ap.parse_args(argv)
    files = render()
    stale = []
    for rel, text in files.items():
        path = K8S / rel
        current = path.read_text() if path.exists() else None
        if current == text:
            continue
        if args.check:
            stale.append(rel)
            sys.stdout.writelines(difflib.unified_diff((current or "").splitlines(True), text.splitlines(True),
                                                       f"k8s/{rel} (committed)", f"k8s/{rel} (generated)"))
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            print(f"wrote k8s/{rel}")
    if stale:
        print(f"\n{len(stale)} manifest(s) out of date: run `python k8s/generate.py`", file=sys.stderr)
        return 1
    if args.check:
        print(f"{len(files)} manifests up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
