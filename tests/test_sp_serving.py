"""The Serve app with a sequence-parallel DiT, over real HTTP on a real local Ray cluster with pretend
GPUs (`num_gpus=4`; torch is CPU-only here, so every rank falls back to CPU + gloo), tiny model.

- An SP 4 group (ulysses 2 x ring 2, from the tiny model's 6 heads) of rank actors in a STRICT_PACK
  placement group of {"CPU": 1, "GPU": 1} bundles, held directly (no Serve): each rank its own pretend
  GPU, gloo, the single-process engine's latents for a masked batch, health checks. (A serving case of
  its own would run the same replica code with more bundles, for a minute of CI; tests/test_sp_engine.py
  checks the SP 4 arithmetic with key masks.)
- SP 2 (ulysses 2) answers `POST /v1/images/generations` with the SP 1 image, alone and in a batch of
  concurrent requests with different prompt lengths.
- The SP 2 app is routed by size (`denoiser_routes`, the fractions of configs/random-full-routed.yaml):
  64x64 to a single-rank main Denoiser, 96x96 and up to the SP 2 route Denoiser-large; plain, streamed
  and edit requests each reach only the deployment of their size, which serves the SP 1 image.
- The Denoiser replica's placement group, read back from Ray's table, is 1 CPU bundle + N GPU bundles,
  STRICT_PACK, and holds the N `SPRankWorker`s.
- The GPU fractions of the SP configs (configs/*-sp*.yaml) reserve on a host of that many GPUs in
  either order.
- A rank worker whose process is SIGKILLed (what a crashed GPU process looks like) fails the request in
  flight at once with an OpenAI-shaped 5xx, Serve's health check replaces the replica with a new SP
  group, and the app then serves the SP 1 image again.

One Ray cluster for the module; the routed SP 2 app, deployed when a test first needs it.
The SP 1 reference is the in-process `StagedPipeline` at one torch thread, as in the replicas (the
same code the SP 1 app runs: tests/test_serving.py shows them bit-identical).
"""

from __future__ import annotations

import base64
import concurrent.futures
import io
import json
import os
import signal
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml
from PIL import Image

from tests.tiny_server import quick_drain

ROOT = Path(__file__).resolve().parent.parent
PORT = 18470
DASHBOARD_PORT = 18471  # the state API (list_actors / list_tasks) goes through the dashboard
# asked of this module's cluster by address: found automatically, any other Ray on the host is ambiguous
STATE_API = f"http://127.0.0.1:{DASHBOARD_PORT}"
BASE = f"http://127.0.0.1:{PORT}"
SIZE, STEPS = 64, 2
# the routed app's SP 2 route serves this size and up (the main single-rank denoiser: below it)
LARGE_SIZE = 96
ROUTE = "large"
# the SP process group's timeout: a request failing within it after a rank's death is failing fast
COLLECTIVE_TIMEOUT_S = 60
# different prompt lengths (tokens 3 .. ~40): a masked DiT batch when they arrive together
CASES = [
    ("a red fox", 11),
    ("a lighthouse at dawn", 12),
    ("an old stone lighthouse on a cliff at dawn, waves breaking below, gulls circling, warm light", 13),
    ("a bowl of ramen with a soft egg, steam rising, chopsticks resting on the rim, on a dark wooden "
     "table in a quiet late-night shop, neon reflections in the window behind", 14),
]
# Pixels of an SP image against the SP 1 image. The SP latents equal SP 1's to ~1e-6 (fp32, another
# reduction order in the sharded attention and the batch's padding); after the VAE and the rounding to
# uint8 a value next to a rounding boundary can land one level away, so: at most 1 level, on at most
# 0.25% of the 64*64*3 = 12288 values (30). Measured here (SP 2 and SP 4, alone and batched): max 1
# level on 0 to 2 values per image.
MAX_LEVEL_DIFF = 1
MAX_DIFF_FRACTION = 0.0025

