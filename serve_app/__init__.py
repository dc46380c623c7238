"""Ray Serve server for Z-Image-Turbo.

  config.py        the one typed configuration (what every configs/*.yaml maps onto)
  app.py           the Serve application: three stage deployments and the ingress, from a config
  deployments/     thin Serve shells: text encoder, denoiser, VAE, the HTTP ingress, the DiT batcher
  engines/         the model math, free of Ray (one engine per stage)
  sp/              sequence parallelism: one denoiser replica over several GPUs
  openai_api.py    request schema, validation, OpenAI-shaped errors; image_encoding.py: PNG / JPEG / WebP
  uploads.py       /v1/images/edits uploads: parsing and the hostile-input checks (engines/edit_inputs.py: the
                   size rule, resize and mask as diffusers prepares an edit's inputs)
  stage_messages.py  what the stages pass each other
  errors.py, body_limit.py, openapi_limits.py, prompt_limits.py  the error contract, the body limit, the
                   served schema with its limits, the model-derived prompt limit
  health.py        liveness / readiness from the replicas' published state
  serve_run.py     `serve run` that refuses a bound port and drains on SIGTERM
  metrics.py, request_ids.py, logs.py, api_keys.py, quiet.py  operations: Prometheus metrics per stage,
                   request ids, the JSON access log, optional API keys, filtered start-up noise
  pipeline.py, generate.py  the three engines in one process, and its command line
"""

from serve_app import quiet as _quiet

_quiet.install()  # known-harmless third-party start-up noise, filtered narrowly (serve_app/quiet.py says what and why)
