"""The one typed configuration of the server.

Every YAML under `configs/` maps one to one onto `AppConfig` (its `applications[].args`), and every
engine and deployment takes the piece of it that concerns it. Unknown keys are errors, so a typo in a
config file fails at start with the key named: ours by pydantic, Ray Serve's deployment options (the
`*_deployment` blocks) by `check_serve_options` against Serve's own schema.
"""

from __future__ import annotations

import copy
import difflib
import inspect
import math
import typing
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from serve_app.routing import choose_route, route_deployment_name

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
    # torch.compile's cache for every stage that compiles (serve_app/engines/compile_cache.py); None: the
    # environment's TORCHINDUCTOR_CACHE_DIR, else Inductor's default (shared by a node's replicas)
    compile_cache_dir: str | None = None


class TextEncoderConfig(_Strict):
    max_sequence_length: int = Field(512, ge=8, le=4096)
    # diffusers pads every prompt to max_sequence_length; we pad to the batch's longest prompt.
    pad_to_max_length: bool = False
    # pad to the longest prompt rounded up to this many tokens: a handful of GEMM shapes, each warmed
    # (benchmarks/README.md, "text encoder padding")
    pad_to_multiple_of: int = Field(64, ge=1)
    # Z-Image reads the second-to-last hidden state, so the last decoder layer is never needed.
    skip_last_layer: bool = True
    # CUDA graphs of the forward, one per (batch bucket, padded length), GPU only: the eager encoder is
    # launch-bound (benchmarks/README.md, "text encoder CUDA graphs"). Batches up to
    # `cuda_graph_max_batch` are padded to the next power of two; larger ones run eagerly.
    cuda_graph: bool = True
    cuda_graph_max_batch: int = Field(8, ge=1, le=64)
    # with the CUDA graphs: each RMSNorm compiled into one kernel instead of seven small ones, which the
    # graphs still pay for one by one (benchmarks/README.md, "text encoder RMSNorms compiled")
    compile_norms: bool = True
    # weights in CPU memory, each layer moved to the GPU for its forward (small cards; no CUDA graphs)
    cpu_offload: bool = False

    @model_validator(mode="after")
    def _padding_fits_the_limit(self) -> "TextEncoderConfig":
        # the tokenizer refuses a padded batch whose rounded-up length would pass max_length
        if not self.pad_to_max_length and self.max_sequence_length % self.pad_to_multiple_of:
            raise ValueError(f"max_sequence_length ({self.max_sequence_length}) must be a multiple of pad_to_multiple_of ({self.pad_to_multiple_of})")
        return self


