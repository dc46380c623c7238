"""benchmarks/soak.py in CI: 10 s at 2x the measured capacity on the tiny model, with bad
requests, client disconnects and one DiT replica killed; nothing lost or hung, no 5xx but worker_died /
unavailable (soak.py's own verdict), and the server serves afterwards."""

import sys
from pathlib import Path

import httpx
import pytest

from tests.tiny_server import BASE, wait_until as _wait

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import soak  # noqa: E402

@pytest.fixture(scope="module")
def serve_app(tiny_server):
    return tiny_server  # the root app: request_timeout_s 120, max_inflight_images 8 (tests/tiny_server.py)


def test_short_soak_with_a_replica_kill(serve_app, tmp_path):
    out = tmp_path / "soak.json"
    rc = soak.main(["--base-url", BASE, "--duration-s", "10", "--multiple", "2", "--measure-s", "4", "--sizes", "64x64,128x128",
                    "--n-choices", "1,2", "--steps", "4", "--kill-stage", "denoiser", "--kill-every-s", "5", "--disconnect-fraction", "0.2",
                    "--output-json", str(out)])
    import json

    report = json.loads(out.read_text())
    assert rc == 0, report
    assert report["hung"] == 0 and report["lost"] == 0 and report["bad_5xx"] == 0, report
    assert report["malformed_errors"] == 0, report["malformed_examples"]  # every 4xx/5xx, the kill's 503s too, OpenAI-shaped
    assert any("pid" in k for k in report["kills"]), report["kills"]  # a replica was killed
    assert report["codes"].get("200", 0) > 0 and any(c.startswith("400") for c in report["codes"]), report["codes"]
    assert report["client_disconnects"] > 0
    assert report["ray_memory_bytes"]["total_before"] > 0 and report["ray_memory_bytes"]["total_after"] > 0
    # and the server is whole again afterwards
    _wait(lambda: httpx.get(BASE + "/health/ready", timeout=10).status_code == 200, 240, "ready after the soak")
    assert httpx.post(BASE + "/v1/images/generations", json={"prompt": "after", "size": "64x64", "num_inference_steps": 1},
                      timeout=120).status_code == 200