VARIANTS = {
    # routed: a single-rank main denoiser below LARGE_SIZE², an SP 2 route from it on; the GPU fractions of
    # configs/random-full-routed.yaml: main and ranks 0.8 each, text encoder / VAE 0.1 each
    "sp2": {"ulysses_degree": 1, "ring_degree": 1},
}
# the deployment holding the variant's SP group, and the size it serves
SP_DEPLOYMENT = {"sp2": f"Denoiser-{ROUTE}"}
SP_SIZE = {"sp2": LARGE_SIZE}
ROUTED_CONFIG = "configs/random-full-routed.yaml"
SP_CONFIGS = [("configs/random-full-sp2.yaml", 2), ("configs/random-full-sp4.yaml", 4), ("configs/z-image-turbo-sp2.yaml", 2),
              (ROUTED_CONFIG, 4)]


def _config_args(rel: str) -> dict:
    return yaml.safe_load((ROOT / rel).read_text())["applications"][0]["args"]


def sp_args(tiny_dir, variant: str) -> dict:
    u_r = VARIANTS[variant]
    args = {
        "model": {"source": "tiny", "device": "cpu", "tiny_dir": str(tiny_dir)},
        # a long collective timeout, so that a request that fails within seconds of a rank's death is
        # failing fast, not waiting for the process group's timeout
        "denoiser": {**u_r, "collective_timeout_s": COLLECTIVE_TIMEOUT_S, "max_steps": 1000},
        "server": {"max_size": 512, "default_size": "64x64", "max_inflight_images": 16, "request_timeout_s": 120},
        "text_encoder_deployment": {"ray_actor_options": {"num_cpus": 0.1}, "max_batch_size": 8, "batch_wait_timeout_s": 0.05},
        "denoiser_deployment": {
            "ray_actor_options": {"num_cpus": 0.1}, "max_batch_size": 4, "batch_wait_timeout_s": 0.3, "max_ongoing_requests": 8,
            "max_queued_requests": 32, "health_check_period_s": 1, "health_check_timeout_s": 10,
        },
        "vae_deployment": {"ray_actor_options": {"num_cpus": 0.1}, "max_batch_size": 4},
        "ingress_deployment": {"ray_actor_options": {"num_cpus": 0.1}, "max_ongoing_requests": 64, "max_queued_requests": 64},
    }
    quick_drain(args)  # before the sp2 route copies the denoiser's block
    if variant == "sp2":
        cfg = _config_args(ROUTED_CONFIG)
        for stage in ("text_encoder_deployment", "denoiser_deployment", "vae_deployment"):
            args[stage]["ray_actor_options"]["num_gpus"] = cfg[stage]["ray_actor_options"]["num_gpus"]
        # the main denoiser's block, with the routed config's rank fractions; warmed at the size it serves
        route = {**args["denoiser_deployment"], "ray_actor_options": {"num_cpus": 0.1, "num_gpus": _rank_gpus("sp2")}}
        args["denoiser_routes"] = [{"name": ROUTE, "min_pixels": LARGE_SIZE * LARGE_SIZE, "ulysses_degree": 2, "ring_degree": 1,
                                    "warmup_sizes": [[LARGE_SIZE, LARGE_SIZE]], "deployment": route}]
    return args


def _rank_gpus(variant: str) -> float:
    return _config_args(ROUTED_CONFIG)["denoiser_routes"][0]["deployment"]["ray_actor_options"]["num_gpus"] if variant == "sp2" else 1.0


# --- cluster, apps, reference ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster(own_ray):
    import ray
    from ray import serve

    ray.init(
        num_cpus=8,
        num_gpus=4,
        include_dashboard=True,
        dashboard_port=DASHBOARD_PORT,
        _temp_dir=f"/tmp/rspsv{os.getpid()}",
        runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}},
    )
    serve.start(http_options={"host": "127.0.0.1", "port": PORT})
    yield ray
    serve.shutdown()
    ray.shutdown()