class DenoiserConfig(_Strict):
    default_steps: int = Field(8, ge=1, le=100)
    max_steps: int = Field(50, ge=1, le=1000)
    compile: bool = False  # regional torch.compile of the transformer blocks
    # True: one graph per block class for every size and batch; False: a graph per shape (warm each
    # served size), which lets Inductor specialise its kernels
    compile_dynamic: bool = True
    fp8: bool = False  # FP8 linears (per-token activation, per-row weight scales) where the chip has FP8
    # FP8 GEMMs with Hopper's fast accumulation (`_scaled_mm(use_fast_accum=True)`, torchao's inference
    # default): no periodic promotion of the partial sums to float32 (benchmarks/README.md, "fast accumulation")
    fp8_fast_accum: bool = False
    # each block's Q, K, V as one linear and its feed-forward's w1, w3 as one: fewer launches, the same
    # result (serve_app/engines/fused_projections.py; benchmarks/README.md, "fused projections": server
    # c=1 -1.6 %). None: on unless lora.enabled (adapters wrap the separate linears); AppConfig decides.
    fuse_projections: bool | None = None
    # diffusers attention backend name; None: the fastest usable on the chip (serve_app/engines/platform.py),
    # e.g. "_flash_3" (FlashAttention-3, serve_app/engines/fa3_attention.py) on Hopper where a build imports
    attention_backend: str | None = None
    # RoPE in real arithmetic, which Inductor fuses into the q/k norms, instead of diffusers' complex
    # multiply (benchmarks/README.md, "real RoPE"); the same result in float32
    real_rope: bool = True
    warmup_sizes: list[tuple[int, int]] = Field(default_factory=list)  # (height, width) warmed at start
    ulysses_degree: int = Field(1, ge=1)
    ring_degree: int = Field(1, ge=1)
    collective_timeout_s: float = Field(120.0, gt=0)
    # SP > 1: also shard the two noise-refiner blocks (image tokens), not just the main blocks
    # (benchmarks/README.md, "SP: sharded noise refiners")
    sp_shard_noise_refiner: bool = True
    # SP > 1 with ring_degree 1: the sharded blocks' attention. "diffusers": diffusers' Ulysses (three
    # all-to-alls, q, k, v, each waited before the next); "packed": ours (serve_app/sp/attention.py), q, k, v
    # in one all-to-all issued async, the key mask gathered while it is in flight; the same result.
    # ring_degree > 1 always runs ours, packed.
    sp_attention: Literal["diffusers", "packed"] = "diffusers"
    # SP > 1: batch only requests whose captions pad to the same length, so the sharded blocks never need
    # a key mask (diffusers' Ulysses with a mask inside compiled blocks fails; benchmarks/README.md, "SP")
    sp_same_caption_length_batches: bool = True
    # bound a DiT batch by its pixels (height x width summed) as well as by max_batch_size: batching pays
    # only while one image leaves the GPU idle (benchmarks/README.md, "512²"). None: no bound; a larger
    # request runs alone.
    max_batch_pixels: int | None = Field(None, ge=1)
    # a DiT batch running longer than this counts as wedged: the replica's health check fails, so
    # /health/ready turns 503 and Serve replaces the replica (serve_app/health.py)
    max_batch_s: float = Field(600.0, gt=0)
    # CUDA graphs of the DiT forward for warm-up sizes of at most this many pixels, where a batch-1 forward
    # is bound by kernel launches (serve_app/engines/dit_graphs.py; benchmarks/README.md, "DiT CUDA graphs
    # for small sizes"): captured at start for batches 1..cuda_graph_max_batch and every caption length up
    # to 512 tokens padded to 32; other forwards run as without. None: off. One GPU, no LoRA.
    cuda_graph_max_pixels: int | None = Field(None, ge=1)
    cuda_graph_max_batch: int = Field(1, ge=1, le=8)

    @property
    def sp_degree(self) -> int:
        return self.ulysses_degree * self.ring_degree

    @model_validator(mode="after")
    def _graphs_on_one_gpu(self) -> "DenoiserConfig":
        # an SP forward runs collectives and split hooks inside it
        if self.cuda_graph_max_pixels is not None and self.sp_degree > 1:
            raise ValueError("denoiser.cuda_graph_max_pixels: not with ulysses_degree x ring_degree > 1")
        return self


class LoraConfig(_Strict):
    """LoRA adapters per request (serve_app/engines/lora.py): a request names adapters of `dir`."""

    # off: no side paths in the DiT (nothing changes for requests), `lora` in a request is a 400
    enabled: bool = False
    # a folder of adapters, one `<name>.safetensors` or `<name>/` diffusers-format folder each, in the
    # formats ZImageLoraLoaderMixin.load_lora_weights reads (community formats through its converters).
    # None with model.source tiny: the tiny model's own `loras/` folder holding its demo adapter
    # `tiny-demo` (serve_app/engines/tiny_model.py); with any other source it must be set
    dir: str | None = None
    # adapters a denoiser replica (every rank of an SP group) keeps loaded; the least recently used is
    # unloaded first (Serve's model multiplexing keeps the count and routes requests to replicas that
    # hold their adapter)
    max_loaded: int = Field(4, ge=1)
    # the rank every linear's side path computes: an adapter set's ranks, summed per layer, must fit it.
    # It costs its FLOPs on every request once adapters are on, adapter or not (benchmarks/bench_lora.py)
    max_rank: int = Field(64, ge=1, le=1024)
    # request limits: adapters in one request, and the range of each one's scale
    max_adapters_per_request: int = Field(4, ge=1)
    max_abs_scale: float = Field(8.0, gt=0)

    @model_validator(mode="after")
    def _a_request_fits_a_replica(self) -> "LoraConfig":
        # a request's adapters are held together: more than max_loaded would unload one of its own
        if self.max_adapters_per_request > self.max_loaded:
            raise ValueError(f"max_adapters_per_request ({self.max_adapters_per_request}) must be at most max_loaded ({self.max_loaded})")
        return self


