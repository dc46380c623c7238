"""Operations pieces without a server: API-key loading and matching, request-id checks, quiet start."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from serve_app.api_keys import ApiKeys, NoApiKeys, load_keys
from serve_app.config import ServerConfig
from serve_app.request_ids import is_valid, new_request_id

ROOT = Path(__file__).resolve().parents[1]


def test_keys_from_the_variable_and_the_file(tmp_path, monkeypatch):
    f = tmp_path / "keys"
    f.write_text("# comment\nsk-file-1\n\n  sk-file-2  # trailing comment\n")
    monkeypatch.setenv("MY_KEYS", "sk-a, sk-b\nsk-c")
    keys = load_keys(ServerConfig(api_keys_env="MY_KEYS", api_keys_file=str(f)))
    assert keys == ["sk-a", "sk-b", "sk-c", "sk-file-1", "sk-file-2"]
    ApiKeys.configure(keys)
    try:
        assert all(ApiKeys.accepts(k) for k in keys)
        assert not any(ApiKeys.accepts(k) for k in ("", "sk-a ", "sk-", "SK-A", "sk-file-1x"))
    finally:
        ApiKeys.configure([])
    assert not ApiKeys.accepts("sk-a")  # no keys: nothing matches (and the middleware lets all through)


def test_required_keys_refuse_to_start_without_one(monkeypatch):
    monkeypatch.delenv("SERVE_APP_API_KEYS", raising=False)
    assert load_keys(ServerConfig()) == []  # optional: off
    with pytest.raises(NoApiKeys, match="SERVE_APP_API_KEYS"):
        load_keys(ServerConfig(require_api_keys=True))
    monkeypatch.setenv("SERVE_APP_API_KEYS", " , ")
    with pytest.raises(NoApiKeys):
        load_keys(ServerConfig(require_api_keys=True))


def test_request_id_check():
    assert is_valid(new_request_id()) and is_valid("a" * 128) and is_valid("trace-1.2:3_x")
    assert not any(is_valid(v) for v in (None, "", "a" * 129, "a b", "a\nb", "ä", "a;b", "a/b", '{"x"}'))


def test_start_up_noise_is_filtered_and_the_rest_still_shows():
    """What serve_app/quiet.py lists, logged as its libraries log it (torchao's only where torchao is
    installed, as on the GPU images; diffusers' quantizer registry, imported as a replica does, pulls it
    in there), prints nothing; an unrelated message from the same loggers still shows."""
    code = ("import serve_app, logging, warnings, diffusers.quantizers\n"
            "logging.getLogger('torchao').warning('Failed to load /site/torchao/_C_mxfp8.so: undefined symbol')\n"
            "logging.getLogger('torchao.kernel.intmm').warning('Detected no triton, on systems without Triton')\n"
            "logging.getLogger('diffusers.quantizers.torchao.torchao_quantizer').warning(\n"
            "    'Unable to import `torchao` Tensor objects. This may affect loading checkpoints')\n"
            "logging.getLogger('torch.utils._pytree').warning(\n"
            "    \"<enum 'Kind'> is an Enum subclass and is now natively supported by torch.compile\")\n"
            "warnings.warn('Zero-copy tensor serialization is enabled for torch tensors')\n"
            "warnings.warn('The given NumPy array is not writable, and PyTorch does not support', UserWarning)\n"
            "logging.getLogger('torchao').warning('something else from torchao')\n"
            "warnings.warn('something else entirely', UserWarning)\n")
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "HOME": str(Path.home())})
    assert p.returncode == 0, p.stderr
    for noise in ("Failed to load", "Detected no triton", "Unable to import `torchao`", "Enum subclass", "Zero-copy",
                  "not writable"):
        assert noise not in p.stderr, p.stderr
    assert "something else from torchao" in p.stderr and "something else entirely" in p.stderr
