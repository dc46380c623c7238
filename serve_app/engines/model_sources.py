"""Loading each Z-Image component from the configured source.

`hub` and `tiny` both go through `from_pretrained` of a folder (or hub id) in the diffusers layout, so
the code path real weights take is the one the tests take. `random-full` builds the real architecture
with random weights directly on the device: it costs exactly what the real model costs, for speed work
where weights cannot be downloaded.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
from pathlib import Path

import torch

from serve_app.config import ModelConfig
from serve_app.engines.model_configs import (
    FULL_SCHEDULER_CONFIG,
    FULL_TEXT_ENCODER_CONFIG,
    FULL_TRANSFORMER_CONFIG,
    FULL_VAE_CONFIG,
)
from serve_app.engines.tiny_model import ensure_tiny_model

def pretrained_root(cfg: ModelConfig) -> str:
    """The folder or hub id that `from_pretrained` reads for `hub` and `tiny` sources."""
    if cfg.source == "tiny":
        return str(ensure_tiny_model(cfg.tiny_dir, seed=cfg.seed))
    if cfg.source == "hub":
        return cfg.path
    raise ValueError(f"model.source={cfg.source!r} has no pretrained folder")


def _pretrained_kwargs(cfg: ModelConfig, subfolder: str) -> dict:
    kw: dict = {"subfolder": subfolder}
    if cfg.revision and not Path(cfg.path).exists():
        kw["revision"] = cfg.revision
    return kw


@contextlib.contextmanager
def _building_on(device: torch.device, dtype: torch.dtype, seed: int):
    """Build modules directly on `device` in `dtype` with seeded random weights."""
    old, threads = torch.get_default_dtype(), torch.get_num_threads()
    torch.manual_seed(seed)
    torch.set_default_dtype(dtype)
    if torch.device(device).type == "cpu":
        # Ray caps a replica's threads at its num_cpus; drawing 6B random weights on 2 threads took 64 s
        torch.set_num_threads(max(threads, os.cpu_count() or 1))
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(old)
        torch.set_num_threads(threads)


def load_tokenizer(cfg: ModelConfig):
    from transformers import AutoTokenizer

    if cfg.source == "random-full":
        # Tokenisation cost does not depend on the vocabulary's content; the tiny BPE stands in.
        return AutoTokenizer.from_pretrained(str(ensure_tiny_model(cfg.tiny_dir, seed=cfg.seed)), subfolder="tokenizer")
    return AutoTokenizer.from_pretrained(pretrained_root(cfg), **_pretrained_kwargs(cfg, "tokenizer"))


def load_text_encoder(cfg: ModelConfig, device: torch.device, dtype: torch.dtype):
    from transformers import AutoModel, Qwen3Config, Qwen3Model

    if cfg.source == "random-full":
        with _building_on(device, dtype, cfg.seed):
            model = Qwen3Model(Qwen3Config(**FULL_TEXT_ENCODER_CONFIG, dtype=dtype))
        return model.eval().requires_grad_(False)
    model = AutoModel.from_pretrained(pretrained_root(cfg), dtype=dtype, **_pretrained_kwargs(cfg, "text_encoder"))
    return model.to(device).eval().requires_grad_(False)


def load_transformer(cfg: ModelConfig, device: torch.device, dtype: torch.dtype):
    from diffusers import ZImageTransformer2DModel

    if cfg.source == "random-full":
        with _building_on(device, dtype, cfg.seed + 1):
            model = ZImageTransformer2DModel(**FULL_TRANSFORMER_CONFIG)
        _randomise_zero_inits(model)
        return model.eval().requires_grad_(False)
    model = ZImageTransformer2DModel.from_pretrained(
        pretrained_root(cfg), dtype=dtype, **_pretrained_kwargs(cfg, "transformer")
    )
    return model.to(device).eval().requires_grad_(False)


def load_transformer_config(cfg: ModelConfig) -> dict:
    """The DiT's configuration alone (no weights): its `transformer/config.json`, the dict diffusers'
    `load_config` returns, read without importing diffusers (~4 s of CPU at every ingress start)."""
    if cfg.source == "random-full":
        from diffusers import ZImageTransformer2DModel

        defaults = {k: v.default for k, v in inspect.signature(ZImageTransformer2DModel.__init__).parameters.items()
                    if v.default is not inspect.Parameter.empty}
        return {**defaults, **FULL_TRANSFORMER_CONFIG}
    root = Path(pretrained_root(cfg))
    path = root / "transformer" / "config.json"
    if not path.exists():
        from huggingface_hub import hf_hub_download

        path = Path(hf_hub_download(str(root), "config.json", **_pretrained_kwargs(cfg, "transformer")))
    return json.loads(path.read_text())


def load_vae(cfg: ModelConfig, device: torch.device, dtype: torch.dtype):
    from diffusers import AutoencoderKL

    if cfg.source == "random-full":
        with _building_on(device, dtype, cfg.seed + 2):
            model = AutoencoderKL(**FULL_VAE_CONFIG)
        return model.eval().requires_grad_(False)
    model = AutoencoderKL.from_pretrained(pretrained_root(cfg), dtype=dtype, **_pretrained_kwargs(cfg, "vae"))
    return model.to(device).eval().requires_grad_(False)


def load_scheduler_config(cfg: ModelConfig) -> dict:
    from diffusers import FlowMatchEulerDiscreteScheduler

    if cfg.source == "random-full":
        return dict(FlowMatchEulerDiscreteScheduler(**FULL_SCHEDULER_CONFIG).config)
    return dict(
        FlowMatchEulerDiscreteScheduler.from_pretrained(pretrained_root(cfg), **_pretrained_kwargs(cfg, "scheduler")).config
    )


def _randomise_zero_inits(model) -> None:
    """diffusers zero-initialises some output layers; random-full wants non-degenerate activations."""
    with torch.no_grad():
        for p in model.all_final_layer.parameters():
            p.normal_(std=0.02)
        model.x_pad_token.normal_()
        model.cap_pad_token.normal_()



def lora_folder(model_cfg: ModelConfig, lora_cfg) -> Path | None:
    """Where the adapters are: None when LoRA is off; `lora.dir`; unset with the tiny model, its own demo
    folder (built with it)."""
    if not lora_cfg.enabled:
        return None
    if lora_cfg.dir is not None:
        return Path(os.path.expanduser(lora_cfg.dir))
    if model_cfg.source == "tiny":
        from serve_app.engines.tiny_model import ensure_tiny_loras

        return ensure_tiny_loras(ensure_tiny_model(model_cfg.tiny_dir, seed=model_cfg.seed))
    return None
