"""The Serve application: `serve run configs/<name>.yaml` imports `serve_app.app:build_app` and passes
the YAML's `args`, which must validate as `AppConfig` (a bad key fails here, named)."""

from __future__ import annotations

from typing import Any

from ray.serve import Application

from serve_app.config import AppConfig, DeploymentOptions
from serve_app.deployments.denoiser import DenoiserDeployment
from serve_app.deployments.ingress import ImageIngress
from serve_app.deployments.text_encoder import TextEncoderDeployment
from serve_app.deployments.vae import VaeDecoderDeployment


# What the stages pass each other are CPU tensors that nobody writes to (embeddings, latents, pixels):
# Ray then serializes them as zero-copy out-of-band buffers instead of pickling their storage (on CPU,
# tiny model at 1024²: 30 -> 23 ms of a request spent between the stages).
STAGE_ENV_VARS = {"RAY_ENABLE_ZERO_COPY_TORCH_TENSORS": "1"}


def deployment_options(opts: DeploymentOptions, name: str) -> dict[str, Any]:
    """Map our typed per-stage options onto Ray Serve's `.options(...)`."""
    actor: dict[str, Any] = {"num_cpus": opts.num_cpus, "num_gpus": opts.num_gpus}
    if opts.accelerator_type:
        actor["accelerator_type"] = opts.accelerator_type
    if opts.memory:
        actor["memory"] = opts.memory
    runtime_env = dict(opts.runtime_env or {})
    runtime_env["env_vars"] = {**STAGE_ENV_VARS, **(runtime_env.get("env_vars") or {})}
    actor["runtime_env"] = runtime_env
    out: dict[str, Any] = {
        "name": name,
        "max_ongoing_requests": opts.max_ongoing_requests,
        "max_queued_requests": opts.max_queued_requests,
        "ray_actor_options": actor,
    }
    if opts.autoscaling is not None:
        out["autoscaling_config"] = opts.autoscaling.model_dump(exclude_none=True)
    else:
        out["num_replicas"] = opts.num_replicas or 1
    for key in ("health_check_period_s", "health_check_timeout_s"):
        if getattr(opts, key) is not None:
            out[key] = getattr(opts, key)
    return out


def denoiser_options(cfg: AppConfig) -> dict[str, Any]:
    out = deployment_options(cfg.denoiser_deployment, "Denoiser")
    n = cfg.denoiser.sp_degree
    if n > 1:
        # The replica (bundle 0, CPU only) drives one rank worker per GPU bundle; STRICT_PACK keeps a
        # group on one node, so its collectives never cross the network.
        gpus = cfg.denoiser_deployment.num_gpus or 1.0
        rank_bundle: dict[str, float] = {"CPU": 1.0, "GPU": gpus}
        if cfg.denoiser_deployment.accelerator_type:
            rank_bundle[f"accelerator_type:{cfg.denoiser_deployment.accelerator_type}"] = 0.001
        out["ray_actor_options"] = {k: v for k, v in out["ray_actor_options"].items() if k not in ("num_gpus", "accelerator_type")}
        out["ray_actor_options"]["num_cpus"] = min(out["ray_actor_options"]["num_cpus"], 1.0)
        out["placement_group_bundles"] = [{"CPU": 1.0}] + [dict(rank_bundle) for _ in range(n)]
        out["placement_group_strategy"] = "STRICT_PACK"
    return out


def build_app(args: dict[str, Any] | None = None) -> Application:
    cfg = AppConfig.model_validate(args or {})
    as_dict = cfg.model_dump(mode="json")
    te = TextEncoderDeployment.options(**deployment_options(cfg.text_encoder_deployment, "TextEncoder")).bind(as_dict)
    dn = DenoiserDeployment.options(**denoiser_options(cfg)).bind(as_dict)
    vae = VaeDecoderDeployment.options(**deployment_options(cfg.vae_deployment, "VaeDecoder")).bind(as_dict)
    return ImageIngress.options(**deployment_options(cfg.ingress_deployment, "Ingress")).bind(te, dn, vae, as_dict)
