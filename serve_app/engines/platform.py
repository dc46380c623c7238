"""Vendor-aware engine choices: which attention backend, FP8 dtype, torch.compile settings and
collective backend (with its environment) suit the chip a replica landed on.

Ray-free and hardware-free to test: `detect_platform` reads torch (CUDA, ROCm or CPU), or a
`TorchInfo` a test passes in to simulate an MI300X, MI355X, H100 or A100; `choose_engine_settings`
is a pure function of that and the `DenoiserConfig`. An unsupported request (FP8 on an A100, an
attention backend that is not installed, compile on CPU) falls back with a `logging` warning and
never raises. `EngineSettings.as_dict()` is JSON-ready for `/health` or `/v1/stats`.

    platform = detect_platform(device)                 # or detect_platform(torch_info=TorchInfo(...))
    settings = choose_engine_settings(platform, cfg.denoiser)
    settings.attention_backend, settings.fp8, settings.fp8_dtype, settings.collective_backend
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Literal

log = logging.getLogger(__name__)

Vendor = Literal["nvidia", "amd", "cpu"]


@dataclass(frozen=True)
class TorchInfo:
    """What torch would report about the device; pass one to `detect_platform` to simulate a chip.

    `arch` is the ROCm `gcnArchName` (e.g. "gfx942:sramecc+:xnack-") on AMD and "sm_90"-style on
    NVIDIA (derived from `capability` when empty); `capability` is `torch.cuda.get_device_capability`
    (ROCm reports e.g. (9, 4) for gfx942, not meaningful for feature checks there).
    """

    vendor: Vendor
    device_name: str = ""
    arch: str = ""
    capability: tuple[int, int] | None = None
    device_count: int = 1
    cudnn_available: bool | None = None  # None: True on NVIDIA, False elsewhere
    cuda_version: str | None = None
    hip_version: str | None = None


@dataclass(frozen=True)
class PlatformInfo:
    vendor: Vendor
    device: str  # "cuda:0" / "cpu" (ROCm devices are "cuda" in torch too)
    device_name: str
    chip: str | None  # canonical family: H100, H200, B200, A100, L40S, MI300X, MI325X, MI355X, ...
    arch: str  # gfx942 / gfx950 (ROCm, without feature suffixes) or sm_90 (NVIDIA); "" on CPU
    capability: tuple[int, int] | None
    device_count: int
    cudnn_available: bool
    cuda_version: str | None
    hip_version: str | None
    simulated: bool = False

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["capability"] = list(self.capability) if self.capability else None
        return d


@dataclass
class CompileSettings:
    enabled: bool
    dynamic: bool = True


@dataclass
class EngineSettings:
    platform: PlatformInfo
    attention_backend: str  # a diffusers AttentionBackendName value ("native" = torch SDPA)
    fp8: bool  # FP8 linears are applied
    fp8_dtype: str | None  # "float8_e4m3fn" / "float8_e4m3fnuz" when fp8, else None
    fp8_supported_dtype: str | None  # what the chip could do, whether asked for or not
    compile: CompileSettings
    collective_backend: Literal["nccl", "gloo"]  # "nccl" is RCCL on ROCm (same torch name)
    collective_env: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)  # every fallback taken, also logged

    @property
    def torch_fp8_dtype(self):
        """The torch dtype for `fp8_dtype` (None when FP8 is off)."""
        if not self.fp8_dtype:
            return None
        import torch

        return getattr(torch, self.fp8_dtype)

    def apply_collective_env(self, environ: dict[str, str] | None = None) -> dict[str, str]:
        """Set `collective_env` in `environ` (default os.environ) without overriding what the operator
        already set; returns what was set. Call before the process group is created."""
        environ = os.environ if environ is None else environ
        applied = {}
        for k, v in self.collective_env.items():
            if k not in environ:
                environ[k] = v
                applied[k] = v
        return applied

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready: for `/health`, `/v1/stats` or a log line."""
        return {
            "platform": self.platform.as_dict(),
            "attention_backend": self.attention_backend,
            "fp8": self.fp8,
            "fp8_dtype": self.fp8_dtype,
            "fp8_supported_dtype": self.fp8_supported_dtype,
            "compile": asdict(self.compile),
            "collective_backend": self.collective_backend,
            "collective_env": dict(self.collective_env),
            "warnings": list(self.warnings),
        }


# ---------------------------------------------------------------------------------------------------
# detection