class _Apps:
    """One SP app at a time, named z-image-<variant>, deployed when first asked for."""

    def __init__(self, tiny_dir):
        self.tiny_dir = tiny_dir
        self.current: str | None = None

    def use(self, variant: str) -> str:
        from ray import serve

        from serve_app.app import build_app

        if self.current != variant:
            self.clear()
            name = f"z-image-{variant}"
            serve.run(build_app(sp_args(self.tiny_dir, variant)), name=name, route_prefix="/", blocking=False)
            self.current = variant
            _wait_healthy(timeout=240)
        return f"z-image-{variant}"

    def clear(self) -> None:
        from ray import serve

        if self.current is not None:
            serve.delete(f"z-image-{self.current}")
            self.current = None


@pytest.fixture(scope="module")
def apps(cluster, tiny_dir):
    a = _Apps(tiny_dir)
    yield a
    a.clear()


@pytest.fixture(scope="module")
def reference(tiny_dir):
    """SP 1 pixels per (prompt, seed, side), each generated alone."""
    import torch

    from serve_app.config import AppConfig
    from serve_app.pipeline import StagedPipeline

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the replicas (Ray gives a fractional-CPU actor one thread)
    try:
        pipe = StagedPipeline(AppConfig.model_validate({"model": sp_args(tiny_dir, "sp2")["model"]}))
        return {(p, s, side): pipe.generate([p], [s], height=side, width=side, steps=STEPS)[0].pixels.numpy()
                for p, s in CASES for side in (SIZE, LARGE_SIZE)}
    finally:
        torch.set_num_threads(threads)


def _wait_healthy(timeout=180.0):
    from ray import serve

    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if httpx.get(BASE + "/health", timeout=30).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise TimeoutError(f"/health never 200; serve status: {serve.status()}")


def _post(body, timeout=120.0):
    return httpx.post(BASE + "/v1/images/generations", json=body, timeout=timeout)


def _body(prompt, seed, side=SIZE, **kw):
    return {"prompt": prompt, "seed": seed, "size": f"{side}x{side}", "num_inference_steps": STEPS, **kw}


def _pixels(r: httpx.Response) -> np.ndarray:
    assert r.status_code == 200, r.text
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(r.json()["data"][0]["b64_json"]))).convert("RGB"))


def _assert_close(got: np.ndarray, ref: np.ndarray, what: str, side: int = SIZE) -> tuple[int, int]:
    assert got.shape == ref.shape == (side, side, 3), what
    diff = np.abs(got.astype(np.int16) - ref.astype(np.int16))
    worst, n_off = int(diff.max()), int((diff > 0).sum())
    assert worst <= MAX_LEVEL_DIFF and n_off <= MAX_DIFF_FRACTION * diff.size, (
        f"{what}: max |diff| {worst} levels on {n_off} of {diff.size} values")
    return worst, n_off


def _stats() -> dict:
    return httpx.get(BASE + "/v1/stats", timeout=30).json()


# --- Ray's view: the replica's placement group and its rank workers ------------------------------------


def _denoiser_group(app: str, deployment: str) -> dict:
    """The CREATED placement group of the app's `deployment` replica (Serve names it after the replica
    actor, SERVE_REPLICA::<app>#<deployment>#<id>)."""
    from ray.util.placement_group import placement_group_table

    groups = [t for t in placement_group_table().values()
              if t["name"].startswith(f"SERVE_REPLICA::{app}#{deployment}#") and t["state"] == "CREATED"]
    assert len(groups) == 1, groups
    return groups[0]


def _rank_workers() -> list:
    from ray.util.state import list_actors

    return list_actors(STATE_API, filters=[("class_name", "=", "SPRankWorker"), ("state", "=", "ALIVE")], detail=True)


def _assert_group(app: str, n: int, rank_gpus: float, deployment: str = "Denoiser") -> dict:
    group = _denoiser_group(app, deployment)
    assert group["strategy"] == "STRICT_PACK"
    bundles = [group["bundles"][i] for i in sorted(group["bundles"])]
    assert bundles == [{"CPU": 1.0}] + [{"CPU": 1.0, "GPU": rank_gpus}] * n, bundles
    assert len(set(group["bundles_to_node_id"].values())) == 1
    ranks = _rank_workers()
    assert len(ranks) == n and {a.placement_group_id for a in ranks} == {group["placement_group_id"]}, ranks
    return group


