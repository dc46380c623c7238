"""Placement on a real two-node Ray cluster, both nodes on this machine (`ray start` twice, own ports
and temp dirs): the head advertises 2 "H100" GPUs, the second node 2 "MI300X" GPUs (fake GPUs, real
Ray scheduling). Work asking for an accelerator type lands on that node; a STRICT_PACK placement
group of 2 GPU bundles (an SP2 denoiser) is never split across nodes; and the Serve app, with the
text encoder pinned to MI300X and the DiT to H100, puts each replica on the right node and answers
POST /v1/images/generations.

Both nodes are stopped in the fixture's teardown: SIGTERM (then SIGKILL) to the process group of
each `ray start --block` we launched, then any leftover process whose command line names our temp
dir, by pid. Never `ray stop`: other Ray clusters on this machine are not ours."""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.tiny_server import quick_drain

HEAD_PORT = 16380
SERVE_PORT = 18610
H100 = "H100"
MI300X = "AMD-Instinct-MI300X-OAM"
RAY = str(Path(sys.executable).with_name("ray"))

# Every port a node opens, distinct per node and away from Ray's defaults (other clusters here).
NODE_PORTS = [
    {"--node-manager-port": 16381, "--object-manager-port": 16382, "--metrics-export-port": 16383,
     "--dashboard-agent-listen-port": 16384, "--dashboard-agent-grpc-port": 16385, "--runtime-env-agent-port": 16386,
     "--min-worker-port": 16400, "--max-worker-port": 16499},
    {"--node-manager-port": 16391, "--object-manager-port": 16392, "--metrics-export-port": 16393,
     "--dashboard-agent-listen-port": 16394, "--dashboard-agent-grpc-port": 16395, "--runtime-env-agent-port": 16396,
     "--min-worker-port": 16500, "--max-worker-port": 16599},
]


def _env():
    env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0", HF_HUB_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false")
    env.pop("RAY_ADDRESS", None)
    return env


def _start_node(args: list[str], temp_dir: Path, log: Path) -> subprocess.Popen:
    cmd = [RAY, "start", "--block", "--disable-usage-stats", f"--temp-dir={temp_dir}", "--node-ip-address=127.0.0.1",
           "--num-cpus=2", "--num-gpus=2", "--object-store-memory=150000000", *args]
    return subprocess.Popen(cmd, env=_env(), stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)


