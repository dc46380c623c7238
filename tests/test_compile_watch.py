"""A torch.compile while serving is counted, timed and logged with Dynamo's reason; hitting the recompile
limit is counted and logged (CPU Inductor, a toy function: a matmul, which lowers to an
extern call and needs no C++ build)."""

import logging

import torch

from serve_app.engines.compile_watch import compile_watch


def test_compiles_while_serving_and_recompile_limit_hits_are_counted(caplog):
    watch = compile_watch()
    f = torch.compile(lambda x: x @ x, dynamic=False)
    before = watch.snapshot()
    f(torch.randn(8, 8))  # warm-up: not on the request path
    assert watch.snapshot()["compiles"] == before["compiles"] + 1
    assert watch.snapshot()["compile_s"] > before["compile_s"]  # every compile is timed, at start too
    assert watch.snapshot()["compiles_while_serving"] == before["compiles_while_serving"]

    watch.serving()
    with caplog.at_level(logging.WARNING, logger="serve_app.engines.compile_watch"):
        f(torch.randn(9, 9))  # a new shape: recompiled while serving
    after = watch.snapshot()
    assert after["compiles_while_serving"] == before["compiles_while_serving"] + 1
    assert after["compile_s_while_serving"] > 0
    assert "size mismatch" in after["last_compile_while_serving"]  # Dynamo's own reason
    assert any("torch.compile while serving" in r.getMessage() for r in caplog.records)

    old = torch._dynamo.config.recompile_limit
    torch._dynamo.config.recompile_limit = 2
    try:
        with caplog.at_level(logging.WARNING, logger="serve_app.engines.compile_watch"):
            f(torch.randn(10, 10))  # a third graph: over the limit, Dynamo runs the frame eagerly
    finally:
        torch._dynamo.config.recompile_limit = old
    assert watch.snapshot()["recompile_limit_hits"] == after["recompile_limit_hits"] + 1
    assert any("recompile limit" in r.getMessage() for r in caplog.records)
