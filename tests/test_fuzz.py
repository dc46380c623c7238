"""Schemathesis against the server's own OpenAPI schema, over real HTTP on a real Ray Serve (tiny model,
CPU): bounded examples, and no answer may be a 5xx (`not_a_server_error`) or take longer than the
per-request timeout (no hang). Limits are small in this config (n <= 2, steps <= 4, sizes <= 128) so
that every valid example generates quickly. Needs schemathesis (in the `test` extra); FUZZ_PYTHONPATH,
if set, is put in front of the path of the schemathesis process."""

import os
import subprocess
import sys

import httpx
import pytest

from tests.tiny_server import tiny_args



def _schemathesis_env() -> dict | None:
    env = dict(os.environ)
    extra = os.environ.get("FUZZ_PYTHONPATH")
    if extra:
        env["PYTHONPATH"] = os.pathsep.join([extra, env.get("PYTHONPATH", "")])
    probe = subprocess.run([sys.executable, "-c", "import schemathesis.cli"], env=env, capture_output=True)
    return env if probe.returncode == 0 else None


@pytest.fixture(scope="module")
def base(tiny_server, tiny_dir):
    """A front door of its own (n <= 2, <= 128 px, <= 4 steps), so that no generated request is slow."""
    args = tiny_args(tiny_dir, server={"max_n": 2, "max_size": 128, "default_size": "64x64"}, denoiser={"max_steps": 4, "default_steps": 2})
    with tiny_server.front_door("fuzz", args) as url:
        yield url


def test_schemathesis_finds_no_5xx_and_no_hang(base, tmp_path):
    env = _schemathesis_env()
    if env is None:
        pytest.skip("schemathesis is not installed (pip install '.[test]')")
    p = subprocess.run(
        [sys.executable, "-m", "schemathesis.cli", "run", base + "/openapi.json", "--url", base, "--checks", "not_a_server_error",
         "--max-examples", "25", "--request-timeout", "60", "--workers", "2", "--seed", "18"],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=540,  # its .schemathesis/ cache stays out of the tree
    )
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-2000:]
    assert " passed" in p.stdout and "failed" not in p.stdout.split("SUMMARY")[-1], p.stdout[-3000:]
    # and the server still serves
    assert httpx.post(base + "/v1/images/generations", json={"prompt": "after", "num_inference_steps": 1}, timeout=60).status_code == 200
