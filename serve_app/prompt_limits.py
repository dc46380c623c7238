"""What a prompt may be, from the loaded model itself: tokenisable by its tokenizer, and no longer (in
tokens, after the text encoder's `max_sequence_length` truncation) than the DiT's position tables hold
(`serve_app.engines.dit_positions.position_limits` of the transformer's config). The ingress checks every
prompt here before any stage sees it, so a prompt that would fail inside a batch is a 400 alone."""

from __future__ import annotations

from serve_app.config import AppConfig
from serve_app.openai_api import APIError


class PromptLimits:
    def __init__(self, cfg: AppConfig):
        from serve_app.engines.dit_positions import PIXELS_PER_LATENT_PATCH, position_limits
        from serve_app.engines.model_sources import load_tokenizer, load_transformer_config

        self.tokenizer = load_tokenizer(cfg.model)
        self.max_sequence_length = cfg.text_encoder.max_sequence_length
        dit_tokens, rows, cols = position_limits(load_transformer_config(cfg.model))
        self.dit_max_tokens = dit_tokens
        # longer prompts are truncated to max_sequence_length (as diffusers does) when the DiT holds that many
        self.max_tokens = min(dit_tokens, self.max_sequence_length)
        self.max_height, self.max_width = rows * PIXELS_PER_LATENT_PATCH, cols * PIXELS_PER_LATENT_PATCH

    def count_tokens(self, text: str, param: str) -> int:
        from serve_app.engines.text_encoder import chat_templated

        try:
            return len(self.tokenizer(chat_templated(self.tokenizer, text)).input_ids)
        except Exception as e:  # e.g. a lone UTF-16 surrogate: the tokenizer refuses the string
            raise APIError(400, f"{param} cannot be tokenized ({type(e).__name__}); send valid Unicode text",
                           param=param, code="invalid_value") from None

    def check(self, text: str, param: str) -> int:
        n = self.count_tokens(text, param)
        if min(n, self.max_sequence_length) > self.dit_max_tokens:
            raise APIError(400, f"{param} is {n} tokens with the chat template; this model takes at most {self.dit_max_tokens}",
                           param=param, code="prompt_too_long")
        return n

    def check_size(self, width: int, height: int) -> None:
        if width > self.max_width or height > self.max_height:
            raise APIError(400, f"size {width}x{height}: this model takes at most {self.max_width}x{self.max_height}",
                           param="size", code="invalid_value")
