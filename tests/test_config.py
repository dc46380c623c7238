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
    with pytest.raises(ValidationError, match="num_replicas or autoscaling"):
        AppConfig.model_validate({"denoiser_deployment": {"num_replicas": 1, "autoscaling": {"max_replicas": 2}}})
