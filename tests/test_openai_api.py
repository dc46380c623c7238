"""Request validation against the server's limits (no Ray)."""

import pytest

from serve_app.config import ServerConfig
from serve_app.openai_api import APIError, ImageGenerationRequest, validate_request, warmup_size


@pytest.mark.parametrize("limits", [
    {},  # 64..2048
    {"min_size": 128, "default_size": "512x512"},
    {"min_size": 200, "size_multiple": 16, "default_size": "512x512"},
    {"min_size": 16, "max_size": 48, "default_size": "32x32"},
])
def test_the_health_warmup_size_is_one_the_server_accepts(limits):
    """`/health` warms up through request validation: a fixed 64x64 would be refused with min_size > 64,
    and /health would stay 503 forever."""
    server = ServerConfig(**limits)
    size = warmup_size(server)
    req = validate_request(ImageGenerationRequest(prompt="warm-up", size=size, num_inference_steps=1), server, "m", 50, 8)
    assert req.width == req.height >= min(64, server.max_size)
    # and the next size down (when there is one) is refused, so the warm-up is the smallest allowed
    smaller = req.width - server.size_multiple
    if smaller >= server.min_size and smaller >= 64:
        pytest.fail(f"{size} is not the smallest allowed size >= 64")
    with pytest.raises(APIError):
        validate_request(ImageGenerationRequest(prompt="x", size=f"{server.min_size - 1}x{server.min_size - 1}"), server, "m", 50, 8)