class VaeConfig(_Strict):
    # decode tiled when the image has more pixels than this (bounds activation memory at 2K and up)
    tiling_min_pixels: int = Field(2048 * 2048, ge=0)
    compile: bool = False  # torch.compile of the decoder
    # True: height and width symbolic, one graph for every size (warmed at start with `start_sizes`);
    # False: a graph per shape, compiled at each size's first request (benchmarks/README.md, "VAE")
    compile_dynamic: bool = True
    # (height, width) that also get a static graph each, compiled at start (with compile_dynamic): its
    # kernels are faster than the symbolic graph's at that size (benchmarks/README.md, "VAE static graphs")
    static_sizes: list[tuple[int, int]] = []
    # a child process compiles the static graphs into the compile cache while the replica compiles its
    # symbolic one, so the replica's static compiles are cache hits (serve_app/engines/vae_static_prefill.py;
    # a GPU not capped by gpu_memory_gb; benchmarks/README.md, "cold start": H200 empty cache 145 -> 116 s)
    prefill_static_graphs: bool = True

    @model_validator(mode="after")
    def _static_sizes_decode_whole(self) -> "VaeConfig":
        for h, w in self.static_sizes:
            if h <= 0 or w <= 0 or h % 16 or w % 16 or h * w > self.tiling_min_pixels:
                raise ValueError(f"static_sizes: {h}x{w} is not a size decoded in one piece (sides multiples of 16, "
                                 f"at most tiling_min_pixels = {self.tiling_min_pixels} pixels)")
        return self


# Our defaults under the user's Serve options, per stage. Serve's own are 5 ongoing requests per replica
# (about one DiT batch) and a queue without bound; a stage with neither num_replicas nor
# autoscaling_config gets num_replicas 1.
SERVE_DEFAULTS = {
    "text_encoder_deployment": {"max_ongoing_requests": 16, "max_queued_requests": 64},
    "denoiser_deployment": {"max_ongoing_requests": 16, "max_queued_requests": 64},
    "vae_deployment": {"max_ongoing_requests": 16, "max_queued_requests": 64},
    "ingress_deployment": {"max_ongoing_requests": 256, "max_queued_requests": 512},
}
# Set by serve_app/app.py, so refused in a config: the deployment's name always, the placement group of
# a sequence-parallel denoiser (a CPU bundle for the replica + one bundle per rank, STRICT_PACK).
APP_SET_KEYS = ("name",)
SP_APP_SET_KEYS = ("placement_group_bundles", "placement_group_strategy")