def _torch_info_from_torch(device) -> TorchInfo:
    import torch

    dev = torch.device(device) if device is not None else None
    if dev is None:
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.type != "cuda" or not torch.cuda.is_available():
        return TorchInfo(vendor="cpu", device_name="cpu", device_count=0, cudnn_available=False)
    index = dev.index if dev.index is not None else torch.cuda.current_device()
    props = torch.cuda.get_device_properties(index)
    capability = tuple(torch.cuda.get_device_capability(index))
    if getattr(torch.version, "hip", None):
        return TorchInfo(
            vendor="amd",
            device_name=torch.cuda.get_device_name(index),
            arch=getattr(props, "gcnArchName", "") or "",
            capability=capability,
            device_count=torch.cuda.device_count(),
            cudnn_available=False,
            hip_version=torch.version.hip,
        )
    return TorchInfo(
        vendor="nvidia",
        device_name=torch.cuda.get_device_name(index),
        capability=capability,
        device_count=torch.cuda.device_count(),
        cudnn_available=bool(torch.backends.cudnn.is_available()),
        cuda_version=torch.version.cuda,
    )


# Checked in order; the first substring found in the device name wins (H200 before H20, GB200
# before B200 before B20, MI325X before MI300X).
_NVIDIA_CHIPS = ("GB300", "GB200", "B300", "B200", "H200", "H100", "H800", "H20", "GH200", "A100", "A800", "A10G",
                 "L40S", "L40", "L4", "A10", "T4", "V100")
_AMD_CHIPS = ("MI355X", "MI350X", "MI325X", "MI308X", "MI300X", "MI300A", "MI250X", "MI250", "MI210", "MI100")
_AMD_ARCH_DEFAULT_CHIP = {"gfx950": "MI355X", "gfx942": "MI300X", "gfx90a": "MI250X", "gfx908": "MI100"}


def _canonical_chip(vendor: Vendor, name: str, arch: str) -> str | None:
    upper = re.sub(r"[\s_-]+", "", name.upper())
    if vendor == "nvidia":
        if "GH200" in upper:
            return "GH200"
        return next((c for c in _NVIDIA_CHIPS if c in upper), None)
    if vendor == "amd":
        found = next((c for c in _AMD_CHIPS if c in upper), None)
        return found or _AMD_ARCH_DEFAULT_CHIP.get(arch)
    return None


def detect_platform(device=None, torch_info: TorchInfo | None = None) -> PlatformInfo:
    """Vendor, chip, arch and capability of `device` (default: the current CUDA/ROCm device, else CPU).

    `torch_info` replaces what torch reports, so tests can simulate any chip on a CPU machine.
    """
    simulated = torch_info is not None
    info = torch_info if torch_info is not None else _torch_info_from_torch(device)
    arch = (info.arch or "").split(":")[0]  # "gfx942:sramecc+:xnack-" -> "gfx942"
    if info.vendor == "nvidia" and not arch and info.capability:
        arch = f"sm_{info.capability[0]}{info.capability[1]}"
    if info.vendor == "cpu":
        dev = "cpu"
    else:
        dev = str(device) if device is not None and str(device).startswith("cuda") else "cuda:0"
    cudnn = info.cudnn_available if info.cudnn_available is not None else info.vendor == "nvidia"
    return PlatformInfo(
        vendor=info.vendor,
        device=dev,
        device_name=info.device_name or info.vendor,
        chip=_canonical_chip(info.vendor, info.device_name or "", arch),
        arch=arch if info.vendor != "cpu" else "",
        capability=tuple(info.capability) if info.capability else None,
        device_count=info.device_count if info.vendor != "cpu" else 0,
        cudnn_available=bool(cudnn) and info.vendor == "nvidia",
        cuda_version=info.cuda_version,
        hip_version=info.hip_version,
        simulated=simulated,
    )


# ---------------------------------------------------------------------------------------------------
# choices


def fp8_dtype_for(platform: PlatformInfo) -> str | None:
    """The FP8 format the chip's matrix cores run, or None.

    NVIDIA: OCP e4m3 (`float8_e4m3fn`) from compute capability 8.9 (Ada, Hopper H100/H200, Blackwell
    B200); none on A100 (8.0) and older. AMD: gfx942 (MI300X, MI325X) runs the FNUZ variant
    (`float8_e4m3fnuz`, no negative zero, bias 8); gfx950 (MI350X, MI355X) runs OCP `float8_e4m3fn`.
    """
    if platform.vendor == "nvidia":
        return "float8_e4m3fn" if platform.capability and tuple(platform.capability) >= (8, 9) else None
    if platform.vendor == "amd":
        if platform.arch.startswith("gfx95"):
            return "float8_e4m3fn"
        if platform.arch.startswith("gfx94"):
            return "float8_e4m3fnuz"
    return None


