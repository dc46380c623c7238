"""Text encoder stage: prompts -> one variable-length embedding per prompt.

Same computation as `ZImagePipeline._encode_prompt` (chat template with thinking enabled, Qwen3, the
second-to-last hidden state, padding removed), but one forward per batch padded only to the batch's
longest prompt instead of to 512 tokens, and without running the last decoder layer whose output
Z-Image never reads.
"""

from __future__ import annotations

import logging

import torch

from serve_app.config import ModelConfig, TextEncoderConfig
from serve_app.engines.compile_cache import use_compile_cache
from serve_app.engines.devices import placement
from serve_app.engines.model_sources import load_text_encoder, load_tokenizer
from serve_app.engines.text_encoder_graphs import EncoderGraphs

log = logging.getLogger(__name__)


def chat_templated(tokenizer, prompt: str) -> str:
    """The prompt as Z-Image feeds it to Qwen3 (chat template, thinking enabled)."""
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True, enable_thinking=True
    )


class TextEncoderEngine:
    def __init__(self, model_cfg: ModelConfig, cfg: TextEncoderConfig):
        self.cfg = cfg
        self.device, self.dtype = placement(model_cfg)
        self.tokenizer = load_tokenizer(model_cfg)
        # offloaded: the weights stay in CPU memory and accelerate's hooks bring each layer to the device
        # for its forward (SGLang-diffusion's --text-encoder-cpu-offload)
        self.model = load_text_encoder(model_cfg, torch.device("cpu") if cfg.cpu_offload else self.device, self.dtype)
        if cfg.skip_last_layer:
            # hidden_states[-2] is the output of layer n-2: run n-1 layers and skip the final norm.
            self.model.layers = self.model.layers[:-1]
            self.model.config.num_hidden_layers -= 1
            self.model.norm = torch.nn.Identity()
        if cfg.cpu_offload:
            from accelerate import cpu_offload

            cpu_offload(self.model, execution_device=self.device)
        self.hidden_size = self.model.config.hidden_size
        graphed = cfg.cuda_graph and self.device.type == "cuda" and not cfg.cpu_offload
        self.norms_compiled = graphed and cfg.compile_norms
        if self.norms_compiled:
            from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm

            use_compile_cache(model_cfg.compile_cache_dir)
            for m in self.model.modules():
                if isinstance(m, Qwen3RMSNorm):
                    m.compile(dynamic=True, fullgraph=True)
        # CUDA graphs of the forward, captured by warmup() or on a shape's first use (not of moving weights)
        self.graphs = None
        if graphed:
            pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
            self.graphs = EncoderGraphs(self.model, cfg.skip_last_layer, pad_id, cfg.cuda_graph_max_batch)

    def _templated(self, prompt: str) -> str:
        return chat_templated(self.tokenizer, prompt)

    def count_tokens(self, prompt: str) -> int:
        return len(self.tokenizer(self._templated(prompt)).input_ids)

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> list[torch.Tensor]:
        """One [tokens, hidden] tensor per prompt (on the engine's device), truncated at max_sequence_length.
        Right padding under a causal mask leaves the real tokens' states unchanged by the pad length."""
        texts = [self._templated(p) for p in prompts]
        inputs = self.tokenizer(
            texts,
            padding="max_length" if self.cfg.pad_to_max_length else "longest",
            max_length=self.cfg.max_sequence_length,
            truncation=True,
            pad_to_multiple_of=None if self.cfg.pad_to_max_length else self.cfg.pad_to_multiple_of,
            return_tensors="pt",
            padding_side="right",  # what the graphs' causal-only attention relies on
        )
        ids = inputs.input_ids.to(self.device)
        mask = inputs.attention_mask.to(self.device).bool()
        bucket = self.graphs.bucket(ids.shape[0]) if self.graphs is not None else None
        # a shape warmup() did not see is captured now
        if bucket is not None and ((bucket, ids.shape[1]) in self.graphs.graphs or self._capture(ids.shape[1], [bucket])):
            return self.graphs.run(ids, lambda hidden: [hidden[i][mask[i]] for i in range(len(prompts))])
        if self.cfg.skip_last_layer:
            hidden = self.model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
        else:
            hidden = self.model(input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=False).hidden_states[-2]
        return [hidden[i][mask[i]] for i in range(len(prompts))]

    def _capture(self, length: int, buckets: list[int] | None = None) -> int:
        """Capture graphs at `length`; on failure, log it and run eagerly from now on (never crash)."""
        try:
            return self.graphs.capture(length, self.device, buckets)
        except Exception as e:
            log.warning("text encoder CUDA graphs off, capture at length %d failed: %s: %s", length, type(e).__name__, e)
            self.graphs = None
            return 0

    @torch.no_grad()
    def warmup(self, batch_sizes: tuple[int, ...] = (1,)) -> int:
        """One forward per padded length the engine can see (multiples of `pad_to_multiple_of` up to
        `max_sequence_length`), so that no request pays for a new shape's kernel selection; with
        `cuda_graph`, a graph per batch bucket and length instead. Returns the number of forwards run or
        graphs captured."""
        step, top = self.cfg.pad_to_multiple_of, self.cfg.max_sequence_length
        lengths = [top] if self.cfg.pad_to_max_length else list(range(step, top + step, step))
        if len(lengths) > 64:  # no bucketing: too many shapes to warm, keep the first few
            lengths = lengths[:8]
        n = 0
        for length in lengths if self.graphs is not None else []:
            n += self._capture(length)
            if self.graphs is None:  # a capture failed: warm the eager forwards instead
                n = 0
                break
        if self.graphs is not None:
            return n
        for b in batch_sizes:
            for length in lengths:
                ids = torch.full((b, length), self.tokenizer.pad_token_id or 0, dtype=torch.long, device=self.device)
                self.model(input_ids=ids, attention_mask=torch.ones_like(ids, dtype=torch.bool), use_cache=False)
                n += 1
        return n
