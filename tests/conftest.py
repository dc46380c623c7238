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


@pytest.fixture(scope="module")
def tiny_server(tiny_dir):
    """The shared local Ray + Serve with the root tiny app at "/" ready (tests/tiny_server.py)."""
    from tests.tiny_server import SHARED

    SHARED.root(tiny_dir)
    return SHARED


@pytest.fixture(scope="module")
def own_ray():
    """For a file that starts a Ray of its own in this process: the shared one stops first."""
    from tests.tiny_server import SHARED

    SHARED.stop()


def pytest_collection_modifyitems(session, config, items):
    """Files that use the shared server run first, each file's tests kept together and in order, so that
    it starts once and is stopped (by `own_ray`) before any file that needs a Ray of its own."""
    shared = {item.module.__name__ for item in items if "tiny_server" in item.fixturenames}
    items.sort(key=lambda item: item.module.__name__ not in shared)  # stable: file order kept within each group


def pytest_sessionfinish(session, exitstatus):
    from tests.tiny_server import SHARED

    SHARED.stop()
