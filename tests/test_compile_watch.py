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


def test_a_compile_in_background_is_counted_apart_from_the_request_path(caplog):
    """A graph built on a thread inside `background()` once serving (the VAE's static graphs with
    `vae.static_sizes_after_start`) is not a compile on the request path; every compile adds to `compile_s`."""
    import threading

    watch = compile_watch()
    watch.serving()
    f = torch.compile(lambda x: x @ x + 1, dynamic=False)
    before = watch.snapshot()

    def build():
        with watch.background():
            f(torch.randn(4, 4))

    with caplog.at_level(logging.INFO, logger="serve_app.engines.compile_watch"):
        t = threading.Thread(target=build)
        t.start()
        t.join()
    after = watch.snapshot()
    assert after["background_compiles"] == before["background_compiles"] + 1
    assert after["compiles_while_serving"] == before["compiles_while_serving"]
    assert after["compile_s"] > before["compile_s"] and after["background_compile_s"] > before["background_compile_s"]
    assert any("off the request path" in r.getMessage() for r in caplog.records)
    f(torch.randn(5, 5))  # the same function on a request thread: on the request path again
    assert watch.snapshot()["compiles_while_serving"] == before["compiles_while_serving"] + 1