# --- the tests -----------------------------------------------------------------------------------------


def test_sp4_group_in_a_placement_group_matches_the_single_process_engine(cluster, apps, tiny_dir):
    """SPGroup held directly: 4 rank actors in a STRICT_PACK group of {"CPU": 1, "GPU": 1} bundles (whole
    pretend GPUs, so before any app reserves its fractions), a batch of two caption lengths (a masked
    batch) against the single-process engine's latents."""
    import torch
    from ray.util.placement_group import placement_group, placement_group_table, remove_placement_group

    from serve_app.config import AppConfig, DenoiserConfig, ModelConfig
    from serve_app.engines.denoiser import DenoiseRequest, DenoiserEngine
    from serve_app.sp.rank_group import SPGroup

    apps.clear()
    model = ModelConfig(source="tiny", tiny_dir=str(tiny_dir))
    # the two requests' different caption lengths share each forward (a masked batch)
    cfg = AppConfig(model=model, denoiser=DenoiserConfig(collective_timeout_s=60, sp_same_caption_length_batches=False))
    reference = DenoiserEngine(model, DenoiserConfig(), device=torch.device("cpu"))
    g = torch.Generator().manual_seed(1)
    requests = [DenoiseRequest(embeds=torch.randn(n, reference.cap_feat_dim, generator=g), height=SIZE, width=SIZE, steps=STEPS, seed=s)
                for n, s in ((9, 11), (40, 12))]
    expected = reference.denoise(requests)

    pg = placement_group([{"CPU": 1, "GPU": 1}] * 4, strategy="STRICT_PACK")
    cluster.get(pg.ready(), timeout=60)
    table = placement_group_table(pg)
    assert table["strategy"] == "STRICT_PACK" and table["state"] == "CREATED"
    assert list(table["bundles"].values()) == [{"CPU": 1.0, "GPU": 1.0}] * 4
    group = SPGroup(cfg, 4, placement_group=pg)  # layout from the 6 heads: ulysses 2 x ring 2
    try:
        info = group.info()["ranks"]
        assert [i["rank"] for i in info] == [0, 1, 2, 3]
        assert {(i["sp"]["ulysses_degree"], i["sp"]["ring_degree"], i["sp"]["attention"], i["backend"]) for i in info} == {(2, 2, "usp", "gloo")}
        # Ray gave each rank its own (pretend) GPU; torch has no CUDA here, so they run on CPU
        assert sorted(str(i["gpu_ids"][0]) for i in info) == ["0", "1", "2", "3"]
        assert {i["device"] for i in info} == {"cpu"}
        latents = group.denoise(requests)
        assert len(latents) == len(expected)
        for lat, ref in zip(latents, expected):
            assert lat.device.type == "cpu" and lat.shape == ref.shape
            assert (lat - ref).abs().max().item() <= 1e-4  # fp32 latents after 2 steps (seen: ~1e-6)
        group.check_health(10.0)
        assert group.stats()["forwards"] == STEPS
    finally:
        group.shutdown()
        remove_placement_group(pg)


