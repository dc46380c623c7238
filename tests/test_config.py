import copy

import pytest
from pydantic import ValidationError

from serve_app.config import AppConfig


def test_unknown_key_is_named():
    with pytest.raises(ValidationError) as e:
        AppConfig.model_validate({"denoiser": {"ulysses_degre": 2}})
    assert "ulysses_degre" in str(e.value)


def test_defaults_are_turbo():
    cfg = AppConfig()
    assert cfg.denoiser.default_steps == 8 and cfg.server.default_size == "1024x1024"
    assert cfg.denoiser.sp_degree == 1


def test_scaling_modes_exclusive():
    # Serve's own schema refuses both; neither gets our num_replicas 1
    with pytest.raises(ValidationError, match="denoiser_deployment: Manually setting num_replicas is not allowed when autoscaling_config"):
        AppConfig.model_validate({"denoiser_deployment": {"num_replicas": 1, "autoscaling_config": {"max_replicas": 2}}})
    cfg = AppConfig.model_validate({"denoiser_deployment": {"autoscaling_config": {"max_replicas": 2}}})
    assert "num_replicas" not in cfg.denoiser_deployment.serve_options()
    assert cfg.vae_deployment.serve_options()["num_replicas"] == 1


def test_unknown_serve_option_is_named():
    with pytest.raises(ValidationError, match=r"denoiser_deployment\.num_replicass: not a Ray Serve deployment option"):
        AppConfig.model_validate({"denoiser_deployment": {"num_replicass": 2}})
    # the key Serve's schema would drop, one level down, and the old flat spelling
    with pytest.raises(ValidationError) as e:
        AppConfig.model_validate({"denoiser_deployment": {"ray_actor_options": {"num_gpu": 1}},
                                  "vae_deployment": {"num_gpus": 0.2},
                                  "text_encoder_deployment": {"autoscaling_config": {"max_replica": 2}}})
    msg = str(e.value)
    assert "denoiser_deployment.ray_actor_options.num_gpu: not a key of Ray Serve's RayActorOptionsSchema" in msg
    assert "vae_deployment.num_gpus: not a Ray Serve deployment option" in msg
    assert "text_encoder_deployment.autoscaling_config.max_replica: not a key of Ray Serve's AutoscalingConfig" in msg


def test_wrong_serve_value_is_named():
    with pytest.raises(ValidationError, match=r"ingress_deployment\.max_ongoing_requests: Input should be greater than 0"):
        AppConfig.model_validate({"ingress_deployment": {"max_ongoing_requests": 0}})
    with pytest.raises(ValidationError, match=r"denoiser_deployment\.ray_actor_options\.num_gpus: Input should be greater"):
        AppConfig.model_validate({"denoiser_deployment": {"ray_actor_options": {"num_gpus": -1}}})
    with pytest.raises(ValidationError, match=r"denoiser_deployment\.autoscaling_config\.max_replicas: Input should be greater than 0"):
        AppConfig.model_validate({"denoiser_deployment": {"autoscaling_config": {"max_replicas": 0}}})
    with pytest.raises(ValidationError, match=r"denoiser_deployment\.max_batch_size"):  # ours, still typed
        AppConfig.model_validate({"denoiser_deployment": {"max_batch_size": 0}})


def test_keys_the_app_sets_are_refused():
    with pytest.raises(ValidationError, match=r"vae_deployment\.name: set by serve_app/app.py"):
        AppConfig.model_validate({"vae_deployment": {"name": "Vae"}})
    sp = {"denoiser": {"ulysses_degree": 2}, "denoiser_deployment": {"placement_group_strategy": "PACK"}}
    with pytest.raises(ValidationError, match=r"denoiser_deployment\.placement_group_strategy: set by serve_app/app.py"):
        AppConfig.model_validate(sp)
    AppConfig.model_validate({"denoiser_deployment": {"placement_group_strategy": "PACK"}})  # not SP: the user's own


