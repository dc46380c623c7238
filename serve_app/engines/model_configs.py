"""The model configurations: the published Z-Image-Turbo one (random-full builds it), and the tiny one
(the same classes at a few layers, for tests and CPU demos) as what it changes of it."""

# The published Z-Image-Turbo configuration (transformer, Qwen3-4B text encoder, Flux VAE, scheduler).
FULL_TRANSFORMER_CONFIG = dict(axes_lens=[1536, 512, 512])  # all else: ZImageTransformer2DModel defaults
FULL_TEXT_ENCODER_CONFIG = dict(
    vocab_size=151936,
    hidden_size=2560,
    intermediate_size=9728,
    num_hidden_layers=36,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=128,
    max_position_embeddings=40960,
    rope_theta=1_000_000.0,
    rms_norm_eps=1e-6,
    tie_word_embeddings=True,
)
FULL_VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    latent_channels=16,
    block_out_channels=[128, 256, 512, 512],
    down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4,
    layers_per_block=2,
    norm_num_groups=32,
    sample_size=1024,
    scaling_factor=0.3611,
    shift_factor=0.1159,
    use_quant_conv=False,
    use_post_quant_conv=False,
    force_upcast=True,
)
FULL_SCHEDULER_CONFIG = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False)

TINY_TEXT_ENCODER_CONFIG = {  # the vocabulary's size comes from the tiny tokenizer
    **{k: v for k, v in FULL_TEXT_ENCODER_CONFIG.items() if k != "vocab_size"},
    "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 3, "num_attention_heads": 4,
    "num_key_value_heads": 2, "head_dim": 16, "max_position_embeddings": 1024,
}
# 6 heads: Ulysses 2, 3 and 6 divide them and 4 does not, as with the real model's 30.
TINY_TRANSFORMER_CONFIG = dict(
    all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=96, n_layers=2, n_refiner_layers=2,
    n_heads=6, n_kv_heads=6, norm_eps=1e-5, qk_norm=True, cap_feat_dim=64, rope_theta=256.0, t_scale=1000.0,
    axes_dims=[8, 4, 4], axes_lens=[256, 128, 128],
)
TINY_VAE_CONFIG = {
    **FULL_VAE_CONFIG,
    "block_out_channels": [16, 16, 32, 32], "layers_per_block": 1, "norm_num_groups": 8, "sample_size": 32,
}
TINY_SCHEDULER_CONFIG = FULL_SCHEDULER_CONFIG
