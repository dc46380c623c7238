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
from serve_app.routing import MAIN_DEPLOYMENT


# What the stages pass each other are CPU tensors that nobody writes to (embeddings, latents, pixels):
# Ray then serializes them as zero-copy out-of-band buffers instead of pickling their storage (on CPU,
# tiny model at 1024²: 30 -> 23 ms of a request spent between the stages).
STAGE_ENV_VARS = {"RAY_ENABLE_ZERO_COPY_TORCH_TENSORS": "1"}


def deployment_options(opts: DeploymentOptions, name: str) -> dict[str, Any]:
    """The stage's Ray Serve options as given (AppConfig checked them against Serve's schema and put our
    defaults under them), plus the deployment's name and the stage environment."""
    out = opts.serve_options()
    actor = out["ray_actor_options"] = out.get("ray_actor_options") or {}
    runtime_env = actor["runtime_env"] = actor.get("runtime_env") or {}
    runtime_env["env_vars"] = {**STAGE_ENV_VARS, **(runtime_env.get("env_vars") or {})}
    return {"name": name, **out}


def denoiser_options(cfg: AppConfig, name: str = MAIN_DEPLOYMENT) -> dict[str, Any]:
    """One denoiser deployment's options; `cfg` is the config it runs on (`AppConfig.for_route`)."""
    out = deployment_options(cfg.denoiser_deployment, name)
    n = cfg.denoiser.sp_degree
    if n > 1:
        # The replica (bundle 0, CPU only) drives one rank worker per GPU bundle; STRICT_PACK keeps a
        # group on one node, so its collectives never cross the network. The stage's num_gpus and
        # accelerator_type are each rank's, not the replica's.
        actor = out["ray_actor_options"]
        gpus = actor.pop("num_gpus", None) or 1.0
        rank_bundle: dict[str, float] = {"CPU": 1.0, "GPU": gpus}
        accelerator = actor.pop("accelerator_type", None)
        if accelerator:
            rank_bundle[f"accelerator_type:{accelerator}"] = 0.001
        actor["num_cpus"] = min(actor.get("num_cpus", 1.0), 1.0)
        out["placement_group_bundles"] = [{"CPU": 1.0}] + [dict(rank_bundle) for _ in range(n)]
        out["placement_group_strategy"] = "STRICT_PACK"
    return out


def build_app(args: dict[str, Any] | None = None) -> Application:
    """What `serve run` calls (Ray Serve takes a builder of exactly one parameter)."""
    return bind_app(AppConfig.model_validate(args or {}))


def bind_app(cfg: AppConfig, stages: dict[str, Any] | None = None) -> Application:
    """The ingress bound to its stages: `stages` maps a stage's deployment name ("TextEncoder", "Denoiser",
    "VaeDecoder") to a handle of one that runs elsewhere, used instead of this app's own; None: all its own."""
    stages = stages or {}
    as_dict = cfg.model_dump(mode="json")

    def own(name: str, bind):
        return stages[name] if name in stages else bind()

    te = own("TextEncoder", lambda: TextEncoderDeployment.options(**deployment_options(cfg.text_encoder_deployment, "TextEncoder")).bind(as_dict))
    dn = own(MAIN_DEPLOYMENT, lambda: DenoiserDeployment.options(**denoiser_options(cfg.for_route(None))).bind(as_dict))
    # one deployment per size route, each with its own replicas (and SP placement group)
    routes = {r.name: DenoiserDeployment.options(**denoiser_options(cfg.for_route(r.name), r.deployment_name)).bind(as_dict, r.name)
              for r in cfg.denoiser_routes}
    vae = own("VaeDecoder", lambda: VaeDecoderDeployment.options(**deployment_options(cfg.vae_deployment, "VaeDecoder")).bind(as_dict))
    return ImageIngress.options(**deployment_options(cfg.ingress_deployment, "Ingress")).bind(te, dn, vae, as_dict, denoiser_routes=routes)
