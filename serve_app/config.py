"""The one typed configuration of the server.

Every YAML under `configs/` maps one to one onto `AppConfig` (its `applications[].args`), and every
engine and deployment takes the piece of it that concerns it. Unknown keys are errors, so a typo in a
config file fails at start with the key named.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

HUB_MODEL_ID = "Tongyi-MAI/Z-Image-Turbo"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class ModelConfig(_Strict):
    """Where the weights come from and how they sit on the device."""

    # hub: `from_pretrained(path)` of a hub id or a local folder in the diffusers layout.
    # tiny: a few-layer model with seeded random weights, written once to `tiny_dir` and then loaded
    #       back through the same `from_pretrained` code as `hub`.
    # random-full: the real architecture at full size with random weights, built on the device.
    source: Literal["hub", "tiny", "random-full"] = "tiny"
    path: str = HUB_MODEL_ID
    revision: str | None = None
    tiny_dir: str | None = None  # default: ~/.cache/serve_app/tiny-z-image-v1
    seed: int = 0  # seed of the random weights (tiny, random-full)
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    device: str = "auto"  # auto: cuda if present, else cpu
    name: str = "z-image-turbo"  # the `model` name the API accepts and lists
    # torch.compile's cache for every stage that compiles (serve_app/compile_cache.py); None: the
    # environment's TORCHINDUCTOR_CACHE_DIR, else Inductor's default (shared by a node's replicas)
    compile_cache_dir: str | None = None


class TextEncoderConfig(_Strict):
    max_sequence_length: int = Field(512, ge=8, le=4096)
    # diffusers pads every prompt to max_sequence_length; we pad to the batch's longest prompt.
    pad_to_max_length: bool = False
    # Pad to the longest prompt rounded up to this many tokens: a handful of GEMM shapes instead of a
    # new one per prompt length (measured on H100: 119 ms with a fresh length per request, 35 ms warm).
    pad_to_multiple_of: int = Field(64, ge=1)
    # Z-Image reads the second-to-last hidden state, so the last decoder layer is never needed.
    skip_last_layer: bool = True
    # torch.compile each decoder layer (dynamic shapes, on GPU only): the eager encoder is bound by
    # kernel launches and Python (a 4B forward over ~100 tokens is ~1e12 FLOP, a few ms of H100 work).
    compile: bool = False
    # CUDA graphs of the eager forward (serve_app/text_encoder_graphs.py), one per (batch bucket, padded
    # length), captured at warm-up or on first use (GPU only): the same kernels as eager, launched at once
    # (H100: 31 -> 11 ms at batch 1, identical states). Batches up to `cuda_graph_max_batch` are padded to
    # the next power of two; larger ones, a compiled encoder and every call on CPU run eagerly.
    cuda_graph: bool = True
    cuda_graph_max_batch: int = Field(8, ge=1, le=64)


class DenoiserConfig(_Strict):
    default_steps: int = Field(8, ge=1, le=100)
    max_steps: int = Field(50, ge=1, le=1000)
    compile: bool = False  # regional torch.compile of the transformer blocks
    # True: one graph per block class for every size and batch; False: a graph per shape (warm each
    # served size), which lets Inductor specialise its kernels
    compile_dynamic: bool = True
    fp8: bool = False  # FP8 linears (dynamic per-token activation, per-row weight scales) where the chip has FP8
    # "native": serve_app.fp8_linear (plain tensors: one compiled graph for all blocks);
    # "torchao": torchao's Float8DynamicActivationFloat8WeightConfig (its first compile took > 330 s on H100)
    fp8_impl: Literal["native", "torchao"] = "native"
    # diffusers attention backend name; None: the fastest usable on the chip (serve_app/platform.py), e.g.
    # "_flash_3" (FlashAttention-3, serve_app/fa3_attention.py) on Hopper where an FA3 build is installed
    attention_backend: str | None = None
    # RoPE as real arithmetic, which Inductor fuses into the q/k norms, instead of diffusers' complex
    # multiply (separate kernels; 3.2 ms of a 94 ms compiled bf16 forward on H100). Same result in float32.
    real_rope: bool = True
    warmup_sizes: list[tuple[int, int]] = Field(default_factory=list)  # (height, width) warmed at start
    ulysses_degree: int = Field(1, ge=1)
    ring_degree: int = Field(1, ge=1)
    collective_timeout_s: float = Field(120.0, gt=0)
    # SP > 1: also shard the two noise-refiner blocks (image tokens), not just the 30 main blocks
    # (2xH200, eager, 1024²: SP 2 forward 89 ms with, 94 ms without; 147 ms on one GPU).
    sp_shard_noise_refiner: bool = True
    # SP > 1: batch only requests whose captions pad to the same length, so the sharded blocks never need
    # a key mask (diffusers' Ulysses with a mask inside compiled blocks: an Inductor error on CPU, 500s
    # seen on 2xH200). At 1024² batching gains ~4%, so splitting mixed-length batches costs little.
    sp_same_caption_length_batches: bool = True
    # Bound a DiT batch by its pixels (height x width summed) as well as by max_batch_size: batching pays
    # only while one image leaves the GPU idle (H100, FP8: 512² batches of 8 served 1.95x the images/s of
    # batch 1; 1024² batches of 4 served fewer than batch 1). None: no bound. A larger request runs alone.
    max_batch_pixels: int | None = Field(None, ge=1)

    @property
    def sp_degree(self) -> int:
        return self.ulysses_degree * self.ring_degree


class VaeConfig(_Strict):
    # decode tiled when the image has more pixels than this (bounds activation memory at 2K and up)
    tiling_min_pixels: int = Field(2048 * 2048, ge=0)
    compile: bool = False  # torch.compile of the decoder, one graph per shape (warm each served size)
    channels_last: bool = False  # NHWC convolutions
    cudnn_benchmark: bool = False  # let cuDNN time its convolution algorithms per shape (GPU)


class AutoscalingOptions(_Strict):
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(1, ge=1)
    initial_replicas: int | None = None
    target_ongoing_requests: float = Field(2.0, gt=0)
    metrics_interval_s: float | None = None
    look_back_period_s: float | None = None
    upscale_delay_s: float | None = None
    downscale_delay_s: float | None = None


class DeploymentOptions(_Strict):
    """What Ray Serve needs to place, scale and batch one stage."""

    num_replicas: int | None = None  # fixed count; leave None to autoscale
    autoscaling: AutoscalingOptions | None = None
    max_ongoing_requests: int = Field(16, ge=1)
    max_queued_requests: int = Field(64, ge=-1)  # -1: unbounded (not recommended)
    max_batch_size: int = Field(4, ge=1)
    batch_wait_timeout_s: float = Field(0.01, ge=0)
    num_cpus: float = Field(1.0, ge=0)
    num_gpus: float = Field(0.0, ge=0)
    accelerator_type: str | None = None
    memory: int | None = None
    runtime_env: dict[str, Any] | None = None
    health_check_period_s: float | None = None
    health_check_timeout_s: float | None = None

    @model_validator(mode="after")
    def _one_scaling_mode(self) -> "DeploymentOptions":
        if self.num_replicas is not None and self.autoscaling is not None:
            raise ValueError("set either num_replicas or autoscaling, not both")
        return self


class ServerConfig(_Strict):
    """Limits and defaults of the HTTP API."""

    request_timeout_s: float = Field(300.0, gt=0)
    max_prompt_chars: int = Field(4000, ge=1)
    max_n: int = Field(8, ge=1)
    min_size: int = Field(64, ge=16)
    max_size: int = Field(2048, ge=16)
    size_multiple: int = Field(16, ge=1)
    default_size: str = "1024x1024"
    default_output_format: Literal["png", "jpeg", "webp"] = "png"
    png_compress_level: int = Field(1, ge=0, le=9)
    jpeg_quality: int = Field(90, ge=1, le=100)
    webp_quality: int = Field(90, ge=1, le=100)
    max_inflight_images: int = Field(256, ge=1)  # per ingress replica; past it requests get 429
    warmup: bool = True  # /health is 200 only after one generation went through every stage

    @model_validator(mode="after")
    def _default_size_allowed(self) -> "ServerConfig":
        import re

        m = re.fullmatch(r"(\d+)x(\d+)", self.default_size)
        if not m or not all(self.min_size <= int(v) <= self.max_size and int(v) % self.size_multiple == 0 for v in m.groups()):
            raise ValueError(f"default_size {self.default_size!r} must be 'WxH' within min_size/max_size and a multiple of size_multiple")
        return self


class AppConfig(_Strict):
    model: ModelConfig = Field(default_factory=ModelConfig)
    text_encoder: TextEncoderConfig = Field(default_factory=TextEncoderConfig)
    denoiser: DenoiserConfig = Field(default_factory=DenoiserConfig)
    vae: VaeConfig = Field(default_factory=VaeConfig)
    server: ServerConfig = Field(default_factory=ServerConfig)
    text_encoder_deployment: DeploymentOptions = Field(default_factory=DeploymentOptions)
    denoiser_deployment: DeploymentOptions = Field(default_factory=DeploymentOptions)
    vae_deployment: DeploymentOptions = Field(default_factory=DeploymentOptions)
    ingress_deployment: DeploymentOptions = Field(
        default_factory=lambda: DeploymentOptions(max_ongoing_requests=256, max_queued_requests=512)
    )