def _stop(procs: list[subprocess.Popen], temp_root: str) -> None:
    for p in procs:
        try:
            os.killpg(p.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    # the daemons got the SIGTERM too; `ray start --block`'s own exit handler can take ~20 s, which a test
    # cluster has no use for: what is still up after a moment is killed
    deadline = time.time() + 3
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            pass
    for p in procs:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    # Ray daemons / workers that left our process groups but still carry our temp dir in argv.
    mine = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            if temp_root.encode() in (proc / "cmdline").read_bytes():
                mine.append(int(proc.name))
        except OSError:
            pass
    for pid in mine:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.fixture(scope="module")
def two_nodes(own_ray):
    import ray

    temp_root = tempfile.mkdtemp(prefix="serveapp-mn-")
    procs: list[subprocess.Popen] = []
    try:
        head_args = ["--head", f"--port={HEAD_PORT}", "--include-dashboard=false", "--ray-client-server-port=16387",
                     f"--resources={json.dumps({f'accelerator_type:{H100}': 2})}"]
        head_args += [f"{k}={v}" for k, v in NODE_PORTS[0].items()]
        procs.append(_start_node(head_args, Path(temp_root) / "head", Path(temp_root) / "head.log"))
        address = f"127.0.0.1:{HEAD_PORT}"
        _wait_for_gcs(address, procs[0], Path(temp_root) / "head.log")
        worker_args = [f"--address={address}", f"--resources={json.dumps({f'accelerator_type:{MI300X}': 2})}"]
        worker_args += [f"{k}={v}" for k, v in NODE_PORTS[1].items()]
        procs.append(_start_node(worker_args, Path(temp_root) / "worker", Path(temp_root) / "worker.log"))

        os.environ["RAY_AUTH_MODE"] = "disabled"
        ray.init(address=address, logging_level="ERROR", log_to_driver=False)
        deadline = time.time() + 60
        while len([n for n in ray.nodes() if n["Alive"]]) < 2:
            if time.time() > deadline or any(p.poll() is not None for p in procs):
                raise RuntimeError("second node did not join:\n" + (Path(temp_root) / "worker.log").read_text()[-3000:])
            time.sleep(0.5)
        nodes = {}
        for n in ray.nodes():
            if n["Alive"]:
                kind = H100 if f"accelerator_type:{H100}" in n["Resources"] else MI300X
                nodes[kind] = n["NodeID"]
        assert set(nodes) == {H100, MI300X}
        yield nodes
    finally:
        try:
            from ray import serve

            if ray.is_initialized():
                try:
                    serve.shutdown()
                except Exception:
                    pass
                ray.shutdown()
        finally:
            _stop(procs, temp_root)
            shutil.rmtree(temp_root, ignore_errors=True)


def _wait_for_gcs(address, proc, log, timeout=60):
    import socket

    host, port = address.split(":")
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("ray start --head exited:\n" + log.read_text()[-3000:])
        with socket.socket() as s:
            s.settimeout(0.5)
            if s.connect_ex((host, int(port))) == 0:
                return
        time.sleep(0.5)
    raise TimeoutError(f"GCS at {address}:\n" + log.read_text()[-3000:])


def _node_of_actor(actor_id_hex: str) -> str:
    # GCS actor table (the state API's list_actors needs the dashboard, which these nodes run without)
    import ray._private.state as state

    return state.state.actor_table(actor_id_hex)["Address"]["NodeID"]


def test_accelerator_type_picks_the_node(two_nodes):
    import ray

    @ray.remote(num_cpus=0.1, num_gpus=0.5)
    class Where:
        def node(self):
            return ray.get_runtime_context().get_node_id(), ray.get_gpu_ids()

    on_h100 = Where.options(accelerator_type=H100).remote()
    on_mi300x = Where.options(accelerator_type=MI300X).remote()
    by_resource = Where.options(resources={f"accelerator_type:{MI300X}": 0.001}).remote()
    (n1, g1), (n2, g2), (n3, _) = ray.get([on_h100.node.remote(), on_mi300x.node.remote(), by_resource.node.remote()], timeout=60)
    assert n1 == two_nodes[H100] and g1
    assert n2 == two_nodes[MI300X] and g2
    assert n3 == two_nodes[MI300X]
    for a in (on_h100, on_mi300x, by_resource):
        ray.kill(a)


def test_strict_pack_group_of_two_gpus_is_never_split(two_nodes):
    import ray
    from ray.util.placement_group import placement_group, placement_group_table, remove_placement_group

    @ray.remote(num_cpus=0.1, num_gpus=1)
    class Hold:
        def node(self):
            return ray.get_runtime_context().get_node_id()

    # one GPU busy on each node: 2 GPUs are free in the cluster, but never 2 on one node
    holders = [Hold.options(accelerator_type=acc).remote() for acc in (H100, MI300X)]
    ray.get([h.node.remote() for h in holders], timeout=60)
    pg = placement_group([{"CPU": 0.1, "GPU": 1}] * 2, strategy="STRICT_PACK")
    assert not pg.wait(2), "a STRICT_PACK group of 2 GPUs must not be placed across two nodes"
    # free the H100 node's GPU: now the whole group fits there, and only there
    ray.kill(holders[0])
    assert pg.wait(30)
    nodes = set(placement_group_table(pg)["bundles_to_node_id"].values())
    assert nodes == {two_nodes[H100]}
    remove_placement_group(pg)
    ray.kill(holders[1])

    # an SP2 group the way serve_app.app.denoiser_options asks for one: CPU driver bundle + 2 rank
    # bundles each carrying the accelerator type; it lands whole on the MI300X node when asked to
    bundles = [{"CPU": 0.1}] + [{"CPU": 0.1, "GPU": 1, f"accelerator_type:{MI300X}": 0.001}] * 2
    pgs = [placement_group(bundles, strategy="STRICT_PACK")]
    assert pgs[0].wait(30)
    assert set(placement_group_table(pgs[0])["bundles_to_node_id"].values()) == {two_nodes[MI300X]}
    # and two plain SP2 groups fill the two nodes, one each
    remove_placement_group(pgs[0])
    deadline = time.time() + 30  # Ray's view of the freed GPUs catches up
    while ray.available_resources().get("GPU", 0) != 4:
        assert time.time() < deadline, ray.available_resources()
        time.sleep(0.1)
    pgs = [placement_group([{"CPU": 0.1, "GPU": 1}] * 2, strategy="STRICT_PACK") for _ in range(2)]
    assert all(p.wait(30) for p in pgs)
    placed = [set(placement_group_table(p)["bundles_to_node_id"].values()) for p in pgs]
    assert all(len(s) == 1 for s in placed) and placed[0] != placed[1]
    for p in pgs:
        remove_placement_group(p)


def test_serve_app_replicas_land_on_their_accelerators(two_nodes, tiny_dir):
    import httpx
    from PIL import Image
    from ray import serve

    from serve_app.app import build_app

    args = {
        "model": {"source": "tiny", "device": "cpu", "tiny_dir": str(tiny_dir)},
        "server": {"max_size": 256, "default_size": "64x64", "request_timeout_s": 60},
        "text_encoder_deployment": {"ray_actor_options": {"num_cpus": 0.1, "num_gpus": 0.25, "accelerator_type": MI300X}},
        "denoiser_deployment": {"ray_actor_options": {"num_cpus": 0.1, "num_gpus": 0.5, "accelerator_type": H100}},
        "vae_deployment": {"ray_actor_options": {"num_cpus": 0.1, "num_gpus": 0.25, "accelerator_type": MI300X}},
        "ingress_deployment": {"ray_actor_options": {"num_cpus": 0.1}},
    }
    # one proxy: both nodes share 127.0.0.1, a proxy per node would fight over the port
    serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": SERVE_PORT})
    serve.run(build_app(quick_drain(args)), name="z-image", route_prefix="/", blocking=False)
    base = f"http://127.0.0.1:{SERVE_PORT}"
    deadline = time.time() + 150
    while True:
        try:
            if httpx.get(base + "/health", timeout=10).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if time.time() > deadline:
            raise TimeoutError(f"/health never 200; serve status: {serve.status()}")
        time.sleep(1)

    app = serve.status().applications["z-image"]
    assert app.status == "RUNNING", app
    expected = {"TextEncoder": two_nodes[MI300X], "VaeDecoder": two_nodes[MI300X], "Denoiser": two_nodes[H100]}
    import ray._private.state as state

    seen = {}
    for info in state.state.actor_table(None).values():
        name = info.get("Name") or ""  # Serve replica actors: SERVE_REPLICA::z-image#<Deployment>#<id>
        if info.get("State") == "ALIVE" and name.startswith("SERVE_REPLICA::z-image#"):
            seen[name.split("#")[1]] = info["Address"]["NodeID"]
    for deployment, node in expected.items():
        assert seen.get(deployment) == node, (deployment, seen)

    r = httpx.post(base + "/v1/images/generations", timeout=120,
                   json={"prompt": "a cat", "size": "64x64", "n": 1, "response_format": "b64_json"})
    assert r.status_code == 200, r.text
    item = r.json()["data"][0]
    assert Image.open(io.BytesIO(base64.b64decode(item["b64_json"]))).size == (64, 64)
    serve.delete("z-image")
