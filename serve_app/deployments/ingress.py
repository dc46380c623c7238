"""HTTP ingress: the OpenAI-compatible images API, driving the stage DAG through deployment handles.

Per request: the prompt is encoded once, then n denoiser calls (consecutive seeds, so they batch)
each followed by its VAE decode; images are encoded to PNG/JPEG/WebP in worker threads. Admission is bounded (429 past
`server.max_inflight_images`), downstream queues are bounded (503 on back-pressure) and every request
has a deadline (504); a cancelled or timed-out request cancels its downstream calls.

Streaming (`stream: true`, serve_app/streaming.py): the same pipeline, with the DiT called as a Serve streaming
response (`denoise_stream`, handle `.options(stream=True)`) that yields each image's queue position, its
steps and previews of its x0 estimate; the ingress turns them into OpenAI's image-streaming Server-Sent
Events. Input is checked before the stream starts (a bad request is a plain 4xx JSON answer), and a client
that disconnects mid-stream cancels the request's work as any cancelled request does.

Edits (POST /v1/images/edits, multipart): the uploads are checked from their headers here (413 / 400
before anything is decoded, serve_app/uploads.py), decoded and resized in a worker thread, VAE-encoded
(one call per request, one posterior sample per seed) while the prompt is encoded, then denoised from
the image's latents with the request's strength (and mask) and decoded as a generation is.

Size routing (`denoiser_routes`, serve_app/routing.py): each request's DiT calls go to the denoiser
deployment its pixel count picks (the main `Denoiser` or a route's `Denoiser-<name>`), plain, streamed and
edit alike; LoRA multiplexing applies on that deployment's handle.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import random
import time

from dataclasses import dataclass

from fastapi import FastAPI, File, Form, UploadFile
from fastapi.responses import FileResponse, StreamingResponse
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, RequestCancelledError
from ray.serve.handle import DeploymentHandle

from serve_app.api_keys import ApiKeyMiddleware, ApiKeys, load_keys
from serve_app.logs import AccessLog, AccessLogMiddleware, note
from serve_app.metrics import IngressMetrics
from serve_app.body_limit import BodyLimit, BodyLimitMiddleware
from serve_app.config import AppConfig
from serve_app.errors import StageFailed, error_response, install_error_handlers, internal_error, named_stage, unwrap
from serve_app.health import Readiness
from serve_app.image_encoding import encode_image
from serve_app import streaming, web
from serve_app.engines.previews import preview_steps
from serve_app.openai_api import (
    APIError,
    styles_list,
    ImageEditRequest,
    ImageGenerationRequest,
    ValidatedRequest,
    param_from_pydantic_loc,
    parse_lora_form,
    validate_edit_request,
    validate_lora,
    validate_request,
    warmup_size,
)
from serve_app.engines.lora import list_adapters
from serve_app.engines.model_sources import lora_folder
from serve_app.openapi_limits import configure as configure_openapi
from serve_app.openapi_limits import install_openapi
from serve_app.prompt_limits import PromptLimits
from serve_app.routing import MAIN_DEPLOYMENT
from serve_app.stage_messages import DenoisedLatents, DenoiseRequest, ImageToEncode
from serve_app.uploads import load_edit_inputs, output_size

log = logging.getLogger("ray.serve")

api = FastAPI(
    title="Z-Image-Turbo on Ray Serve",
    description="OpenAI-compatible image generation (POST /v1/images/generations) and editing (POST /v1/images/edits).",
    version="0.1.0",
    # FastAPI's /docs and /redoc load their scripts from a CDN; ours are served from the package (web/docs.html)
    docs_url=None,
    redoc_url=None,
)


# Every non-2xx answer OpenAI-shaped, with a request id (serve_app/errors.py); the body-size limit before
# any parsing (serve_app/body_limit.py; the ingress sets the limit from its config).
install_error_handlers(api)
api.add_middleware(BodyLimitMiddleware, limits=BodyLimit)
api.add_middleware(ApiKeyMiddleware)  # outside the body limit: no key, nothing read (serve_app/api_keys.py)
api.add_middleware(AccessLogMiddleware)  # outermost: every answer logged and counted (serve_app/logs.py)
install_openapi(api)  # the schema as served: 400s, every limit, from the config (serve_app/openapi_limits.py)


@dataclass
class EditUpload:
    image: bytes
    mask: bytes | None


def _pydantic_400(e: Exception) -> APIError:
    errs = getattr(e, "errors", lambda: [])()
    param = param_from_pydantic_loc(tuple(errs[0]["loc"])) if errs else None
    return APIError(400, str(e), param=param, code="invalid_value")


def _cancel_all(responses: list) -> None:
    # DeploymentResponse.cancel() may block until the call is assigned and re-raises the call's own
    # error (e.g. BackPressureError), so it runs in a worker thread and its errors are dropped.
    for r in responses:
        try:
            r.cancel()
        except Exception:
            pass


@serve.deployment
@serve.ingress(api)
class ImageIngress:
    def __init__(self, text_encoder: DeploymentHandle, denoiser: DeploymentHandle, vae: DeploymentHandle, app_config: dict,
                 denoiser_routes: dict[str, DeploymentHandle] | None = None):
        """`denoiser`: the main denoiser; `denoiser_routes`: each size route's (`AppConfig.denoiser_routes`), by name."""
        self.cfg = AppConfig.model_validate(app_config)
        self.server = self.cfg.server
        self.text_encoder = text_encoder
        self.denoiser = denoiser
        self.denoiser_routes = denoiser_routes or {}
        self.vae = vae
        self.inflight_images = 0
        self.counters = {"requests": 0, "images": 0, "rejected_429": 0, "rejected_503": 0, "timeouts_504": 0, "worker_died_503": 0, "errors_500": 0}
        self.draining = False
        self.prompt_limits = PromptLimits(self.cfg)  # the model's own limits: tokenizer, DiT positions
        self.lora_folder = lora_folder(self.cfg.model, self.cfg.lora)  # None: LoRA off
        BodyLimit.max_body_bytes = self.server.max_body_bytes
        BodyLimit.max_multipart_bytes = self.server.max_body_bytes + 2 * self.server.max_upload_bytes  # image + mask
        configure_openapi(self.cfg, self.prompt_limits.max_tokens)
        ApiKeys.configure(load_keys(self.server))
        self.metrics = IngressMetrics()
        AccessLog.configure(self.metrics, self.server.access_log)
        stages = [(h.app_name, h.deployment_name) for h in (text_encoder, denoiser, *self.denoiser_routes.values(), vae)]
        self.readiness = Readiness(self.server.health_refresh_s, self._warmup if self.server.warmup else None, stages)
        try:
            self.readiness.start()
        except RuntimeError:  # no running loop in the constructor: started by the first request
            pass

    async def _warmup(self) -> None:
        await self._generate(ImageGenerationRequest(prompt="warm-up", size=warmup_size(self.server), num_inference_steps=1, seed=0))

    # ---- the Python handle API -------------------------------------------------------------
    async def generate(self, prompt: str, **params) -> dict:
        """`await serve.get_app_handle("z-image").generate.remote("a fox", seed=1, size="512x512")`.

        Takes the same fields as the HTTP body and returns
        `{"created", "data": [{"image": bytes, "format", "width", "height", "seed", "timings"}], "timings"}`.
        Raises `APIError` for invalid input or overload (its `.status` says which)."""
        try:
            req = ImageGenerationRequest(prompt=prompt, **params)
        except Exception as e:  # pydantic ValidationError -> the same 400 the HTTP API gives
            errs = getattr(e, "errors", lambda: [])()
            param = param_from_pydantic_loc(tuple(errs[0]["loc"])) if errs else None
            raise APIError(400, str(e), param=param, code="invalid_value") from None
        return await self._generate(req)

    async def edit(self, image: bytes, prompt: str, mask: bytes | None = None, **params) -> dict:
        """`await handle.edit.remote(image_bytes, "a fox", mask=png_bytes, strength=0.6, seed=1)`: the fields
        of POST /v1/images/edits, the files as bytes; returns what `generate` returns."""
        try:
            req = ImageEditRequest(prompt=prompt, **params)
        except Exception as e:
            raise _pydantic_400(e) from None
        return await self._edit(req, EditUpload(image, mask))

    # ---- HTTP routes -----------------------------------------------------------------------
    @api.post("/v1/images/generations")
    async def images_generations(self, body: ImageGenerationRequest) -> dict:
        if body.stream:
            return await self._stream(body, None, "image_generation")
        return await self._respond(await self._generate(body))

    async def _stream(self, body: ImageGenerationRequest, edit: EditUpload | None, prefix: str) -> StreamingResponse:
        if edit is not None:
            body = await self._edit_size(body, edit)
        req = await self._admit(body, edit)  # every 4xx before the stream starts: a plain JSON answer
        return StreamingResponse(streaming.sse(lambda emit: self._run(req, edit, emit), req, prefix),
                                 media_type="text/event-stream", headers={"cache-control": "no-cache", "x-accel-buffering": "no"})

    async def _respond(self, result: dict) -> dict:
        data = []
        for item in result["data"]:
            b64 = await asyncio.to_thread(base64.b64encode, item.pop("image"))
            data.append({"b64_json": b64.decode("ascii"), "revised_prompt": None, **item})
        return {**result, "data": data}

    @api.post("/v1/images/edits")
    async def images_edits(
        self,
        image: UploadFile = File(..., description="PNG, JPEG or WebP; the first frame of an animated file."),
        prompt: str = Form(...),
        mask: UploadFile | None = File(None, description="PNG; its transparent pixels mark where to paint."),
        model: str | None = Form(None),
        n: int = Form(1),
        size: str | None = Form(None, description="'WIDTHxHEIGHT'; default: the image's, fitted to the bounds."),
        response_format: str = Form("b64_json"),
        output_format: str | None = Form(None),
        quality: str | None = Form(None),
        user: str | None = Form(None),
        background: str | None = Form(None),
        input_fidelity: str | None = Form(None),
        output_compression: int | None = Form(None),
        strength: float | None = Form(None),
        seed: int | None = Form(None),
        num_inference_steps: int | None = Form(None),
        guidance_scale: float = Form(0.0),
        negative_prompt: str | None = Form(None),
        lora: str | None = Form(None, description="An adapter name, or a JSON list of {name, scale}."),
        style_preset: str | None = Form(None),
        stream: bool = Form(False),
        partial_images: int | None = Form(None),
        preview_kind: str | None = Form(None),
        moderation: str | None = Form(None),
    ) -> dict:
        # FastAPI resolves this signature's (string) annotations from the method's globals, and the Serve
        # replica gets the method by value with only the globals its body names: so name UploadFile here
        UploadFile  # noqa: B018
        fields = dict(
            prompt=prompt, model=model, n=n, size=size, response_format=response_format, output_format=output_format,
            quality=quality, user=user, background=background, input_fidelity=input_fidelity,
            output_compression=output_compression, strength=strength, seed=seed,
            num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, negative_prompt=negative_prompt,
            lora=parse_lora_form(lora),
            style_preset=style_preset, stream=stream, partial_images=partial_images, preview_kind=preview_kind, moderation=moderation,
        )
        try:
            body = ImageEditRequest(**fields)
        except Exception as e:
            raise _pydantic_400(e) from None
        limit = self.server.max_upload_bytes
        files = {}
        for name, f in (("image", image), ("mask", mask)):
            if f is None:
                continue
            if f.size is not None and f.size > limit:  # Starlette spooled it to a temporary file
                raise APIError(413, f"{name}: the file is larger than {limit} bytes", param=name, code="payload_too_large", type="invalid_request_error")
            files[name] = await f.read(limit + 1)
        upload = EditUpload(files["image"], files.get("mask"))
        if body.stream:
            return await self._stream(body, upload, "image_edit")
        return await self._respond(await self._edit(body, upload))

    @api.get("/v1/styles")
    async def styles(self) -> dict:
        """The style presets `style_preset` takes, with their prompt templates (`{prompt}` is the prompt)."""
        return styles_list()

    # ---- the page (serve_app/web/), offline: no CDN, no build step ----------------------------
    @api.get("/", include_in_schema=False)
    async def page(self):
        return FileResponse(web.path("index.html"), media_type="text/html")

    @api.get("/docs", include_in_schema=False)
    async def docs(self):
        return FileResponse(web.path("docs.html"), media_type="text/html")

    @api.get("/web/{name}", include_in_schema=False)
    async def web_file(self, name: str):
        return FileResponse(web.path(name), media_type=web.media_type(name))

    @api.get("/v1/models")
    async def models(self) -> dict:
        return {"object": "list", "data": [{"id": self.cfg.model.name, "object": "model", "created": 0, "owned_by": "serve_app"}]}

    @api.get("/v1/loras")
    async def loras(self) -> dict:
        """The LoRA adapters a request may name in `lora` (the adapters of `lora.dir`)."""
        names = await asyncio.to_thread(list_adapters, self.lora_folder) if self.lora_folder is not None else []
        return {"object": "list", "data": [{"id": n, "object": "lora"} for n in names]}

    @api.get("/health/live")
    async def health_live(self) -> dict:
        """Liveness: the ingress answers. Touches no stage."""
        self.readiness.start()
        return {"status": "ok"}

    @api.get("/health/ready")
    async def health_ready(self):
        """Readiness from the replicas' published state (serve_app/health.py); never queues on a stage."""
        self.readiness.start()
        await self.readiness.refresh()
        ok, reason = self.readiness.ready()
        if self.draining:
            ok, reason = False, "shutting down"
        if ok:
            return {"status": "ok"}
        return error_response(APIError(503, f"not ready: {reason}", code="not_ready", type="server_error"))

    @api.get("/health")
    async def health(self):
        return await self.health_ready()

    # ---- drain (serve_app/serve_run.py calls these on SIGTERM / Ctrl-C before Serve shuts down) ----
    async def drain(self) -> float:
        """Stop taking new requests (503 `unavailable`, readiness off); returns how long in-flight ones may take."""
        self.draining = True
        return self.server.request_timeout_s

    async def inflight(self) -> int:
        return self.inflight_images

    @api.get("/v1/stats")
    async def stats(self) -> dict:
        # the ingress's own counters as of this call: the stages' replies may wait for a free request slot
        ingress = {**self.counters, "inflight_images": self.inflight_images, "readiness": self.readiness.body()}
        names = list(self.denoiser_routes)
        te, dn, vae, *routes = await asyncio.gather(self.text_encoder.stats.remote(), self.denoiser.stats.remote(), self.vae.stats.remote(),
                                                    *[self.denoiser_routes[n].stats.remote() for n in names])
        return {"ingress": ingress, "text_encoder": te, "denoiser": dn, "vae": vae,
                **({"denoiser_routes": dict(zip(names, routes))} if names else {})}

    def _denoiser_for(self, req: ValidatedRequest) -> tuple[str, DeploymentHandle]:
        """The denoiser deployment (its name, its handle) that serves a request of this size."""
        route = self.cfg.route_for(req.height, req.width)
        if route is None:
            return MAIN_DEPLOYMENT, self.denoiser
        return route.deployment_name, self.denoiser_routes[route.name]

    # ---- the pipeline ----------------------------------------------------------------------
    async def _edit_size(self, body: ImageEditRequest, upload: EditUpload) -> ImageEditRequest:
        if body.size is None:  # the header only: format, byte and pixel limits, orientation
            width, height = await asyncio.to_thread(output_size, upload.image, self.server)
            body = body.model_copy(update={"size": f"{width}x{height}"})
        return body

    async def _edit(self, body: ImageEditRequest, upload: EditUpload) -> dict:
        return await self._generate(await self._edit_size(body, upload), upload)

    async def _generate(self, body: ImageGenerationRequest, edit: EditUpload | None = None) -> dict:
        return await self._run(await self._admit(body, edit), edit)

    async def _admit(self, body: ImageGenerationRequest, edit: EditUpload | None = None) -> ValidatedRequest:
        """Every check a request gets before any stage runs: its 400s, draining (503), capacity (429)."""
        dn_cfg = self.cfg.denoiser
        if edit is None:
            req = validate_request(body, self.server, self.cfg.model.name, dn_cfg.max_steps, dn_cfg.default_steps)
        else:
            req = validate_edit_request(body, self.server, self.cfg.model.name, dn_cfg.max_steps, dn_cfg.default_steps, edit.mask is not None)
        req.lora = await asyncio.to_thread(validate_lora, body.lora, self.cfg.lora, self.lora_folder)
        # the model's own limits, per request, before any stage: a prompt that would fail inside a batch
        # (untokenisable, or past the DiT's position tables) is this request's 400 alone
        await asyncio.to_thread(self.prompt_limits.check, req.prompt, "prompt")
        if req.guidance_scale > 0 and req.negative_prompt:
            await asyncio.to_thread(self.prompt_limits.check, req.negative_prompt, "negative_prompt")
        self.prompt_limits.check_size(req.width, req.height)
        if self.draining:
            raise APIError(503, "the server is shutting down; retry on another replica", code="unavailable")
        self._check_capacity(req)
        return req

    def _check_capacity(self, req: ValidatedRequest) -> None:
        if self.inflight_images + req.n > self.server.max_inflight_images:
            self.counters["rejected_429"] += 1
            raise APIError(429, "the server is at capacity; retry later", code="rate_limit_exceeded")

    async def _run(self, req: ValidatedRequest, edit: EditUpload | None = None, emit=None) -> dict:
        """The stages for an admitted request; with `emit`, each image's progress and previews are passed
        to it as they come (streaming), as dicts of serve_app/streaming.py's events."""
        self._check_capacity(req)  # again: a streamed request starts after its admission
        self.inflight_images += req.n
        self.metrics.inflight.set(self.inflight_images)
        note(n=req.n, steps=req.steps, size=f"{req.width}x{req.height}")
        self.counters["requests"] += 1
        t0 = time.perf_counter()
        responses: list = []
        ok = False
        try:
            images = await asyncio.wait_for(self._run_dag(req, responses, edit, emit), timeout=self.server.request_timeout_s)
            ok = True
        except asyncio.TimeoutError:
            self.counters["timeouts_504"] += 1
            raise APIError(504, f"request took longer than {self.server.request_timeout_s} s", code="timeout") from None
        except BackPressureError:
            self.counters["rejected_503"] += 1
            raise APIError(503, "a model stage's queue is full; retry later", code="overloaded") from None
        except DeploymentUnavailableError:
            self.counters["rejected_503"] += 1
            raise APIError(503, "a model stage is unavailable; retry later", code="unavailable") from None
        except (asyncio.CancelledError, RequestCancelledError):
            raise
        except APIError as e:  # ours, or a stage's (a per-item check there), which Ray wraps: re-raised plain
            inner = unwrap(e)
            raise APIError(inner.status, inner.message, inner.param, inner.code, inner.type) from None
        except RayActorError as e:
            # A stage's process died under this request: a replica, or one rank of an SP denoiser group
            # (the replica re-raises the rank's ActorDiedError at once; Serve's health check then
            # replaces the replica and its whole group). Transient: 503, retry.
            self.counters["worker_died_503"] += 1
            log.warning("a stage's worker died during a request: %s", type(e).__name__)
            raise APIError(
                503, "a model worker died during this request; the stage is being restarted, retry", code="worker_died", type="server_error"
            ) from None
        except StageFailed as e:
            self.counters["errors_500"] += 1
            raise internal_error(f"the {e.stage} stage failed on this request", e.error) from None
        except Exception as e:
            self.counters["errors_500"] += 1
            raise internal_error("generation failed", e) from None
        finally:
            self.inflight_images -= req.n
            self.metrics.inflight.set(self.inflight_images)
            if not ok:  # a failed, timed-out or disconnected request frees its queued downstream work
                asyncio.get_running_loop().run_in_executor(None, _cancel_all, responses)
        decoded, seeds = images
        self.readiness.warm = True  # a generation went through every stage: as good as the warm-up
        t_stages = time.perf_counter()
        encoded = await asyncio.gather(*[asyncio.to_thread(encode_image, d.pixels.numpy(), req.output_format, self.server) for d in decoded])
        t_end = time.perf_counter()
        self.counters["images"] += req.n
        data = []
        for d, seed, img in zip(decoded, seeds, encoded):
            t = d.timings
            compute = t.get("text_encoder_s", 0) + t.get("denoiser_s", 0) + t.get("vae_s", 0)
            timings = {
                "text_encoder_s": t.get("text_encoder_s", 0.0),
                "denoiser_s": t.get("denoiser_s", 0.0),
                "vae_s": t.get("vae_s", 0.0),
                "encode_s": t_end - t_stages,
                "queue_s": max(0.0, (t_stages - t0) - compute),
                "total_s": t_end - t0,
                "denoiser_batch": t.get("denoiser_batch", 1),
                # which denoiser deployment ran it: Denoiser, or a size route's Denoiser-<name>
                "denoiser_deployment": t.get("denoiser_deployment", MAIN_DEPLOYMENT),
                # reading this request's LoRA adapters on the DiT replica (0: it held them already)
                "lora_load_s": t.get("lora_load_s", 0.0),
            }
            data.append({"image": img, "format": req.output_format, "width": req.width, "height": req.height, "seed": seed, "timings": timings,
                         **({"revised_prompt": req.revised_prompt} if req.revised_prompt is not None else {})})
        self.metrics.image_timings("/v1/images/edits" if edit is not None else "/v1/images/generations", [d["timings"] for d in data])
        note(timings={k: round(max(d["timings"][k] for d in data), 4) for k in timings if k.endswith("_s")})
        return {"created": int(time.time()), "data": data, "timings": {"total_s": t_end - t0, "encode_s": t_end - t_stages}}

    async def _run_dag(self, req: ValidatedRequest, responses: list, edit: EditUpload | None = None, emit=None):
        # a drawn seed stays below 2**53, so that it and its n - 1 successors survive any JSON parser (a
        # browser's numbers are doubles): the page shows it and sends it back to reproduce the image
        first_seed = req.seed if req.seed is not None else random.randrange(2**53 - self.server.max_n)
        seeds = [first_seed + i for i in range(req.n)]

        def call(stage, method, *args):
            r = method.remote(*args)
            responses.append(r)
            return named_stage(r, stage)

        # Each stage is awaited here rather than chained as unresolved responses: Serve checks a stage's
        # max_queued_requests when the call is made and does not count a call still waiting for an
        # unresolved argument, so chained calls would bypass the 503; and a dead DiT rank would surface
        # as Serve's generic "upstream actor died".
        async def encode_image_latents():
            if edit is None:
                return None, None
            inputs = await asyncio.to_thread(load_edit_inputs, edit.image, edit.mask, req.width, req.height, self.server)
            return await call("VAE encoder", self.vae.encode, ImageToEncode(pixels=inputs.pixels, seeds=seeds)), inputs.mask

        if emit is not None:
            for i in range(req.n):
                emit(streaming.progress(i, "encoding", 0, 0))
        encodes = [call("text encoder", self.text_encoder.encode, req.prompt)]
        if req.guidance_scale > 0:
            encodes.append(call("text encoder", self.text_encoder.encode, req.negative_prompt or ""))
        *encoded, (image_latents, mask) = await asyncio.gather(*encodes, encode_image_latents())
        prompt, negative = encoded[0], (encoded[1] if len(encoded) > 1 else None)
        text_encoder_s = sum(e.timings.get("text_encoder_s", 0.0) for e in encoded)
        denoiser_name, denoiser_handle = self._denoiser_for(req)  # by the request's pixel count

        async def one_image(i: int, seed: int):
            request = DenoiseRequest(
                embeds=prompt.embeds, height=req.height, width=req.width, steps=req.steps, seed=seed,
                guidance_scale=req.guidance_scale, negative_embeds=negative.embeds if negative is not None else None,
                companions=max(req.n, prompt.batch), lora=req.lora,
            )
            if image_latents is not None:
                request.image_latents, request.strength, request.mask = image_latents.latents[i], req.strength, mask
            # Serve's model multiplexing: to a replica that holds the (first) adapter, if one does
            denoiser = denoiser_handle.options(multiplexed_model_id=req.lora[0][0]) if req.lora else denoiser_handle
            if emit is None:
                latents = await call("denoiser", denoiser.denoise, request)
            else:
                request.preview_steps, request.preview_kind = preview_steps(request.run_steps, req.partial_images), req.preview_kind
                latents = await self._denoise_streamed(request, i, seed, req, responses, emit, denoiser)
                emit(streaming.progress(i, "decoding", request.run_steps, request.run_steps))
            decoded = await call("VAE decoder", self.vae.decode, latents)
            decoded.timings["text_encoder_s"] = text_encoder_s
            decoded.timings["denoiser_deployment"] = denoiser_name
            return decoded

        return await asyncio.gather(*[one_image(i, s) for i, s in enumerate(seeds)]), seeds

    async def _denoise_streamed(self, request: DenoiseRequest, i: int, seed: int, req: ValidatedRequest, responses: list, emit,
                                denoiser) -> DenoisedLatents:
        """The DiT (`denoiser`: the handle, multiplexed for the request's adapters) as a Serve streaming
        response: progress and previews to `emit`, returns the latents."""
        stream = denoiser.options(stream=True).denoise_stream.remote(request)
        responses.append(stream)
        latents, previews = None, 0
        async for item in streaming.stage_stream(stream, "denoiser"):
            if isinstance(item, DenoisedLatents):
                latents = item
            elif item.queue_position is not None:
                emit(streaming.progress(i, "queued", 0, item.steps, queue_position=item.queue_position))
            else:
                emit(streaming.progress(i, "denoising", item.step, item.steps))
                if item.preview is not None:
                    if item.preview_kind == "vae":  # the VAE stage decodes the x0 estimate as it decodes a result
                        preview_call = self.vae.decode.remote(DenoisedLatents(latents=item.preview))
                        responses.append(preview_call)
                        decoded = await named_stage(preview_call, "VAE decoder")
                        pixels = decoded.pixels
                    else:
                        pixels = item.preview
                    image = await asyncio.to_thread(streaming.encode_preview, pixels, req.width, req.height, req.output_format, self.server)
                    emit(streaming.partial_image(i, seed, previews, item.step, item.steps, image, req))
                    previews += 1
        if latents is None:
            raise StageFailed("denoiser", RuntimeError("the DiT's stream ended without latents"))
        return latents