def test_sp_config_gpu_fractions_reserve_on_their_host_in_any_order(cluster, apps):
    """Each SP config's Denoiser groups (every replica of every denoiser deployment: a routed config's
    single-GPU main replicas too) and the text encoder's / VAE's GPU fractions, reserved on a host of the
    config's GPU count (the cluster's 4 pretend GPUs, minus whole GPUs held aside), text encoder and VAE
    first or last. A placement-group bundle takes its GPU fraction from one GPU, as an actor does.
    Whole-GPU ranks would not leave the text encoder a GPU on a 2-GPU host."""
    from ray.util.placement_group import placement_group, remove_placement_group

    from serve_app.app import denoiser_options, deployment_options
    from serve_app.config import AppConfig

    apps.clear()

    def tiny_cpu(bundle: dict) -> dict:  # only the GPUs are under test; the test cluster has 8 CPUs
        return {k: (0.01 if k == "CPU" else v) for k, v in bundle.items()}

    def wait_gpus_available(n):  # Ray's view of the reservations catches up with them
        deadline = time.time() + 30
        while cluster.available_resources().get("GPU", 0) != n:
            assert time.time() < deadline, cluster.available_resources()
            time.sleep(0.2)

    def wait_all_gpus_free():
        wait_gpus_available(4)

    def denoiser_reservations(cfg: AppConfig) -> list[tuple[list[dict], str]]:
        """(bundles, strategy) per replica of each denoiser deployment: an SP group, or one actor."""
        out = []
        for route in [None] + [r.name for r in cfg.denoiser_routes]:
            opts = denoiser_options(cfg.for_route(route))
            one = ([tiny_cpu(b) for b in opts["placement_group_bundles"]], "STRICT_PACK") if "placement_group_bundles" in opts else (
                [{"CPU": 0.01, "GPU": opts["ray_actor_options"]["num_gpus"]}], "PACK")
            out += [one] * opts["num_replicas"]
        return out

    for rel, host_gpus in SP_CONFIGS:
        cfg = AppConfig.model_validate(_config_args(rel))
        dns = denoiser_reservations(cfg)
        assert any(strategy == "STRICT_PACK" for _, strategy in dns), rel
        others = [{"CPU": 0.01, "GPU": deployment_options(o, "x")["ray_actor_options"]["num_gpus"]}
                  for o in (cfg.text_encoder_deployment, cfg.vae_deployment)]
        assert all(0 < o["GPU"] < 1 for o in others), (rel, others)
        for others_first in (True, False):
            wait_all_gpus_free()
            held = [placement_group([{"GPU": 1}] * (4 - host_gpus))] if host_gpus < 4 else []
            assert all(h.wait(30) for h in held)
            pgs = [placement_group([b]) for b in others] if others_first else []
            assert all(p.wait(30) for p in pgs)
            for bundles, strategy in dns:
                pgs.append(placement_group(bundles, strategy=strategy))
                assert pgs[-1].wait(30), f"{rel}: the denoisers' {dns} do not fit on {host_gpus} GPUs after the text encoder and VAE"
            if not others_first:
                pgs += [placement_group([b]) for b in others]
                assert all(p.wait(30) for p in pgs[-2:]), f"{rel}: no GPU left for the text encoder / VAE"
            for p in pgs + held:
                remove_placement_group(p)

    # the control: whole-GPU ranks on a 2-GPU host leave no GPU for the text encoder
    wait_all_gpus_free()
    held = placement_group([{"GPU": 1}] * 2)
    assert held.wait(30)
    whole = placement_group([{"CPU": 0.01}] + [{"CPU": 0.01, "GPU": 1}] * 2, strategy="STRICT_PACK")
    assert whole.wait(30)
    wait_gpus_available(0)  # not even a fraction of a GPU is left for the text encoder
    te = placement_group([{"CPU": 0.01, "GPU": 0.1}])
    remove_placement_group(whole)
    assert te.wait(30)  # and the ranks' whole GPUs were what it lacked
    for p in (te, held):
        remove_placement_group(p)


def _sp_stats(variant: str) -> dict:
    """The /v1/stats of the deployment holding the variant's SP group."""
    stats = _stats()
    return stats["denoiser"] if SP_DEPLOYMENT[variant] == "Denoiser" else stats["denoiser_routes"][ROUTE]


def _check_images(variant: str, reference: dict) -> None:
    """Alone, then all CASES at once (a batch of different prompt lengths), at the size the SP group
    serves: each the SP 1 image."""
    prompt, seed = CASES[0]
    side = SP_SIZE[variant]
    measured = [_assert_close(_pixels(_post(_body(prompt, seed, side))), reference[(prompt, seed, side)], f"{variant} alone", side)]
    before = _sp_stats(variant)
    with concurrent.futures.ThreadPoolExecutor(len(CASES)) as pool:
        responses = list(pool.map(lambda c: _post(_body(*c, side)), CASES))
    for (prompt, seed), r in zip(CASES, responses):
        measured.append(_assert_close(_pixels(r), reference[(prompt, seed, side)], f"{variant} batched {prompt[:20]!r}", side))
    after = _sp_stats(variant)
    assert after["forwards"] - before["forwards"] < len(CASES) * STEPS, (before, after)  # they shared forwards
    print(f"{variant}: (max |diff|, values off) per image vs SP 1: {measured}")