class DeploymentOptions(BaseModel):
    """One stage's deployment: our batching fields, and Ray Serve's own deployment options.

    Every key besides `max_batch_size` / `batch_wait_timeout_s` is a keyword of Serve's
    `Deployment.options()` spelled as Serve spells it (`num_replicas`, `autoscaling_config`,
    `max_ongoing_requests`, `max_queued_requests`, `ray_actor_options: {num_cpus, num_gpus,
    accelerator_type, memory, runtime_env, resources}`, `health_check_period_s`, ...), kept as given and
    passed through. `AppConfig` checks them against Serve's schema (`check_serve_options`) and puts
    `SERVE_DEFAULTS` under them.
    """

    model_config = ConfigDict(extra="allow", protected_namespaces=())

    max_batch_size: int = Field(4, ge=1)
    batch_wait_timeout_s: float = Field(0.01, ge=0)
    # cap this stage's process at this much GPU memory (torch.cuda.set_per_process_memory_fraction): an
    # out-of-memory error under it shows the stage does not fit its share of a smaller card
    gpu_memory_gb: float | None = Field(None, gt=0)

    def serve_options(self) -> dict[str, Any]:
        """Ray Serve's options of this stage (a copy: callers may add to it)."""
        return copy.deepcopy(self.model_extra or {})

    def actor_options(self) -> dict[str, Any]:
        """Its `ray_actor_options` (a copy): num_cpus, num_gpus, accelerator_type, ..."""
        return self.serve_options().get("ray_actor_options") or {}


class DenoiserRoute(_Strict):
    """One more denoiser deployment, `Denoiser-<name>`, serving every request of at least `min_pixels`
    (height x width; the route with the largest threshold a request reaches wins, serve_app/routing.py):
    e.g. 2048² on sequence-parallel groups while 1024² stays on single-GPU replicas. Its own SP layout,
    warm-up sizes and Serve options; everything else of the DiT (fp8, compile, steps, LoRA, batching
    bounds) is `denoiser`'s."""

    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,40}$")  # the deployment is Denoiser-<name>
    min_pixels: int = Field(ge=1)
    ulysses_degree: int = Field(1, ge=1)
    ring_degree: int = Field(1, ge=1)
    warmup_sizes: list[tuple[int, int]] = Field(default_factory=list)  # (height, width), each one it serves
    # as `denoiser_deployment`: our batching fields and Ray Serve's options (num_replicas or
    # autoscaling_config, ray_actor_options: num_gpus per SP rank, ...)
    deployment: DeploymentOptions = Field(default_factory=DeploymentOptions)

    @property
    def sp_degree(self) -> int:
        return self.ulysses_degree * self.ring_degree

    @property
    def deployment_name(self) -> str:
        return route_deployment_name(self.name)


