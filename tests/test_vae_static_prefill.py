"""`vae.prefill_static_graphs`: the child process that compiles the VAE's static graphs while the replica
compiles its symbolic one (serve_app/engines/vae_static_prefill.py). On CPU with Dynamo's `eager` backend:
the child loads the VAE through the real loading path and runs the static graph at each latent size; that
its graphs land in the GPU compile cache is measured on the GPU (benchmarks/README.md, "cold start")."""

import logging

from serve_app.config import ModelConfig
from serve_app.engines.vae_static_prefill import start_prefill, wait_prefill


def test_the_child_compiles_each_static_size_and_exits(tiny_dir, caplog):
    model = ModelConfig(source="tiny", tiny_dir=str(tiny_dir), device="cpu").model_dump_json()
    with caplog.at_level(logging.INFO, logger="serve_app.engines.vae_static_prefill"):
        assert wait_prefill(start_prefill(model, [(8, 8), (6, 10)], backend="eager"), timeout_s=120)
    assert any("prefilled" in r.getMessage() for r in caplog.records)


def test_a_failed_child_leaves_the_compiles_to_the_replica(caplog):
    model = '{"source": "no-such-source"}'  # the child exits with an error before compiling anything
    with caplog.at_level(logging.WARNING, logger="serve_app.engines.vae_static_prefill"):
        assert not wait_prefill(start_prefill(model, [(8, 8)], backend="eager"), timeout_s=120)
    assert any("compiles them itself" in r.getMessage() for r in caplog.records)


def test_a_child_no_longer_needed_is_stopped(tiny_dir, caplog):
    """A warm cache (the replica's symbolic graph came from it): the child is stopped, not waited for."""
    from serve_app.engines.vae_static_prefill import stop_prefill

    child = start_prefill(ModelConfig(source="tiny", tiny_dir=str(tiny_dir), device="cpu").model_dump_json(), [(8, 8)], backend="eager")
    with caplog.at_level(logging.INFO, logger="serve_app.engines.vae_static_prefill"):
        stop_prefill(child)
    assert child.returncode is not None
    assert any("already holds" in r.getMessage() for r in caplog.records)