@pytest.mark.parametrize("variant, n", [("sp2", 2)])
def test_sp_replica_holds_one_strict_pack_group_and_serves_the_sp1_image(apps, reference, variant, n):
    app = apps.use(variant)
    _assert_group(app, n, _rank_gpus(variant), SP_DEPLOYMENT[variant])  # 1 + n bundles, STRICT_PACK, n live ranks in it
    _check_images(variant, reference)


def _requests_per_deployment() -> dict[str, int]:
    """DiT requests each denoiser deployment of the routed app has served, from /v1/stats."""
    stats = _stats()
    return {"Denoiser": stats["denoiser"]["requests"], **{f"Denoiser-{n}": s["requests"] for n, s in stats["denoiser_routes"].items()}}


def _completed_events(r: httpx.Response) -> list[dict]:
    """The `*.completed` events of a Server-Sent Events answer."""
    assert r.status_code == 200, r.text
    events = [json.loads(line[5:]) for line in r.text.splitlines() if line.startswith("data:")]
    assert not [e for e in events if e["type"] == "error"], events
    return [e for e in events if e["type"].endswith(".completed")]


def test_routed_app_sends_each_size_to_its_own_denoiser(apps, reference):
    """One app, two denoiser deployments: 64x64 to the single-rank main Denoiser, 96x96 to the SP 2 route
    Denoiser-large, for a plain, a streamed and an edit request. Each request counts on the deployment
    of its size only, its timings name that deployment, and both sizes are the SP 1 image."""
    apps.use("sp2")
    stats = _stats()
    # /health waited for every deployment, the route's included; each runs its own layout
    assert set(stats["ingress"]["readiness"]["stages"]) == {"TextEncoder", "Denoiser", SP_DEPLOYMENT["sp2"], "VaeDecoder"}
    assert stats["denoiser"]["engine"]["sp"] is None
    assert stats["denoiser_routes"][ROUTE]["engine"]["sp"]["ulysses_degree"] == 2

    def served_by(expected: str, send) -> httpx.Response:
        before = _requests_per_deployment()
        r = send()
        after = _requests_per_deployment()
        assert {k: after[k] - before[k] for k in after} == {k: int(k == expected) for k in after}, (before, after)
        return r

    prompt, seed = CASES[1]
    for side, deployment in ((SIZE, "Denoiser"), (LARGE_SIZE, SP_DEPLOYMENT["sp2"])):
        r = served_by(deployment, lambda: _post(_body(prompt, seed, side)))
        assert r.json()["data"][0]["timings"]["denoiser_deployment"] == deployment
        _assert_close(_pixels(r), reference[(prompt, seed, side)], f"routed {side}x{side}", side)

    # streamed (an SP replica reports its queue position and the final image): the same route, the same image
    r = served_by(SP_DEPLOYMENT["sp2"], lambda: _post(_body(prompt, seed, LARGE_SIZE, stream=True)))
    [done] = _completed_events(r)
    assert done["timings"]["denoiser_deployment"] == SP_DEPLOYMENT["sp2"]
    got = np.asarray(Image.open(io.BytesIO(base64.b64decode(done["b64_json"]))).convert("RGB"))
    _assert_close(got, reference[(prompt, seed, LARGE_SIZE)], "routed streamed", LARGE_SIZE)

    # an edit goes by its output size too
    photo = io.BytesIO()
    Image.new("RGB", (LARGE_SIZE, LARGE_SIZE), (120, 80, 40)).save(photo, format="PNG")
    for side, deployment in ((LARGE_SIZE, SP_DEPLOYMENT["sp2"]), (SIZE, "Denoiser")):
        data = {"prompt": prompt, "seed": str(seed), "size": f"{side}x{side}", "num_inference_steps": str(STEPS), "strength": "0.5"}
        r = served_by(deployment, lambda: httpx.post(BASE + "/v1/images/edits", data=data, files={"image": ("p.png", photo.getvalue(), "image/png")},
                                                      timeout=120))
        assert r.status_code == 200, r.text
        assert r.json()["data"][0]["timings"]["denoiser_deployment"] == deployment


