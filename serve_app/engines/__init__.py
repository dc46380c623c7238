"""The model math, free of Ray: one engine per stage that a test can call directly, and what they use.

  text_encoder.py (+ text_encoder_graphs.py)   prompts -> embeddings (Qwen3)
  denoiser.py                                  embeddings -> latents: the DiT loop and the `Denoiser` protocol
  dit_builder.py                               the one way to build the DiT: processors -> SP plan -> FP8 -> compile
  attention_processor.py, fa3_attention.py     Z-Image attention with real RoPE, FlashAttention-3
  fp8_linear.py                                FP8 linears with per-row scales
  vae.py                                       latents -> uint8 pixels
  model_sources.py, tiny_model.py, model_configs.py   hub / tiny / random-full weights
  platform.py, devices.py, compile_cache.py    what the chip can do, device and dtype, Inductor's cache
  library_internals.py                         every private diffusers / torch internal we touch
"""
