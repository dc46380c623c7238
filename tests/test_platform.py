"""Vendor-aware engine choices (serve_app/engines/platform.py) on simulated chips, and the real CPU path."""

import json
import logging

import pytest

from serve_app.config import DenoiserConfig
from serve_app.engines.platform import TorchInfo, choose_engine_settings, detect_platform, fp8_dtype_for

MI300X = TorchInfo(vendor="amd", device_name="AMD Instinct MI300X", arch="gfx942:sramecc+:xnack-", capability=(9, 4),
                   device_count=8, hip_version="7.0")
MI325X = TorchInfo(vendor="amd", device_name="AMD Instinct MI325X", arch="gfx942:sramecc+:xnack-", capability=(9, 4))
MI355X = TorchInfo(vendor="amd", device_name="AMD Instinct MI355X", arch="gfx950:sramecc+:xnack-", capability=(9, 5))
H100 = TorchInfo(vendor="nvidia", device_name="NVIDIA H100 80GB HBM3", capability=(9, 0), device_count=8, cuda_version="12.8")
H200 = TorchInfo(vendor="nvidia", device_name="NVIDIA H200", capability=(9, 0))
B200 = TorchInfo(vendor="nvidia", device_name="NVIDIA B200", capability=(10, 0))
A100 = TorchInfo(vendor="nvidia", device_name="NVIDIA A100-SXM4-80GB", capability=(8, 0))
CPU = TorchInfo(vendor="cpu")

ALL_BACKENDS = {"native", "_native_cudnn", "flash", "_flash_3", "aiter", "aiter_fa2_hub", "xformers"}


def importable(*present):
    return lambda name: name in set(present) | {"torchao", "triton"}


def settings(info, importable_fn=None, backends=ALL_BACKENDS, **cfg):
    return choose_engine_settings(detect_platform(torch_info=info), DenoiserConfig(**cfg),
                                  importable=importable_fn or importable(), diffusers_backends=backends)


def test_detect_simulated_chips():
    p = detect_platform(torch_info=MI300X)
    assert (p.vendor, p.chip, p.arch, p.device, p.simulated) == ("amd", "MI300X", "gfx942", "cuda:0", True)
    assert detect_platform(torch_info=MI325X).chip == "MI325X"
    assert detect_platform(torch_info=MI355X).chip == "MI355X"
    # an unnamed gfx950 part still maps to its family
    assert detect_platform(torch_info=TorchInfo(vendor="amd", arch="gfx950")).chip == "MI355X"
    h = detect_platform(torch_info=H100)
    assert (h.vendor, h.chip, h.arch, h.capability, h.cudnn_available) == ("nvidia", "H100", "sm_90", (9, 0), True)
    assert detect_platform(torch_info=H200).chip == "H200"
    assert detect_platform(torch_info=A100).chip == "A100"


def test_mi300x_fp8_is_fnuz_and_rccl_goes_by_nccl():
    s = settings(MI300X, fp8=True, compile=True)
    assert s.fp8 and s.fp8_dtype == "float8_e4m3fnuz"
    assert s.collective_backend == "nccl"  # RCCL under torch's "nccl" name
    assert s.collective_env["HIP_FORCE_DEV_KERNARG"] == "1"
    assert "NCCL_NVLS_ENABLE" not in s.collective_env
    assert s.attention_backend == "native"  # SDPA -> CK / AOTriton flash on ROCm
    assert s.compile.enabled and not s.warnings
    # AITER when the package and a diffusers backend for it are there
    assert settings(MI300X, importable("aiter")).attention_backend == "aiter"
    # ... but never when this diffusers has no such backend
    assert settings(MI300X, importable("aiter"), backends={"native", "aiter_fa2_hub"}).attention_backend == "native"
    assert settings(MI325X, fp8=True).fp8_dtype == "float8_e4m3fnuz"


def test_mi355x_fp8_is_ocp_e4m3fn():
    s = settings(MI355X, fp8=True)
    assert s.fp8 and s.fp8_dtype == "float8_e4m3fn" and s.collective_backend == "nccl"


def test_h100_e4m3fn_and_fa3_or_sdpa():
    s = settings(H100, fp8=True, compile=True)
    assert s.fp8 and s.fp8_dtype == "float8_e4m3fn"
    # SDPA: measured faster than cuDNN and FA2 through diffusers on H100 (see platform.py)
    assert s.attention_backend == "native"
    assert s.collective_backend == "nccl" and s.collective_env == {"NCCL_NVLS_ENABLE": "0"}
    assert s.compile.enabled and s.compile.dynamic
    # FlashAttention-3 when built; else SDPA, FA2 installed or not
    assert settings(H100, importable("flash_attn_interface", "flash_attn")).attention_backend == "_flash_3"
    assert settings(H100, importable("flash_attn")).attention_backend == "native"
    # ... either FA3 build: the flash-attention repository's or the fa3-fwd wheel's
    assert settings(H100, importable("fa3_fwd_interface")).attention_backend == "_flash_3"
    assert settings(H200, fp8=True).fp8_dtype == "float8_e4m3fn"
    assert settings(B200, fp8=True).fp8_dtype == "float8_e4m3fn"
    assert settings(B200).attention_backend == "_native_cudnn"