def test_sp2_killed_rank_fails_the_request_in_flight_and_serve_replaces_the_group(apps, reference):
    from ray import serve
    from ray.util.state import list_tasks

    app = apps.use("sp2")
    old_group = _assert_group(app, 2, _rank_gpus("sp2"), SP_DEPLOYMENT["sp2"])
    old = {a.actor_id: a.pid for a in _rank_workers()}

    # A long denoise (512x512, 600 steps: tens of seconds here); kill a rank once both ranks run it.
    def denoise_tasks(*filters):
        return list_tasks(STATE_API, filters=[("func_or_class_name", "=", "SPRankWorker.denoise"), *filters], limit=10_000)

    earlier = {t.task_id for t in denoise_tasks()}
    long_body = {"prompt": "a long one", "seed": 5, "size": "512x512", "num_inference_steps": 600}
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        fut = pool.submit(_post, long_body, 120.0)
        deadline = time.time() + 60
        while True:
            if len([t for t in denoise_tasks(("state", "=", "RUNNING")) if t.task_id not in earlier]) == 2:
                break
            assert not fut.done(), fut.result().text
            assert time.time() < deadline, "the long request never reached the ranks"
            time.sleep(0.3)
        victim = _rank_workers()[-1]
        os.kill(victim.pid, signal.SIGKILL)  # a pid of our own cluster's rank actor, from Ray's state API
        t_kill = time.monotonic()
        # A fast failure: the answer comes within the collective timeout (a request that waited for the
        # survivor's collective to time out would not), and it is the dead rank's error (503 worker_died,
        # from its RayActorError), not the survivor's timed-out collective (a task error: 500) nor a
        # finished denoise (200).
        r = fut.result(timeout=COLLECTIVE_TIMEOUT_S)
        failed_after = time.monotonic() - t_kill  # reported below, not asserted on
    assert r.status_code == 503, r.text
    err = r.json()["error"]
    assert err["code"] == "worker_died" and err["type"] == "server_error" and "retry" in err["message"], err

    # Serve's health check (every 1 s: SPGroup.check_health pings every rank) fails, the replica is
    # replaced, and with it its placement group and the whole SP group.
    deadline = time.time() + 120
    while True:
        ranks = _rank_workers()
        st = serve.status().applications.get(app)
        dn = st.deployments.get(SP_DEPLOYMENT["sp2"]) if st else None
        if (len(ranks) == 2 and not {a.actor_id for a in ranks} & set(old) and dn is not None
                and dn.status == "HEALTHY" and st.status == "RUNNING"):
            break
        assert time.time() < deadline, (ranks, st)
        time.sleep(0.5)
    new_group = _assert_group(app, 2, _rank_gpus("sp2"), SP_DEPLOYMENT["sp2"])
    assert new_group["placement_group_id"] != old_group["placement_group_id"]
    assert not {a.pid for a in ranks} & set(old.values())
    for pid in old.values():  # the surviving rank went with its replica
        deadline = time.time() + 30
        while _pid_alive(pid):
            assert time.time() < deadline, f"old rank process {pid} still alive"
            time.sleep(0.5)

    _wait_healthy(timeout=60)
    assert _stats()["ingress"]["worker_died_503"] >= 1
    prompt, seed = CASES[2]
    worst, n_off = _assert_close(_pixels(_post(_body(prompt, seed, LARGE_SIZE))), reference[(prompt, seed, LARGE_SIZE)],
                                 "sp2 after replacement", LARGE_SIZE)
    print(f"sp2: request failed {failed_after:.2f} s after the kill with {r.status_code}: {err['message'][:120]}; "
          f"after replacement (max |diff|, values off) = {(worst, n_off)}")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie (not yet reaped) counts as gone
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False
