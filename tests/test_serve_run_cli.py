"""The README's main command as a user types it (`python -m serve_app.serve_run configs/tiny-cpu.yaml`, which is
Ray Serve's `serve run` CLI run in-process plus a port check and drain on SIGTERM): a subprocess that becomes
healthy, answers, and on SIGTERM finishes the requests in flight before it exits."""

import concurrent.futures
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import yaml

from tests.tiny_server import quick_drain, wait_until

ROOT = Path(__file__).resolve().parents[1]
PORT = 18455


def test_serve_run_serves_the_tiny_cpu_config_and_drains_on_sigterm(tmp_path, tiny_dir):
    cfg = yaml.safe_load((ROOT / "configs/tiny-cpu.yaml").read_text())
    # Same file, but on a private port and the session's tiny model folder.
    cfg["http_options"].update(host="127.0.0.1", port=PORT)
    args = cfg["applications"][0]["args"]
    args["model"]["tiny_dir"] = str(tiny_dir)
    args["server"].pop("metrics_export_port", None)  # the shared test server's Ray may hold its own
    quick_drain(args)
    path = tmp_path / "tiny-cpu.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a fresh local cluster of its own
    env.update(RAY_AUTH_MODE="disabled", PYTHONPATH=str(ROOT))
    log = tmp_path / "serve.log"
    proc = subprocess.Popen([sys.executable, "-m", "serve_app.serve_run", str(path)], cwd=tmp_path, env=env,
                            stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{PORT}"
    try:
        def ready():
            assert proc.poll() is None, log.read_text()[-3000:]
            return httpx.get(base + "/health/ready", timeout=30).status_code == 200

        wait_until(ready, 300, "healthy")
        r = httpx.post(base + "/v1/images/generations", json={"prompt": "a cat", "size": "64x64", "seed": 1}, timeout=60)
        assert r.status_code == 200 and r.json()["data"][0]["b64_json"]
        # the file serves the tiny model's demo LoRA adapter out of the box
        assert [d["id"] for d in httpx.get(base + "/v1/loras", timeout=30).json()["data"]] == ["tiny-demo"]
        lora = httpx.post(base + "/v1/images/generations", json={"prompt": "a cat", "size": "64x64", "seed": 1, "lora": "tiny-demo"},
                          timeout=60)
        assert lora.status_code == 200, lora.text
        assert lora.json()["data"][0]["b64_json"] != r.json()["data"][0]["b64_json"]

        # SIGTERM (`kill PID`, or a container runtime signalling PID 1) while requests are in flight: every one
        # completes, then the process exits. The images are large enough to stay in flight for seconds (at
        # 256² x 30 steps all four were done within 1.7 s here, and a CI run polled past them), and the wait
        # is on the ingress's count of admitted requests, which only grows, so no poll can miss it.
        def admitted() -> int:
            return httpx.get(base + "/v1/stats", timeout=30).json()["ingress"]["requests"]

        n, before = 4, admitted()
        with concurrent.futures.ThreadPoolExecutor(n) as pool:
            futures = [pool.submit(httpx.post, base + "/v1/images/generations",
                                   json={"prompt": f"drain {i}", "size": "512x512", "num_inference_steps": 50, "seed": i}, timeout=300)
                       for i in range(n)]
            wait_until(lambda: admitted() == before + n, 120, "all admitted")
            os.kill(proc.pid, signal.SIGTERM)
            results = [f.result() for f in futures]
        assert [r.status_code for r in results] == [200] * n, [r.text[:200] for r in results]
        assert proc.wait(timeout=120) is not None
        # the signal came while they ran (the first one, alone in its batch, may just have finished)
        drained = re.search(r"draining 1 app\(s\) before shutdown, (\d+) image\(s\) in flight", log.read_text())
        assert drained and 1 <= int(drained[1]) <= n, log.read_text()[-3000:]
    finally:
        _stop(proc)


def _stop(proc):
    for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
            proc.wait(timeout=wait)
            return
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue


def test_invalid_config_names_the_key(tmp_path):
    cfg = yaml.safe_load((ROOT / "configs/tiny-cpu.yaml").read_text())
    cfg["applications"][0]["args"]["denoiser"] = {"ulysses_degre": 2}
    from pydantic import ValidationError

    from serve_app.app import build_app

    try:
        build_app(cfg["applications"][0]["args"])
    except ValidationError as e:
        assert "denoiser.ulysses_degre" in str(e)
    else:
        raise AssertionError("invalid config accepted")


def test_every_config_file_validates():
    from serve_app.config import AppConfig

    for path in sorted((ROOT / "configs").glob("*.yaml")):
        for app in yaml.safe_load(path.read_text())["applications"]:
            assert app["import_path"] == "serve_app.app:build_app"
            AppConfig.model_validate(app["args"])
