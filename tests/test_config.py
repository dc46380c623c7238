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
