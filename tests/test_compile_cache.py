"""Every stage engine that compiles (DiT, VAE) points torch.compile's cache at `model.compile_cache_dir`, the directory Inductor
then writes to, so a restarted or added replica finds the kernels compiled before."""

import os

import pytest
import torch

from serve_app.config import DenoiserConfig, ModelConfig, VaeConfig
from serve_app.engines.denoiser import DenoiserEngine
from serve_app.engines.vae import VaeEngine


@pytest.fixture
def clean_env():
    """The engines set these in the process; restore them so that other tests see the session's."""
    keys = ("TORCHINDUCTOR_CACHE_DIR", "TORCHINDUCTOR_FX_GRAPH_CACHE", "TORCHINDUCTOR_AUTOGRAD_CACHE")
    saved = {k: os.environ.pop(k, None) for k in keys}
    yield
    for k, v in saved.items():
        os.environ.pop(k, None)
        if v is not None:
            os.environ[k] = v


def test_each_engine_uses_the_configured_cache(tiny_dir, tmp_path, clean_env):
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    for i, make in enumerate((
        lambda m: DenoiserEngine(m, DenoiserConfig()),
        lambda m: VaeEngine(m, VaeConfig()),
    )):
        path = tmp_path / f"cache-{i}"
        engine = make(ModelConfig(source="tiny", tiny_dir=str(tiny_dir), compile_cache_dir=str(path)))
        assert engine.compile_cache_dir == str(path) and path.is_dir()
        assert cache_dir() == str(path)  # where Inductor will read and write
        assert os.environ["TORCHINDUCTOR_FX_GRAPH_CACHE"] == "1"


def test_unset_keeps_the_environments_cache(tiny_dir, tmp_path, clean_env):
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(tmp_path / "from-env")
    engine = DenoiserEngine(ModelConfig(source="tiny", tiny_dir=str(tiny_dir)), DenoiserConfig())
    assert engine.compile_cache_dir == str(tmp_path / "from-env") == engine.info()["compile_cache_dir"]


def test_the_cache_is_written_by_a_compile(tmp_path, clean_env):
    """A compile in this process leaves its FX graph in the configured directory (CPU Inductor). A matmul
    alone lowers to an extern call in Python wrapper code: no C++ kernel to build (a pointwise graph's
    g++ build was 13 of this test's 16 s), the same cache writes."""
    from serve_app.engines.compile_cache import use_compile_cache

    use_compile_cache(str(tmp_path / "kernels"))
    torch._dynamo.reset()
    f = torch.compile(lambda a, b: a @ b, dynamic=False)
    a, b = torch.randn(8, 8), torch.randn(8, 8)
    torch.testing.assert_close(f(a, b), a @ b)
    assert any((tmp_path / "kernels" / "fxgraph").rglob("*")), "no FX graph written to the cache"