def test_a100_fp8_falls_back_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="serve_app.engines.platform"):
        s = settings(A100, fp8=True)
    assert not s.fp8 and s.fp8_dtype is None and s.fp8_supported_dtype is None
    assert any("fp8" in r.getMessage() and "A100" in r.getMessage() for r in caplog.records)
    assert s.warnings and "A100" in s.warnings[0]
    assert s.collective_backend == "nccl"
    assert settings(A100, importable("flash_attn")).attention_backend == "flash"


def test_unavailable_attention_backend_falls_back(caplog):
    with caplog.at_level(logging.WARNING, logger="serve_app.engines.platform"):
        s = settings(MI300X, attention_backend="_native_cudnn")  # NVIDIA-only
        t = settings(H100, attention_backend="flash")  # flash_attn not installed
        u = settings(H100, attention_backend="no_such_backend")
        v = settings(A100, attention_backend="_flash_3", importable_fn=importable("flash_attn_interface"))  # Hopper only
    assert s.attention_backend == "native"
    assert t.attention_backend == "native"
    assert u.attention_backend == "native"
    assert v.attention_backend == "native"
    assert len(caplog.records) == 4
    # an available explicit choice is kept as is
    assert settings(H100, importable("flash_attn"), attention_backend="flash").attention_backend == "flash"
    assert settings(MI300X, attention_backend="NATIVE").attention_backend == "native"


def test_fp8_needs_nothing_beyond_torch():
    s = choose_engine_settings(detect_platform(torch_info=H100), DenoiserConfig(fp8=True),
                               importable=lambda name: False, diffusers_backends=ALL_BACKENDS)
    assert s.fp8 and s.fp8_dtype == "float8_e4m3fn"


def test_simulated_cpu():
    s = settings(CPU, fp8=True, compile=True, attention_backend="flash")
    assert s.collective_backend == "gloo" and s.collective_env == {}
    assert not s.fp8 and not s.compile.enabled and s.attention_backend == "native"
    assert len(s.warnings) == 3


def test_real_cpu_path_on_this_machine():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU; the test pins the CPU choices")
    p = detect_platform()
    assert (p.vendor, p.device, p.chip, p.simulated) == ("cpu", "cpu", None, False)
    assert detect_platform("cpu") == p
    s = choose_engine_settings(p, DenoiserConfig(fp8=True, compile=True))  # real importable / diffusers lookups
    assert s.collective_backend == "gloo" and not s.fp8 and not s.compile.enabled
    assert s.attention_backend == "native" and s.torch_fp8_dtype is None
    d = s.as_dict()
    assert json.loads(json.dumps(d)) == d  # ready for /health or /v1/stats
    assert d["platform"]["vendor"] == "cpu" and d["collective_backend"] == "gloo"


def test_fp8_dtype_table_and_torch_dtype():
    import torch

    assert fp8_dtype_for(detect_platform(torch_info=TorchInfo(vendor="nvidia", device_name="NVIDIA L40S", capability=(8, 9)))) == "float8_e4m3fn"
    assert fp8_dtype_for(detect_platform(torch_info=TorchInfo(vendor="amd", device_name="AMD Instinct MI250X", arch="gfx90a"))) is None
    assert settings(MI300X, fp8=True).torch_fp8_dtype == torch.float8_e4m3fnuz
    assert settings(MI355X, fp8=True).torch_fp8_dtype == torch.float8_e4m3fn


def test_apply_collective_env_keeps_operator_settings():
    s = settings(MI300X)
    env = {"HIP_FORCE_DEV_KERNARG": "0"}
    applied = s.apply_collective_env(env)
    assert env["HIP_FORCE_DEV_KERNARG"] == "0" and "HIP_FORCE_DEV_KERNARG" not in applied
    assert env["TORCH_BLAS_PREFER_HIPBLASLT"] == "1"
    d = s.as_dict()
    assert d["platform"]["capability"] == [9, 4] and d["fp8_supported_dtype"] == "float8_e4m3fnuz"


def test_engines_apply_the_platform_choice_on_cpu(tiny_dir):
    """The real denoiser engine asked for FP8, compile and cuDNN attention on this CPU: it serves, in
    fp32 and eager, and says which fallbacks it took."""
    import torch

    from serve_app.config import ModelConfig
    from serve_app.engines.denoiser import DenoiseRequest, DenoiserEngine

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU; the test pins the CPU choices")
    eng = DenoiserEngine(ModelConfig(source="tiny", tiny_dir=str(tiny_dir)),
                         DenoiserConfig(fp8=True, compile=True, attention_backend="_native_cudnn"))
    build = eng.build
    assert (build.attention["layers"], build.fp8_dtype, build.compile) == ("native", None, False)
    assert build.platform["vendor"] == "cpu"
    assert len(build.warnings) == 3  # cuDNN, FP8, compile
    [lat] = eng.denoise([DenoiseRequest(embeds=torch.zeros(8, eng.cap_feat_dim), height=64, width=64, steps=1, seed=0)])
    assert torch.isfinite(lat).all()



def test_another_diffusers_release_is_refused_at_start():
    """The private internals we use are pinned to diffusers 0.42 (serve_app/engines/library_internals.py)."""
    from serve_app.engines.library_internals import check_library_versions

    check_library_versions("0.42.1")
    with pytest.raises(RuntimeError, match=r"needs diffusers 0\.42\.\* \(found 0\.43\.0\)"):
        check_library_versions("0.43.0")