def _diffusers_backends() -> set[str] | None:
    try:
        from diffusers.models.attention_dispatch import AttentionBackendName
    except Exception:  # diffusers missing or reorganised: we cannot check names, trust the request
        return None
    return {b.value for b in AttentionBackendName}


def _default_importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


# The FlashAttention-3 builds our processor takes (serve_app/engines/fa3_attention.py): flash-attention's `hopper/`
# package, then the `fa3-fwd` wheel.
FA3_INTERFACE_MODULES = ("flash_attn_interface", "fa3_fwd_interface")

# The python package a diffusers backend needs, where it needs one beyond torch (a tuple: any one of them).
# `_flash_3` is run by our own processor, which takes either FA3 build.
_BACKEND_PACKAGES = {
    "flash": "flash_attn", "flash_varlen": "flash_attn",
    "_flash_3": FA3_INTERFACE_MODULES, "_flash_varlen_3": "flash_attn_interface",
    "sage": "sageattention", "sage_varlen": "sageattention",
    "xformers": "xformers",
    "aiter": "aiter",
}
# Backends that only run on NVIDIA (CUDA kernels or cuDNN); refused on ROCm and CPU.
_NVIDIA_ONLY = {"_native_cudnn", "_flash_3", "_flash_varlen_3", "_flash_3_hub", "_flash_3_varlen_hub", "flash_4_hub",
                "sage_blackwell_hub", "_sage_qk_int8_pv_fp8_cuda", "_sage_qk_int8_pv_fp8_cuda_sm90",
                "_sage_qk_int8_pv_fp16_cuda"}
_GPU_ONLY = _NVIDIA_ONLY | {"flash", "flash_varlen", "flash_hub", "flash_varlen_hub", "aiter", "aiter_fa2_hub",
                            "_native_flash", "_native_efficient", "xformers", "sage", "sage_varlen"}


def _backend_usable(name: str, platform: PlatformInfo, importable: Callable[[str], bool],
                    known: set[str] | None) -> str | None:
    """None if `name` can run here, else why not."""
    if known is not None and name not in known:
        return f"not a backend of this diffusers ({', '.join(sorted(known))})"
    if platform.vendor != "nvidia" and name in _NVIDIA_ONLY:
        return f"needs an NVIDIA GPU, this is {platform.vendor}"
    if platform.vendor == "cpu" and name in _GPU_ONLY:
        return "needs a GPU"
    if name == "_native_cudnn" and not platform.cudnn_available:
        return "cuDNN is not available"
    if name in ("_flash_3", "_flash_varlen_3") and (platform.capability or (0, 0))[0] != 9:
        return "FlashAttention-3 runs on Hopper (sm_90) only"
    if name.endswith("_hub"):
        if not importable("kernels"):
            return "needs the `kernels` package (hub kernels)"
        if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
            return "hub kernels cannot be downloaded with HF_HUB_OFFLINE set"
    pkgs = _BACKEND_PACKAGES.get(name)
    pkgs = (pkgs,) if isinstance(pkgs, str) else pkgs or ()
    if pkgs and not any(importable(p) for p in pkgs):
        return f"python package {' or '.join(f'`{p}`' for p in pkgs)} is not installed"
    return None


def _auto_attention_backend(platform: PlatformInfo, importable: Callable[[str], bool], known: set[str] | None) -> str:
    """Fastest usable backend by vendor, in order of preference; `native` (torch SDPA) always works."""
    if platform.vendor == "nvidia":
        major = (platform.capability or (0, 0))[0]
        if major == 9:  # Hopper: FA3 if built; else torch SDPA, measured fastest (benchmarks/README.md)
            prefs = ["_flash_3"]
        elif major >= 10:  # Blackwell: cuDNN SDPA has sm_100 kernels; FA2 does not beat it
            prefs = ["_native_cudnn", "flash"]
        elif major == 8:  # Ampere / Ada: FA2 if installed (SDPA picks its own FA2 build otherwise)
            prefs = ["flash"]
        else:
            prefs = []
    elif platform.vendor == "amd":
        # ROCm: torch SDPA already dispatches to CK / AOTriton flash attention on MI300-class parts;
        # AITER (ROCm/aiter) when this diffusers has a native backend for it and the package is there.
        prefs = ["aiter"]
    else:
        prefs = []
    for name in prefs:
        if _backend_usable(name, platform, importable, known) is None:
            return name
    return "native"


