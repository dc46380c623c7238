"""A tiny Z-Image: the real architecture classes at a few layers, seeded random weights and a BPE
tokenizer trained here, saved in the standard diffusers folder layout.

It exists so that tests and CPU demos exercise the real `from_pretrained` loading path without any
download. Building it takes a couple of seconds; it is written once per folder (atomically, so that
several replicas starting together do not trip over each other) and then only loaded.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
from pathlib import Path

import torch

from serve_app.engines.model_configs import (
    TINY_SCHEDULER_CONFIG,
    TINY_TEXT_ENCODER_CONFIG,
    TINY_TRANSFORMER_CONFIG,
    TINY_VAE_CONFIG,
)

TINY_VERSION = "v1"

# Qwen3-style chat template; `enable_thinking` is accepted as ZImagePipeline passes it.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]

_CORPUS = [
    "a photo of a cat sitting on a windowsill in the afternoon sun",
    "an astronaut riding a horse on the moon, digital art, highly detailed",
    "a watercolor painting of a lighthouse by the sea at dawn",
    "portrait of an old fisherman, dramatic lighting, 85mm lens",
    "a bowl of ramen with steam rising, food photography, bokeh",
    "cyberpunk city street at night with neon signs and rain reflections",
    "一只在雪地里奔跑的红色狐狸，高清摄影",
    "山水画，远处的群山和云雾，中国传统水墨风格",
    "the quick brown fox jumps over the lazy dog 0123456789",
    "user assistant system think image prompt style color light shadow texture",
]



def default_tiny_dir() -> Path:
    return Path(os.path.expanduser("~/.cache/serve_app")) / f"tiny-z-image-{TINY_VERSION}"


def _build_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_CORPUS * 4, trainer=trainer)
    model = bpe.model
    vocab = bpe.get_vocab()
    import json

    merges = json.loads(bpe.to_str())["model"]["merges"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in merges]
    del model
    tok = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        unk_token="<|endoftext|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=SPECIAL_TOKENS[1:],
        model_max_length=4096,
        padding_side="right",
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def build_tiny_model(folder: str | Path, seed: int = 0) -> Path:
    """Write the tiny pipeline's components to `folder` (diffusers layout) and return it."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    folder = Path(folder)
    tok = _build_tokenizer()
    torch.manual_seed(seed)
    te = Qwen3Model(Qwen3Config(vocab_size=len(tok), **TINY_TEXT_ENCODER_CONFIG))
    transformer = ZImageTransformer2DModel(**TINY_TRANSFORMER_CONFIG)
    # The pad tokens start as zeros; give them values so a wrong pad shows up in the tests.
    with torch.no_grad():
        transformer.x_pad_token.normal_()
        transformer.cap_pad_token.normal_()
        # Zero-initialised output projections would make every image the same grey; randomise.
        for p in transformer.all_final_layer.parameters():
            p.normal_(std=0.05)
        for block in list(transformer.layers) + list(transformer.noise_refiner):
            if block.modulation:
                for p in block.adaLN_modulation.parameters():
                    p.normal_(std=0.05)
    vae = AutoencoderKL(**TINY_VAE_CONFIG)
    scheduler = FlowMatchEulerDiscreteScheduler(**TINY_SCHEDULER_CONFIG)

    tok.save_pretrained(folder / "tokenizer")
    te.save_pretrained(folder / "text_encoder")
    transformer.save_pretrained(folder / "transformer")
    vae.save_pretrained(folder / "vae")
    scheduler.save_pretrained(folder / "scheduler")
    (folder / "model_index.json").write_text(
        """{
  "_class_name": "ZImagePipeline",
  "_diffusers_version": "0.42.1",
  "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
  "text_encoder": ["transformers", "Qwen3Model"],
  "tokenizer": ["transformers", "Qwen2Tokenizer"],
  "transformer": ["diffusers", "ZImageTransformer2DModel"],
  "vae": ["diffusers", "AutoencoderKL"]
}
"""
    )
    return folder


def ensure_tiny_model(folder: str | Path | None = None, seed: int = 0) -> Path:
    """Return a folder holding the tiny model, building it first if it is not there yet."""
    folder = Path(folder) if folder else default_tiny_dir()
    if (folder / "model_index.json").exists():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(str(folder) + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (folder / "model_index.json").exists():
            return folder
        tmp = Path(tempfile.mkdtemp(prefix=folder.name + ".", dir=folder.parent))
        try:
            build_tiny_model(tmp, seed=seed)
            if folder.exists():
                shutil.rmtree(folder)
            os.replace(tmp, folder)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


DEMO_ADAPTER = "tiny-demo"
# what a LoRA adapter of Z-Image usually adapts: every attention and MLP linear of the blocks
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "w1", "w2", "w3"]


def build_lora_adapter(folder: str | Path, name: str, transformer_config: dict, rank: int = 4, alpha: float | None = None,
                       seed: int = 0, std: float = 0.05, targets: list[str] | None = None,
                       dtype: torch.dtype = torch.float32) -> Path:
    """Write a LoRA adapter of seeded random weights for a DiT of `transformer_config` to
    `folder/<name>.safetensors`, in diffusers' LoRA format: peft's `LoraConfig` on a copy of the DiT, its
    state dict saved by `ZImagePipeline.save_lora_weights` with the config as metadata (alpha / rank is
    the scaling peft reads back). The DiT copy is weightless, so this works for the full-size model too."""
    from diffusers import ZImagePipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from serve_app.engines.lora import weightless_transformer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    skeleton = weightless_transformer(transformer_config)
    config = LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else 2 * rank, target_modules=targets or LORA_TARGETS)
    skeleton.add_adapter(config, adapter_name="adapter")  # peft refuses '.' in its names; files may have them
    state = get_peft_model_state_dict(skeleton, adapter_name="adapter")
    g = torch.Generator("cpu").manual_seed(seed)
    # both factors random (peft would start B at zero: an adapter that changes nothing)
    state = {k: (torch.randn(v.shape, generator=g) * std).to(dtype) for k, v in state.items()}
    ZImagePipeline.save_lora_weights(str(folder), transformer_lora_layers=state, weight_name=name + ".safetensors",
                                     transformer_lora_adapter_metadata=config.to_dict())
    return folder / (name + ".safetensors")


def ensure_tiny_loras(tiny_folder: str | Path) -> Path:
    """The tiny model's adapter folder (`<tiny_folder>/loras`), with its demo adapter `tiny-demo`, built
    once (atomically, as the model is)."""
    from serve_app.engines.model_configs import TINY_TRANSFORMER_CONFIG

    folder = Path(tiny_folder) / "loras"
    target = folder / (DEMO_ADAPTER + ".safetensors")
    if target.exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    with open(str(folder) + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if target.exists():
            return folder
        tmp = Path(tempfile.mkdtemp(prefix="demo.", dir=folder.parent))
        try:
            built = build_lora_adapter(tmp, DEMO_ADAPTER, TINY_TRANSFORMER_CONFIG, rank=4, seed=1)
            os.replace(built, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return folder
