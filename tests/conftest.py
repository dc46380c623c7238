import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """The tiny model, built once per test session into a fresh folder."""
    from serve_app.engines.tiny_model import ensure_tiny_model

    return ensure_tiny_model(tmp_path_factory.mktemp("models") / "tiny-z-image")


@pytest.fixture(scope="session")
def diffusers_pipe(tiny_dir):
    import torch
    from diffusers import ZImagePipeline

    return ZImagePipeline.from_pretrained(str(tiny_dir), dtype=torch.float32)