def test_serve_options_reach_options_unchanged():
    from serve_app.app import STAGE_ENV_VARS, denoiser_options, deployment_options

    block = {
        "num_replicas": 2,
        "max_ongoing_requests": 7,
        "graceful_shutdown_timeout_s": 5.0,
        "health_check_period_s": 3.0,
        "ray_actor_options": {"num_cpus": 2, "num_gpus": 0.5, "accelerator_type": "H100", "memory": 2**30,
                              "resources": {"custom": 1}, "runtime_env": {"env_vars": {"A": "1"}}},
    }
    given = copy.deepcopy(block)
    cfg = AppConfig.model_validate({"vae_deployment": {**block, "max_batch_size": 2, "batch_wait_timeout_s": 0.5}})
    assert (cfg.vae_deployment.max_batch_size, cfg.vae_deployment.batch_wait_timeout_s) == (2, 0.5)
    out = deployment_options(cfg.vae_deployment, "VaeDecoder")
    expected = copy.deepcopy(given)
    expected["ray_actor_options"]["runtime_env"]["env_vars"] = {**STAGE_ENV_VARS, "A": "1"}
    # the block as given, plus the name, the stage environment and our default under what was not given
    assert out == {"name": "VaeDecoder", "max_queued_requests": 64, **expected}
    assert block == given  # nothing wrote into the config
    # our defaults alone; the ingress has its own
    assert deployment_options(AppConfig().denoiser_deployment, "Denoiser") == {
        "name": "Denoiser", "max_ongoing_requests": 16, "max_queued_requests": 64, "num_replicas": 1,
        "graceful_shutdown_timeout_s": 300.0,  # server.request_timeout_s: in-flight work may finish on shutdown
        "ray_actor_options": {"runtime_env": {"env_vars": STAGE_ENV_VARS}}}
    ingress = deployment_options(AppConfig.model_validate({"ingress_deployment": {"max_queued_requests": 8}}).ingress_deployment, "Ingress")
    assert (ingress["max_ongoing_requests"], ingress["max_queued_requests"]) == (256, 8)
    # what Serve itself accepts: the dict goes through Deployment.options()
    from serve_app.deployments.vae import VaeDecoderDeployment

    d = VaeDecoderDeployment.options(**out)
    assert (d.name, d.num_replicas, d.max_ongoing_requests, d.ray_actor_options["accelerator_type"]) == ("VaeDecoder", 2, 7, "H100")
    # an SP denoiser: the stage's GPUs and chip are each rank's bundle, the replica keeps 1 CPU
    sp = AppConfig.model_validate({"denoiser": {"ulysses_degree": 2}, "denoiser_deployment": {
        "ray_actor_options": {"num_cpus": 2, "num_gpus": 0.8, "accelerator_type": "H100"}, "autoscaling_config": {"max_replicas": 3}}})
    dn = denoiser_options(sp)
    assert dn["ray_actor_options"] == {"num_cpus": 1.0, "runtime_env": {"env_vars": STAGE_ENV_VARS}}
    assert dn["placement_group_bundles"] == [{"CPU": 1.0}] + [{"CPU": 1.0, "GPU": 0.8, "accelerator_type:H100": 0.001}] * 2
    assert dn["placement_group_strategy"] == "STRICT_PACK" and dn["autoscaling_config"] == {"max_replicas": 3}


def test_config_round_trips():
    # replicas validate the dumped config again: the same options come out
    cfg = AppConfig.model_validate({"denoiser_deployment": {"autoscaling_config": {"max_replicas": 2}, "max_batch_size": 2}})
    again = AppConfig.model_validate(cfg.model_dump(mode="json"))
    assert again == cfg and again.denoiser_deployment.serve_options() == cfg.denoiser_deployment.serve_options()


def test_text_encoder_padding_must_fit_its_limit():
    with pytest.raises(ValidationError, match=r"max_sequence_length \(100\) must be a multiple of pad_to_multiple_of \(64\)"):
        AppConfig.model_validate({"text_encoder": {"max_sequence_length": 100}})
    AppConfig.model_validate({"text_encoder": {"max_sequence_length": 100, "pad_to_max_length": True}})


def test_vae_warms_a_tiled_size_only_when_its_decoder_is_compiled():
    cfg = AppConfig.model_validate({"server": {"max_size": 2048}, "vae": {"tiling_min_pixels": 1024 * 1024}})
    tiled = [s for s in cfg.vae_start_sizes(compiled=True) if s[0] * s[1] > 1024 * 1024]
    assert tiled == [(1040, 1040)]  # the smallest tiled square that is a multiple of 16
    assert cfg.vae_start_sizes(compiled=False) == cfg.start_sizes()