def _model_in(annotation: Any) -> tuple[type[BaseModel] | None, bool]:
    """The pydantic model a Serve field holds (itself or in a Union; not in a list), and whether a plain
    dict is accepted there too (Serve's schema then passes the dict through unchecked)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation, False
    if typing.get_origin(annotation) is list:
        return None, False
    args = typing.get_args(annotation)
    model = next((a for a in args if isinstance(a, type) and issubclass(a, BaseModel)), None)
    return model, model is not None and any(a is dict or typing.get_origin(a) is dict for a in args)


def _unknown_keys(given: dict, model: type[BaseModel], path: str, what: str) -> list[str]:
    """Serve's schema ignores keys it does not know: name each one, at every level that is a Serve
    model (ray_actor_options, autoscaling_config, logging_config, ...)."""
    fields = {**{f.alias: f for f in model.model_fields.values() if f.alias}, **model.model_fields}
    out = []
    for key, value in given.items():
        where = f"{path}.{key}"
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            out.append(f"{where}: not {what}" + (f" (did you mean {close[0]}?)" if close else ""))
            continue
        nested, _ = _model_in(fields[key].annotation)
        if nested is not None and isinstance(value, dict) and nested.model_config.get("extra") != "allow":
            out += _unknown_keys(value, nested, where, f"a key of Ray Serve's {nested.__name__}")
    return out


def _named(e: ValidationError, path: str) -> list[str]:
    return [f"{'.'.join([path, *map(str, err['loc'])])}: {err['msg'].removeprefix('Value error, ')}" for err in e.errors()]


def check_serve_options(options: dict[str, Any], path: str, refused: tuple[str, ...] = ()) -> list[str]:
    """What is wrong with one stage's Serve options, each problem named `path.key: ...`: keys our app
    sets itself (`refused`), keys that are not Serve deployment options or that `Deployment.options()`
    does not take, and values that Serve's public schema (`ray.serve.schema.DeploymentSchema`) refuses."""
    from ray.serve.deployment import Deployment
    from ray.serve.schema import DeploymentSchema

    takes = set(inspect.signature(Deployment.options).parameters)
    problems = [f"{path}.{key}: set by serve_app/app.py, not by the config" for key in options if key in refused]
    rest = {k: v for k, v in options.items() if k not in refused}
    problems += [f"{path}.{key}: a Ray Serve deployment option that Deployment.options() does not take"
                 for key in rest if key in DeploymentSchema.model_fields and key not in takes]
    problems += _unknown_keys(rest, DeploymentSchema, path, "a Ray Serve deployment option")
    if problems:
        return problems
    try:
        DeploymentSchema.model_validate({"name": path, **copy.deepcopy(rest)})  # its validators write into the dict
    except ValidationError as e:
        return _named(e, path)
    # A field that takes a dict or a Serve model (autoscaling_config, ...) lets the dict through: check it
    # against that model, as Deployment.options() will.
    for key, value in rest.items():
        nested, takes_dict = _model_in(DeploymentSchema.model_fields[key].annotation)
        if takes_dict and isinstance(value, dict):
            try:
                nested.model_validate(copy.deepcopy(value))
            except ValidationError as e:
                problems += _named(e, f"{path}.{key}")
    return problems


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
    # /v1/images/edits uploads (serve_app/uploads.py): a larger file is refused with 413; an image with more
    # pixels (width x height, read from its header before anything is decoded) with 400
    max_upload_bytes: int = Field(20 * 1024 * 1024, ge=1)
    max_upload_pixels: int = Field(50_000_000, ge=1)

    @property
    def smallest_side(self) -> int:
        """The smallest square side the API accepts, at least 64 px: what `/health` warms up with."""
        m = self.size_multiple
        side = -(-max(self.min_size, 64) // m) * m
        return side if side <= self.max_size else self.max_size // m * m

    @property
    def pixel_range(self) -> tuple[int, int]:
        """The fewest and the most pixels (height x width) of a size the API accepts."""
        m = self.size_multiple
        return (-(-self.min_size // m) * m) ** 2, (self.max_size // m * m) ** 2
    # larger JSON bodies get 413 before parsing; multipart uploads may add two files of max_upload_bytes
    max_body_bytes: int = Field(1 << 20, ge=1024)
    max_string_chars: int = Field(256, ge=1)  # model, size, user, quality, style (prompts: max_prompt_chars)
    # how often the ingress re-reads what the replicas publish for /health/ready (Serve's replica states)
    health_refresh_s: float = Field(1.0, gt=0)
    # API keys (serve_app/api_keys.py): `Authorization: Bearer <key>` on every route but /health*, once any
    # key is configured. Keys come from the environment variable `api_keys_env` (comma- or
    # whitespace-separated) and the file `api_keys_file` (one a line, `#` comments; a Kubernetes Secret
    # mounted there), read at start by each ingress replica; `require_api_keys` refuses to start without one.
    api_keys_env: str | None = "SERVE_APP_API_KEYS"
    api_keys_file: str | None = None
    require_api_keys: bool = False
    # Ray's Prometheus endpoint on this node (serve_app/metrics.py): `python -m serve_app.serve_run` starts
    # its local Ray with it (`ray start --metrics-export-port` on a cluster). None: Ray picks a port.
    metrics_export_port: int | None = Field(None, ge=1, le=65535)
    access_log: bool = True  # one JSON line per HTTP request on the ingress's stderr (serve_app/logs.py)

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
    lora: LoraConfig = Field(default_factory=LoraConfig)
    server: ServerConfig = Field(default_factory=ServerConfig)
    # One block per stage: our batching fields and Ray Serve's deployment options (DeploymentOptions).
    text_encoder_deployment: DeploymentOptions = Field(default_factory=DeploymentOptions)
    denoiser_deployment: DeploymentOptions = Field(default_factory=DeploymentOptions)
    vae_deployment: DeploymentOptions = Field(default_factory=DeploymentOptions)
    ingress_deployment: DeploymentOptions = Field(default_factory=DeploymentOptions)
    # more denoiser deployments, each for the requests of at least its min_pixels (DenoiserRoute); the
    # main one above serves every size below the smallest threshold
    denoiser_routes: list[DenoiserRoute] = Field(default_factory=list)

    def route_for(self, height: int, width: int) -> DenoiserRoute | None:
        """The route a request of this size goes to; None: the main denoiser."""
        return choose_route(height * width, self.denoiser_routes)

    def _route(self, name: str) -> DenoiserRoute:
        found = [r for r in self.denoiser_routes if r.name == name]
        if not found:
            raise KeyError(f"no denoiser route {name!r}")
        return found[0]

    def for_route(self, route: str | None) -> "AppConfig":
        """The config one denoiser deployment runs on (its replicas and SP ranks read `denoiser` and
        `denoiser_deployment`): for a route, `denoiser` with the route's SP degrees and warm-up sizes and
        the route's deployment block; no routes of its own. None: the main denoiser's."""
        if route is None:
            return self.model_copy(update={"denoiser_routes": []})
        r = self._route(route)
        denoiser = self.denoiser.model_copy(update={"ulysses_degree": r.ulysses_degree, "ring_degree": r.ring_degree,
                                                    "warmup_sizes": list(r.warmup_sizes)})
        return self.model_copy(update={"denoiser": denoiser, "denoiser_deployment": r.deployment, "denoiser_routes": []})

    def dit_start_sizes(self, route: str | None = None) -> list[tuple[int, int]]:
        """(height, width) one denoiser deployment warms up with at start: its configured ones, then the
        smallest accepted square where this deployment serves it (the /health warm-up's; a small latent
        compiles its own graph). A route never warms a size that another deployment serves."""
        s = self.server.smallest_side
        sizes = [tuple(x) for x in (self._route(route).warmup_sizes if route is not None else self.denoiser.warmup_sizes)]
        serves_square = getattr(self.route_for(s, s), "name", None) == route
        return sizes + ([(s, s)] if serves_square and (s, s) not in sizes else [])

    def start_sizes(self) -> list[tuple[int, int]]:
        """Every size a denoiser deployment warms up with at start (the VAE decodes them all)."""
        sizes: list[tuple[int, int]] = []
        for route in [None] + [r.name for r in self.denoiser_routes]:
            sizes += [x for x in self.dit_start_sizes(route) if x not in sizes]
        return sizes

    def vae_start_sizes(self, compiled: bool) -> list[tuple[int, int]]:
        """`start_sizes`, plus, for a compiled decoder, `vae.static_sizes` and the smallest square the VAE decodes tiled when the
        server accepts one: the tiled path runs the decoder on tile-sized latents, whose graph is warmed
        before traffic like the rest (an eager decoder has nothing to warm there)."""
        sizes = self.start_sizes()
        if not compiled:
            return sizes
        sizes += [tuple(x) for x in self.vae.static_sizes if tuple(x) not in sizes]
        m, top = self.server.size_multiple, self.server.max_size
        side = (math.isqrt(self.vae.tiling_min_pixels) // m + 1) * m  # side * side > tiling_min_pixels
        if side <= top and not any(h * w > self.vae.tiling_min_pixels for h, w in sizes):
            sizes.append((side, side))
        return sizes

    @model_validator(mode="after")
    def _serve_options(self) -> "AppConfig":
        """Check every stage's Serve options against Serve's schema (all problems at once, each named),
        then put our defaults under them."""
        problems = []
        blocks = [(stage, getattr(self, stage), defaults, stage == "denoiser_deployment" and self.denoiser.sp_degree > 1)
                  for stage, defaults in SERVE_DEFAULTS.items()]
        blocks += [(f"denoiser_routes[{i}].deployment", r.deployment, SERVE_DEFAULTS["denoiser_deployment"], r.sp_degree > 1)
                   for i, r in enumerate(self.denoiser_routes)]
        for stage, opts, defaults, sp in blocks:
            refused = APP_SET_KEYS + (SP_APP_SET_KEYS if sp else ())
            given = opts.model_extra or {}
            problems += check_serve_options(given, stage, refused)
            # drain: on shutdown (SIGTERM, an upgrade, a downscale) a replica stops taking new work and
            # finishes what it has for up to this long, which is what a request may take
            grace = self.server.request_timeout_s + (10.0 if stage == "ingress_deployment" else 0.0)
            merged = {**defaults, "graceful_shutdown_timeout_s": grace, **given}
            if "num_replicas" not in merged and "autoscaling_config" not in merged:
                merged["num_replicas"] = 1
            opts.__pydantic_extra__ = merged
        problems += self._route_problems()
        if self.lora.enabled and self.lora.dir is None and self.model.source != "tiny":
            problems.append("lora.dir: required when lora.enabled (only the tiny model has a default, its demo adapter)")
        if self.denoiser.fuse_projections is None:
            self.denoiser = self.denoiser.model_copy(update={"fuse_projections": not self.lora.enabled})
        elif self.lora.enabled and self.denoiser.fuse_projections:
            # adapters are named by the separate linears (to_q, w1, ...), each with a side path of its own
            problems.append("denoiser.fuse_projections: not with lora.enabled (LoRA adapts to_q/to_k/to_v, w1/w3 "
                            "separately); turn one of them off")
        if self.lora.enabled and self.denoiser.cuda_graph_max_pixels is not None:
            problems.append("denoiser.cuda_graph_max_pixels: not with lora.enabled (no graph is captured beside the side paths)")
        if problems:
            raise ValueError("\n".join(problems))
        return self

    def _route_problems(self) -> list[str]:
        """Each route must serve some size the API accepts and leave the main denoiser some; each
        deployment warms only sizes it serves."""
        problems = []
        fewest, most = self.server.pixel_range
        for key in ("name", "min_pixels"):
            seen: set = set()
            for i, r in enumerate(self.denoiser_routes):
                value = getattr(r, key)
                if value in seen:
                    problems.append(f"denoiser_routes[{i}].{key}: {value!r} is another route's too")
                seen.add(value)
        for i, r in enumerate(self.denoiser_routes):
            if r.min_pixels <= fewest:
                problems.append(f"denoiser_routes[{i}].min_pixels: {r.min_pixels} takes even the smallest size the server accepts "
                                f"({fewest} pixels), leaving the main denoiser nothing; it must be above {fewest}")
            if r.min_pixels > most:
                problems.append(f"denoiser_routes[{i}].min_pixels: {r.min_pixels} is above the largest size the server accepts "
                                f"({most} pixels): the route would serve nothing")
        warmups = [("denoiser.warmup_sizes", None, self.denoiser.warmup_sizes)]
        warmups += [(f"denoiser_routes[{i}].warmup_sizes", r.name, r.warmup_sizes) for i, r in enumerate(self.denoiser_routes)]
        for path, route, sizes in warmups:
            for h, w in sizes:
                served_by = self.route_for(h, w)
                if getattr(served_by, "name", None) != route:
                    where = f"route {served_by.name!r}" if served_by is not None else "the main denoiser"
                    problems.append(f"{path}: {h}x{w} is served by {where}; warm it there")
        return problems
