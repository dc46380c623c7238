"""The text encoder's CUDA graphs (serve_app/engines/text_encoder_graphs.py) run the forward without a padding
mask. What makes that exact for the real tokens is tested here on CPU: right padding under causal
attention. Capture and replay need a GPU (benchmarks/bench_stages.py times them and compares them with
the masked eager encoder)."""

import torch

from serve_app.config import ModelConfig, TextEncoderConfig
from serve_app.engines.text_encoder import TextEncoderEngine
from serve_app.engines.text_encoder_graphs import EncoderGraphs, batch_buckets, unmasked_states

PROMPTS = ["a cat", "an astronaut riding a horse on the moon, digital art, highly detailed", "山水画，远处的群山和云雾"]


def test_unmasked_forward_gives_the_real_tokens_the_masked_states(tiny_dir):
    for skip_last in (True, False):
        te = TextEncoderEngine(ModelConfig(source="tiny", tiny_dir=str(tiny_dir)),
                               TextEncoderConfig(pad_to_multiple_of=64, skip_last_layer=skip_last))
        masked = te.encode(PROMPTS)
        texts = [te._templated(p) for p in PROMPTS]
        inputs = te.tokenizer(texts, padding="longest", pad_to_multiple_of=64, return_tensors="pt", padding_side="right")
        assert inputs.attention_mask[:, 0].all() and not inputs.attention_mask.all()  # real pads, on the right
        with torch.no_grad():
            states = unmasked_states(te.model, inputs.input_ids, skip_last)
        ours = [states[i][inputs.attention_mask[i].bool()] for i in range(len(PROMPTS))]
        for a, b in zip(ours, masked):
            assert a.shape == b.shape
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        # and the pad positions' states are what differs: the mask did matter there
        full = te.model(input_ids=inputs.input_ids, attention_mask=inputs.attention_mask.bool(), use_cache=False,
                        output_hidden_states=not skip_last)
        full = full.last_hidden_state if skip_last else full.hidden_states[-2]
        pads = ~inputs.attention_mask.bool()
        assert not torch.allclose(states[pads], full[pads], atol=1e-3)


def test_batch_buckets():
    assert batch_buckets(1) == [1]
    assert batch_buckets(8) == [1, 2, 4, 8]
    assert batch_buckets(6) == [1, 2, 4, 6]


def test_cuda_graphs_stay_off_on_cpu(tiny_dir):
    te = TextEncoderEngine(ModelConfig(source="tiny", tiny_dir=str(tiny_dir)), TextEncoderConfig())
    assert te.graphs is None and not te.norms_compiled and te.warmup() > 0 and len(te.encode(PROMPTS)) == 3


def test_a_failed_capture_leaves_the_eager_encoder(tiny_dir, caplog):
    te = TextEncoderEngine(ModelConfig(source="tiny", tiny_dir=str(tiny_dir)), TextEncoderConfig())
    ref = te.encode(PROMPTS)
    te.graphs = EncoderGraphs(te.model, True, te.tokenizer.pad_token_id, 8)  # on CPU no capture can succeed
    with caplog.at_level("WARNING", logger="serve_app.engines.text_encoder"):
        assert te.warmup() > 0  # the eager warm-up forwards ran instead
    assert te.graphs is None and "CUDA graphs off" in caplog.text
    for a, b in zip(te.encode(PROMPTS), ref):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
