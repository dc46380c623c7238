"""CUDA graphs of the text encoder's forward (`text_encoder.cuda_graph`).

The Qwen3-4B forward over a prompt is a few milliseconds of GPU work issued as several hundred kernels
from Python, so it is bound by launches; a CUDA graph replays the same kernels with one launch, the same
states to the bit (benchmarks/README.md, "text encoder CUDA graphs"). One graph per (batch bucket, padded
length), captured at warm-up or on a shape's first use: batches are padded with pad rows up to the next
power of two, lengths are already multiples of `pad_to_multiple_of`.

The graphs run without an attention mask. Prompts are right-padded and the attention is causal, so no
real token ever attends to a pad and its state is the one the padding mask gives; the pad positions'
states differ, and the engine drops them. (SDPA then runs its causal kernel instead of the masked one:
the same math, in another reduction order.)
"""

from __future__ import annotations

import threading

import torch


def unmasked_states(model, input_ids: torch.Tensor, skip_last_layer: bool) -> torch.Tensor:
    """The encoder states Z-Image reads, [B, L, hidden], computed with the causal mask alone."""
    if skip_last_layer:
        return model(input_ids=input_ids, use_cache=False).last_hidden_state
    return model(input_ids=input_ids, output_hidden_states=True, use_cache=False).hidden_states[-2]


def batch_buckets(max_batch: int) -> list[int]:
    """1, 2, 4, ... up to and including max_batch."""
    out, b = [], 1
    while b < max_batch:
        out.append(b)
        b *= 2
    return out + [max_batch]


class EncoderGraphs:
    """Captured forwards of `model`, replayed for right-padded `input_ids` of a captured shape."""

    def __init__(self, model, skip_last_layer: bool, pad_token_id: int, max_batch: int):
        self.model = model
        self.skip_last_layer = skip_last_layer
        self.pad_token_id = pad_token_id
        self.buckets = batch_buckets(max_batch)
        self.pool = None  # made at the first capture; replays never overlap, so all graphs share it
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]] = {}
        self.lock = threading.Lock()

    def capture(self, length: int, device: torch.device, buckets: list[int] | None = None) -> int:
        """Capture `buckets` (default: every batch bucket) at `length`; returns how many graphs were captured."""
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        n = 0
        for b in buckets or self.buckets:
            if (b, length) in self.graphs:
                continue
            ids = torch.full((b, length), self.pad_token_id, dtype=torch.long, device=device)
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):  # warm up off the capture: lazy inits, kernel selection
                for _ in range(2):
                    unmasked_states(self.model, ids, self.skip_last_layer)
            torch.cuda.current_stream(device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            # thread_local: a stats call on another thread of the replica must not void the capture
            with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
                out = unmasked_states(self.model, ids, self.skip_last_layer)
            self.graphs[(b, length)] = (graph, ids, out)
            n += 1
        return n

    def bucket(self, batch: int) -> int | None:
        return next((b for b in self.buckets if b >= batch), None)

    def run(self, input_ids: torch.Tensor, consume):
        """Replay the graph for input_ids' shape and return `consume(states[:batch])`; the states live in
        the graph's output buffer, so `consume` must copy what it keeps before the next replay."""
        batch, length = input_ids.shape
        graph, ids, out = self.graphs[(self.bucket(batch), length)]
        with self.lock:
            ids[:batch].copy_(input_ids)
            ids[batch:].fill_(self.pad_token_id)
            graph.replay()
            return consume(out[:batch])
