"""`serve run configs/tiny-cpu.yaml` as a user types it: a subprocess that becomes healthy and answers."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import yaml

ROOT = Path(__file__).resolve().parents[1]


def test_serve_run_tiny_cpu_config(tmp_path, tiny_dir):
    cfg = yaml.safe_load((ROOT / "configs/tiny-cpu.yaml").read_text())
    # Same file, but on a private port and the session's tiny model folder.
    cfg["http_options"]["port"] = 18455
    cfg["http_options"]["host"] = "127.0.0.1"
    cfg["applications"][0]["args"]["model"]["tiny_dir"] = str(tiny_dir)
    path = tmp_path / "tiny-cpu.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a fresh local cluster of its own
    env.update(RAY_AUTH_MODE="disabled", PYTHONPATH=str(ROOT))
    serve_bin = Path(sys.executable).with_name("serve")
    proc = subprocess.Popen([str(serve_bin), "run", str(path)], cwd=tmp_path, env=env,
                            stdout=open(tmp_path / "serve.log", "w"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 240
        healthy = False
        while time.time() < deadline and proc.poll() is None:
            try:
                healthy = httpx.get("http://127.0.0.1:18455/health", timeout=30).status_code == 200
            except httpx.HTTPError:
                pass
            if healthy:
                break
            time.sleep(2)
        assert healthy, (tmp_path / "serve.log").read_text()[-3000:]
        r = httpx.post("http://127.0.0.1:18455/v1/images/generations", json={"prompt": "a cat", "size": "64x64", "seed": 1}, timeout=60)
        assert r.status_code == 200 and r.json()["data"][0]["b64_json"]
        # the file serves the tiny model's demo LoRA adapter out of the box
        assert [d["id"] for d in httpx.get("http://127.0.0.1:18455/v1/loras", timeout=30).json()["data"]] == ["tiny-demo"]
        lora = httpx.post("http://127.0.0.1:18455/v1/images/generations",
                          json={"prompt": "a cat", "size": "64x64", "seed": 1, "lora": "tiny-demo"}, timeout=60)
        assert lora.status_code == 200, lora.text
        assert lora.json()["data"][0]["b64_json"] != r.json()["data"][0]["b64_json"]
    finally:
        _stop(proc)


def _stop(proc):
    for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):  # serve run in a background job ignores SIGINT
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