def collective_for(platform: PlatformInfo) -> tuple[Literal["nccl", "gloo"], dict[str, str]]:
    """The torch.distributed backend for `platform` and the environment it wants (NCCL: NVLink
    multicast off; RCCL: hipBLASLt and device kernel args)."""
    if platform.vendor == "nvidia":
        # NVLink SHARP / multicast (NVLS) stays off: it reserves extra memory per communicator and
        # some hosts do not allow multicast objects (see the device notes of this project).
        return "nccl", {"NCCL_NVLS_ENABLE": "0"}
    if platform.vendor == "amd":
        # torch's "nccl" backend is RCCL on ROCm builds (same name, same API).
        # - HIP_FORCE_DEV_KERNARG=1: kernel arguments in device memory, faster launches; AMD's
        #   "vLLM V1 performance optimization" guide for MI300X/MI325X/MI350X/MI355X
        #   (rocm.docs.amd.com, section "Performance environment variables").
        # - TORCH_BLAS_PREFER_HIPBLASLT=1: hipBLASLt for the GEMMs (same guide); the DiT is GEMM-bound.
        # Not set: HSA_FORCE_FINE_GRAIN_PCIE=1 is for PCIe-attached GPUs (RCCL "usage tips",
        # "Enabling peer-to-peer transport"), not the XGMI-connected OAM parts; NCCL_MIN_NCHANNELS
        # tunes bandwidth-bound all-reduce, while SP moves latency-bound all-to-alls, so RCCL's own
        # per-topology default stays. Operators can still set any of them: `apply_collective_env`
        # never overrides what the environment already has.
        return "nccl", {"HIP_FORCE_DEV_KERNARG": "1", "TORCH_BLAS_PREFER_HIPBLASLT": "1"}
    return "gloo", {}


def choose_engine_settings(platform: PlatformInfo, denoiser_cfg, *, importable: Callable[[str], bool] | None = None,
                           diffusers_backends: set[str] | None = None) -> EngineSettings:
    """Pick attention backend, FP8, compile and collective settings for `platform`.

    `denoiser_cfg` is a `serve_app.config.DenoiserConfig` (or anything with `attention_backend`,
    `fp8`, `compile`). `importable` (module name -> bool) and
    `diffusers_backends` (the backend names this diffusers knows) default to the real environment;
    tests pass their own. Never raises on an unsupported combination: it falls back, logs a
    warning and lists it in `warnings`.
    """
    importable = importable or _default_importable
    known = diffusers_backends if diffusers_backends is not None else _diffusers_backends()
    warnings: list[str] = []

    def warn(msg: str) -> None:
        warnings.append(msg)
        log.warning("%s", msg)

    # attention
    requested = getattr(denoiser_cfg, "attention_backend", None)
    if requested:
        requested = str(requested).lower()
        why = _backend_usable(requested, platform, importable, known)
        if why is None:
            attention = requested
        else:
            attention = _auto_attention_backend(platform, importable, known)
            warn(f"attention backend {requested!r} unavailable on {platform.chip or platform.vendor} ({why}); using {attention!r}")
    else:
        attention = _auto_attention_backend(platform, importable, known)

    # FP8
    supported_dtype = fp8_dtype_for(platform)
    fp8 = False
    fp8_dtype = None
    if getattr(denoiser_cfg, "fp8", False):
        if supported_dtype is None:
            what = platform.chip or platform.device_name or platform.vendor
            warn(f"fp8 requested but {what} ({platform.arch or platform.vendor}) has no FP8 matrix cores; running without FP8")
        else:
            fp8, fp8_dtype = True, supported_dtype

    # torch.compile
    compile_requested = bool(getattr(denoiser_cfg, "compile", False))
    compile_enabled = compile_requested
    if compile_requested and platform.vendor == "cpu":
        compile_enabled = False
        warn("compile requested on CPU; skipped (inductor's CPU codegen takes minutes and buys little for the tiny model)")
    elif compile_requested and platform.vendor == "amd" and not importable("triton"):
        compile_enabled = False
        warn("compile requested but triton (pytorch-triton-rocm) is not installed; running eager")
    compile_settings = CompileSettings(
        enabled=compile_enabled,
        dynamic=bool(getattr(denoiser_cfg, "compile_dynamic", True)),
    )

    backend, env = collective_for(platform)
    return EngineSettings(
        platform=platform,
        attention_backend=attention,
        fp8=fp8,
        fp8_dtype=fp8_dtype,
        fp8_supported_dtype=supported_dtype,
        compile=compile_settings,
        collective_backend=backend,
        collective_env=env,
        warnings=warnings,
    )
