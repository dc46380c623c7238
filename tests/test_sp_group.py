"""SPGroup on a local Ray cluster with pretend GPUs: rank actors in a STRICT_PACK placement group of
{"CPU": 1, "GPU": 1} bundles (a CPU-only torch, so each rank falls back to CPU + gloo), SP 2 and SP 4
against the single-process engine, health checks, and a killed rank detected within the timeout."""

from __future__ import annotations

import os

import pytest
import torch

from serve_app.config import AppConfig, DenoiserConfig, ModelConfig
from serve_app.engines.denoiser import DenoiseRequest, DenoiserEngine

SIZE, STEPS, ATOL = 64, 2, 1e-4
HEALTH_TIMEOUT_S = 10.0


@pytest.fixture(scope="module")
def ray_cluster(own_ray):
    import ray

    ray.init(
        num_cpus=4,
        num_gpus=4,
        include_dashboard=False,
        _temp_dir=f"/tmp/rsp{os.getpid()}",
        runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}},
    )
    yield ray
    ray.shutdown()


def _requests(cap_dim: int) -> list[DenoiseRequest]:
    g = torch.Generator().manual_seed(1)
    return [
        DenoiseRequest(embeds=torch.randn(n, cap_dim, generator=g), height=SIZE, width=SIZE, steps=STEPS, seed=s)
        for n, s in ((9, 11), (40, 12))  # different caption lengths: a masked batch
    ]


def _cfg(tiny_dir, **denoiser) -> AppConfig:
    return AppConfig(
        model=ModelConfig(source="tiny", tiny_dir=str(tiny_dir)),
        # the two requests' different caption lengths share each forward (a masked batch)
        denoiser=DenoiserConfig(collective_timeout_s=60, sp_same_caption_length_batches=False, **denoiser),
    )


@pytest.fixture(scope="module")
def reference(tiny_dir):
    eng = DenoiserEngine(_cfg(tiny_dir).model, DenoiserConfig(), device=torch.device("cpu"))
    return eng.denoise(_requests(eng.cap_feat_dim)), eng.cap_feat_dim


def _placement_group(ray, n):
    from ray.util.placement_group import placement_group, placement_group_table

    pg = placement_group([{"CPU": 1, "GPU": 1}] * n, strategy="STRICT_PACK")
    ray.get(pg.ready(), timeout=60)
    table = placement_group_table(pg)
    assert table["strategy"] == "STRICT_PACK" and table["state"] == "CREATED"
    assert len(table["bundles"]) == n
    assert all(b == {"CPU": 1.0, "GPU": 1.0} for b in table["bundles"].values())
    return pg


def _assert_matches(latents, reference):
    ref, _ = reference
    assert len(latents) == len(ref)
    for lat, r in zip(latents, ref):
        assert lat.device.type == "cpu" and lat.shape == r.shape
        assert (lat - r).abs().max().item() <= ATOL


def test_sp4_in_placement_group_matches_single(ray_cluster, tiny_dir, reference):
    from ray.util.placement_group import remove_placement_group

    from serve_app.sp.rank_group import SPGroup

    pg = _placement_group(ray_cluster, 4)
    group = SPGroup(_cfg(tiny_dir), 4, placement_group=pg)  # layout from the 6 heads: ulysses 2 x ring 2
    try:
        info = group.info()["ranks"]
        assert [i["rank"] for i in info] == [0, 1, 2, 3]
        assert {(i["sp"]["ulysses_degree"], i["sp"]["ring_degree"], i["sp"]["attention"], i["backend"]) for i in info} == {(2, 2, "usp", "gloo")}
        # Ray gave each rank its own (pretend) GPU; torch has no CUDA here, so they run on CPU
        assert sorted(str(i["gpu_ids"][0]) for i in info) == ["0", "1", "2", "3"]
        assert {i["device"] for i in info} == {"cpu"}
        _assert_matches(group.denoise(_requests(reference[1])), reference)
        group.check_health(HEALTH_TIMEOUT_S)
        assert group.stats()["forwards"] == STEPS
    finally:
        group.shutdown()
        remove_placement_group(pg)


def test_sp2_matches_single_and_a_killed_rank_fails_health(ray_cluster, tiny_dir, reference):
    from ray.util.placement_group import remove_placement_group

    from serve_app.sp.rank_group import SPGroup

    pg = _placement_group(ray_cluster, 2)
    group = SPGroup(_cfg(tiny_dir, ulysses_degree=2), placement_group=pg)
    try:
        assert group.n == 2
        _assert_matches(group.denoise(_requests(reference[1])), reference)
        group.check_health(HEALTH_TIMEOUT_S)

        ray_cluster.kill(group.workers[1])
        # check_health bounds its own wait by the timeout it is given: raising is the detection
        with pytest.raises((ray_cluster.exceptions.RayActorError, ray_cluster.exceptions.GetTimeoutError)):
            group.check_health(HEALTH_TIMEOUT_S)
    finally:
        group.shutdown()
        remove_placement_group(pg)
