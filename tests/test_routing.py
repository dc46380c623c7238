"""Size-aware routing between denoiser deployments (serve_app/routing.py, `AppConfig.denoiser_routes`):
the route choice, the config's checks, what each deployment runs on and warms. No Ray cluster."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from pydantic import ValidationError

from serve_app.config import AppConfig
from serve_app.routing import choose_route

LARGE = {"name": "large", "min_pixels": 1536 * 1536, "ulysses_degree": 2, "warmup_sizes": [[2048, 2048]],
         "deployment": {"num_replicas": 2, "ray_actor_options": {"num_gpus": 0.8}, "max_batch_size": 1}}
HUGE = {"name": "huge", "min_pixels": 2048 * 2048, "ulysses_degree": 2, "ring_degree": 2}


@dataclass
class _Route:
    name: str
    min_pixels: int


def test_the_largest_threshold_a_request_reaches_wins():
    routes = [_Route("huge", 2048 * 2048), _Route("large", 1536 * 1536)]  # in any order
    assert choose_route(1024 * 1024, routes) is None  # below every threshold: the main denoiser
    assert choose_route(1536 * 1536 - 1, routes) is None
    assert choose_route(1536 * 1536, routes).name == "large"  # a threshold is inclusive
    assert choose_route(2048 * 1536, routes).name == "large"
    assert choose_route(2048 * 2048, routes).name == "huge"
    assert choose_route(10**9, routes).name == "huge"
    assert choose_route(10**9, []) is None


def test_requests_route_by_pixels_not_by_side():
    cfg = AppConfig.model_validate({"denoiser_routes": [LARGE]})
    assert cfg.route_for(1024, 1024) is None
    assert cfg.route_for(2048, 1152).name == "large"  # 2.36 MP, no side at 1536
    assert cfg.route_for(2048, 1024) is None  # 2.1 MP
    assert [r.deployment_name for r in cfg.denoiser_routes] == ["Denoiser-large"]


def test_a_route_runs_on_its_own_degrees_warmup_and_options_and_shares_the_rest():
    cfg = AppConfig.model_validate({"denoiser": {"fp8": True, "compile": True, "default_steps": 6, "warmup_sizes": [[1024, 1024]]},
                                    "denoiser_deployment": {"ray_actor_options": {"num_gpus": 0.6}},
                                    "lora": {"enabled": True}, "model": {"source": "tiny"}, "denoiser_routes": [LARGE]})
    main, large = cfg.for_route(None), cfg.for_route("large")
    assert (main.denoiser.sp_degree, large.denoiser.sp_degree) == (1, 2)
    assert large.denoiser.warmup_sizes == [(2048, 2048)]
    assert (large.denoiser.fp8, large.denoiser.compile, large.denoiser.default_steps, large.lora.enabled) == (True, True, 6, True)
    opts = large.denoiser_deployment
    assert opts.max_batch_size == 1 and opts.serve_options()["num_replicas"] == 2
    assert opts.serve_options()["max_queued_requests"] == 64  # the denoiser's defaults under the route's block
    assert main.denoiser_deployment.actor_options() == {"num_gpus": 0.6}
    # a route's replicas (and its SP ranks) validate the config they get again
    for view in (main, large):
        assert AppConfig.model_validate(view.model_dump(mode="json")) == view and view.denoiser_routes == []
    with pytest.raises(KeyError, match="no denoiser route 'nope'"):
        cfg.for_route("nope")


def test_each_deployment_warms_only_the_sizes_it_serves():
    cfg = AppConfig.model_validate({"denoiser": {"warmup_sizes": [[1024, 1024]]}, "denoiser_routes": [
        {**LARGE, "warmup_sizes": [[1536, 1536], [2048, 1536]]}, {**HUGE, "warmup_sizes": [[2048, 2048]]}]})
    # the /health warm-up's smallest square is the main denoiser's alone; a route needs none of it
    assert cfg.dit_start_sizes(None) == [(1024, 1024), (64, 64)]
    assert cfg.dit_start_sizes("large") == [(1536, 1536), (2048, 1536)]
    assert cfg.dit_start_sizes("huge") == [(2048, 2048)]
    # the VAE decodes what every denoiser warms
    assert cfg.start_sizes() == [(1024, 1024), (64, 64), (1536, 1536), (2048, 1536), (2048, 2048)]
    # where the smallest accepted square itself reaches a route, that route warms it
    low = AppConfig.model_validate({"server": {"min_size": 32}, "denoiser_routes": [{"name": "a", "min_pixels": 48 * 48}]})
    assert (low.dit_start_sizes(None), low.dit_start_sizes("a")) == ([], [(64, 64)])


def test_a_route_may_not_warm_a_size_another_deployment_serves():
    with pytest.raises(ValidationError) as e:
        AppConfig.model_validate({"denoiser": {"warmup_sizes": [[2048, 2048], [512, 512]]},
                                  "denoiser_routes": [{**LARGE, "warmup_sizes": [[1024, 1024], [1536, 1536]]}, HUGE]})
    msg = str(e.value)
    assert "denoiser.warmup_sizes: 2048x2048 is served by route 'huge'; warm it there" in msg
    assert "denoiser_routes[0].warmup_sizes: 1024x1024 is served by the main denoiser; warm it there" in msg
    assert "512x512" not in msg and "1536x1536" not in msg


def test_route_thresholds_must_split_the_accepted_sizes():
    with pytest.raises(ValidationError) as e:
        AppConfig.model_validate({"server": {"min_size": 256, "max_size": 1024, "default_size": "512x512"}, "denoiser_routes": [
            {"name": "a", "min_pixels": 256 * 256}, {"name": "b", "min_pixels": 1024 * 1024 + 1},
            {"name": "a", "min_pixels": 512 * 512}, {"name": "c", "min_pixels": 512 * 512}]})
    msg = str(e.value)
    assert "denoiser_routes[0].min_pixels: 65536 takes even the smallest size the server accepts (65536 pixels)" in msg
    assert "denoiser_routes[1].min_pixels: 1048577 is above the largest size the server accepts (1048576 pixels)" in msg
    assert "denoiser_routes[2].name: 'a' is another route's too" in msg
    assert "denoiser_routes[3].min_pixels: 262144 is another route's too" in msg
    # the bounds themselves: just above the smallest size, exactly the largest
    AppConfig.model_validate({"server": {"min_size": 256, "max_size": 1024, "default_size": "512x512"}, "denoiser_routes": [
        {"name": "a", "min_pixels": 256 * 256 + 1}, {"name": "b", "min_pixels": 1024 * 1024}]})


def test_a_route_deployment_block_is_checked_against_serves_schema():
    with pytest.raises(ValidationError) as e:
        AppConfig.model_validate({"denoiser_routes": [
            {"name": "a", "min_pixels": 10**6, "deployment": {"num_replica": 2, "ray_actor_options": {"num_gpu": 1}}},
            {**LARGE, "deployment": {"placement_group_strategy": "PACK", "name": "x"}}]})
    msg = str(e.value)
    assert "denoiser_routes[0].deployment.num_replica: not a Ray Serve deployment option (did you mean num_replicas?)" in msg
    assert "denoiser_routes[0].deployment.ray_actor_options.num_gpu: not a key of Ray Serve's RayActorOptionsSchema" in msg
    assert "denoiser_routes[1].deployment.placement_group_strategy: set by serve_app/app.py" in msg  # an SP route's group is ours
    assert "denoiser_routes[1].deployment.name: set by serve_app/app.py" in msg
    with pytest.raises(ValidationError, match=r"denoiser_routes\.0\.deployment\.max_batch_size"):  # ours, typed
        AppConfig.model_validate({"denoiser_routes": [{"name": "a", "min_pixels": 10**6, "deployment": {"max_batch_size": 0}}]})
    with pytest.raises(ValidationError, match=r"denoiser_routes\[0\]\.deployment\.max_ongoing_requests: Input should be greater than 0"):
        AppConfig.model_validate({"denoiser_routes": [{"name": "a", "min_pixels": 10**6, "deployment": {"max_ongoing_requests": 0}}]})
    # Serve's scaling rule, per route; a single-GPU route may set its own placement group
    with pytest.raises(ValidationError, match=r"denoiser_routes\[0\]\.deployment: Manually setting num_replicas is not allowed"):
        AppConfig.model_validate({"denoiser_routes": [{"name": "a", "min_pixels": 10**6, "deployment": {
            "num_replicas": 1, "autoscaling_config": {"max_replicas": 2}}}]})
    AppConfig.model_validate({"denoiser_routes": [{"name": "a", "min_pixels": 10**6, "deployment": {"placement_group_strategy": "PACK"}}]})
    with pytest.raises(ValidationError, match="String should match pattern"):  # it names a Serve deployment
        AppConfig.model_validate({"denoiser_routes": [{"name": "a#b", "min_pixels": 10**6}]})


def test_each_route_gets_its_own_deployment_options_and_sp_group():
    from serve_app.app import STAGE_ENV_VARS, denoiser_options

    cfg = AppConfig.model_validate({"denoiser_deployment": {"ray_actor_options": {"num_gpus": 1}},
                                    "denoiser_routes": [{**LARGE, "deployment": {
                                        "autoscaling_config": {"min_replicas": 1, "max_replicas": 2},
                                        "ray_actor_options": {"num_gpus": 0.8, "accelerator_type": "H200"}}}]})
    main = denoiser_options(cfg.for_route(None))
    large = denoiser_options(cfg.for_route("large"), "Denoiser-large")
    assert main["name"] == "Denoiser" and main["ray_actor_options"]["num_gpus"] == 1 and "placement_group_bundles" not in main
    assert large["name"] == "Denoiser-large" and large["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 2}
    assert large["ray_actor_options"] == {"num_cpus": 1.0, "runtime_env": {"env_vars": STAGE_ENV_VARS}}
    assert large["placement_group_bundles"] == [{"CPU": 1.0}] + [{"CPU": 1.0, "GPU": 0.8, "accelerator_type:H200": 0.001}] * 2
    assert large["placement_group_strategy"] == "STRICT_PACK"


def test_no_routes_is_the_app_as_before():
    cfg = AppConfig.model_validate({"denoiser": {"warmup_sizes": [[1024, 1024]]}})
    assert cfg.denoiser_routes == []
    assert cfg.dit_start_sizes() == cfg.start_sizes() == [(1024, 1024), (64, 64)]
    assert cfg.for_route(None) == cfg
