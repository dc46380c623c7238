"""The small-card configs (configs/z-image-turbo-{24gb,16gb}.yaml) validate, and serve on CPU with the tiny
model; the text encoder's CPU offload runs through accelerate's hooks and gives the same embeddings."""

import base64
import io

import httpx
import pytest
import torch
import yaml
from PIL import Image

from serve_app.config import AppConfig, ModelConfig, TextEncoderConfig
from serve_app.engines.text_encoder import TextEncoderEngine
from tests.tiny_server import quick_drain

CONFIGS = ["configs/z-image-turbo-24gb.yaml", "configs/z-image-turbo-16gb.yaml"]
# served on CPU: it runs what the 24 GB one does (whose caps and tiling are checked below) plus the
# text encoder's offload through Serve, so a second app start would add CI time and no coverage
SERVED = "configs/z-image-turbo-16gb.yaml"


def _args(path: str) -> dict:
    return yaml.safe_load(open(path))["applications"][0]["args"]


@pytest.mark.parametrize("path", CONFIGS)
def test_the_config_validates_with_its_caps(path):
    from serve_app.app import bind_app

    cfg = AppConfig.model_validate(_args(path))
    bind_app(cfg)  # Serve's `.options` takes each stage's deployment options as written
    caps = [getattr(cfg, f"{s}_deployment").gpu_memory_gb for s in ("text_encoder", "denoiser", "vae")]
    assert all(c is not None for c in caps) and sum(caps) <= (24 if "24gb" in path else 16)
    assert cfg.denoiser.fp8 and cfg.vae.tiling_min_pixels < 2048 * 2048
    assert cfg.text_encoder.cpu_offload == ("16gb" in path)


def test_text_encoder_offload_hooks_and_the_same_embeddings(tiny_dir):
    model = ModelConfig(source="tiny", tiny_dir=str(tiny_dir))
    plain = TextEncoderEngine(model, TextEncoderConfig())
    offloaded = TextEncoderEngine(model, TextEncoderConfig(cpu_offload=True))
    # accelerate hooks every module that holds weights; the module itself keeps none (meta tensors), the
    # hook's CPU copy is moved to the execution device for each forward
    holders = lambda e: [m for m in e.model.modules() if list(m.parameters(recurse=False))]
    assert all(hasattr(m, "_hf_hook") for m in holders(offloaded)) and not any(hasattr(m, "_hf_hook") for m in holders(plain))
    assert {p.device.type for p in offloaded.model.parameters()} == {"meta"}
    prompts = ["a lighthouse at dawn", "a red fox in the snow, watercolor"]
    for a, b in zip(plain.encode(prompts), offloaded.encode(prompts)):
        assert torch.equal(a, b)


def test_the_config_serves_on_cpu_with_the_tiny_model(tiny_server, tiny_dir):
    """The config as written, with the tiny model on CPU (no GPUs here: the stages' GPU shares dropped)."""
    path = SERVED
    args = _args(path)
    args["model"] = {"source": "tiny", "tiny_dir": str(tiny_dir), "device": "cpu"}
    args["denoiser"]["warmup_sizes"] = [[64, 64]]
    for stage in ("text_encoder_deployment", "denoiser_deployment", "vae_deployment", "ingress_deployment"):
        args[stage]["ray_actor_options"] = {"num_cpus": 0.1}
    quick_drain(args)
    name = path.rsplit("/", 1)[-1].removesuffix(".yaml")
    with tiny_server.app(name, args) as base:  # next to the shared root app, deleted afterwards
        r = httpx.post(f"{base}/v1/images/generations", timeout=120,
                       json={"prompt": "a lighthouse at dawn", "size": "128x64", "seed": 3, "num_inference_steps": 2})
    assert r.status_code == 200, r.text
    assert Image.open(io.BytesIO(base64.b64decode(r.json()["data"][0]["b64_json"]))).size == (128, 64)
