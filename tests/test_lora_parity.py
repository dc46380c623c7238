"""LoRA adapters in our engines against diffusers' own `ZImagePipeline.load_lora_weights` + `set_adapters`
on the same tiny weights, adapters and seeds (CPU, fp32, no Ray); adapter names; no recompile on a switch."""

import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from serve_app.config import AppConfig, LoraConfig, ModelConfig
from serve_app.engines.lora import AdapterError, LoraAdapters, UnknownAdapter, install_side_paths, list_adapters, resolve_adapter, side_paths
from serve_app.engines.model_configs import TINY_TRANSFORMER_CONFIG
from serve_app.engines.tiny_model import DEMO_ADAPTER, build_lora_adapter, ensure_tiny_loras
from serve_app.pipeline import StagedPipeline

SIZE = 64
STEPS = 4
PROMPT = "a watercolor painting of a lighthouse by the sea at dawn"
# fp32 on CPU: diffusers (peft) computes each adapter as `B(A x) * scale` per adapter, we compute the set as
# one `(x A^T)(s B)^T` of the adapters side by side; only rounding differs (~1e-6 relative in the latents),
# which may flip a rounded pixel level now and then
MAX_LEVELS = 1


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("loras")
    build_lora_adapter(folder, "style-a", TINY_TRANSFORMER_CONFIG, rank=4, alpha=8, seed=11)
    # another rank and alpha, only the attention: a scaling that differs from the first adapter's
    build_lora_adapter(folder, "style-b", TINY_TRANSFORMER_CONFIG, rank=8, alpha=4, seed=12, targets=["to_q", "to_k", "to_v", "to_out.0"])
    # a diffusers-format folder: <name>/pytorch_lora_weights.safetensors
    built = build_lora_adapter(folder / "folder-c", "tmp", TINY_TRANSFORMER_CONFIG, rank=2, seed=13)
    built.rename(folder / "folder-c" / "pytorch_lora_weights.safetensors")
    return folder


@pytest.fixture(scope="module")
def pipe(tiny_dir, lora_dir):
    cfg = AppConfig(model=ModelConfig(source="tiny", tiny_dir=str(tiny_dir)), lora=LoraConfig(enabled=True, dir=str(lora_dir), max_rank=16))
    return StagedPipeline(cfg)


def _ours(pipe, seed, lora=()) -> np.ndarray:
    [img] = pipe.generate([PROMPT], [seed], height=SIZE, width=SIZE, steps=STEPS, lora=lora)
    return img.pixels.numpy()


def _diffusers(tiny_dir, lora_dir, seed, adapters) -> np.ndarray:
    """A fresh ZImagePipeline (load_lora_weights changes its transformer) with `adapters` loaded and set."""
    from diffusers import ZImagePipeline

    ref = ZImagePipeline.from_pretrained(str(tiny_dir), dtype=torch.float32)
    ref.set_progress_bar_config(disable=True)
    for name, _ in adapters:
        path = resolve_adapter(lora_dir, name)
        if path.is_file():
            ref.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name=name)
        else:
            ref.load_lora_weights(str(path), adapter_name=name)
    if adapters:
        ref.set_adapters([n for n, _ in adapters], adapter_weights=[s for _, s in adapters])
    out = ref(prompt=[PROMPT], height=SIZE, width=SIZE, num_inference_steps=STEPS, guidance_scale=0.0,
              generator=torch.Generator("cpu").manual_seed(seed), output_type="pil")
    return np.asarray(out.images[0])


def _levels(a, b) -> int:
    return int(np.abs(a.astype(int) - b.astype(int)).max())


@pytest.mark.parametrize("adapters", [
    (("style-a", 0.7),),
    (("folder-c", 1.0),),
    (("style-a", 1.0), ("style-b", -0.5)),  # two combined, one with a negative scale
], ids=["one", "diffusers-folder", "two-combined"])
def test_image_matches_diffusers_load_lora_weights_and_set_adapters(pipe, tiny_dir, lora_dir, adapters):
    ref = _diffusers(tiny_dir, lora_dir, 3, adapters)
    ours = _ours(pipe, 3, adapters)
    assert _levels(ours, ref) <= MAX_LEVELS
    assert _levels(ours, _ours(pipe, 3)) > 10  # and the adapter really changes the image


def test_scale_zero_equals_no_adapter_bit_for_bit(pipe, tiny_dir, lora_dir):
    none = _ours(pipe, 5)
    assert np.array_equal(_ours(pipe, 5, (("style-a", 0.0),)), none)
    assert np.array_equal(none, _diffusers(tiny_dir, lora_dir, 5, ()))  # the side paths add exact zeros


def test_a_batch_of_different_adapters_gives_each_its_own_image(pipe):
    """Requests with different adapter sets in one denoise call never share a forward and each gets the
    latents it gets alone."""
    from serve_app.engines.denoiser import DenoiseRequest

    emb = pipe.text_encoder.encode([PROMPT])[0]
    sets = [(("style-a", 1.0),), (("style-b", 1.0),), (), (("style-a", 1.0),), (("style-a", 0.5),)]
    reqs = [DenoiseRequest(embeds=emb, height=SIZE, width=SIZE, steps=2, seed=7, lora=s) for s in sets]
    before = pipe.denoiser.stats()
    out = pipe.denoiser.denoise(reqs)
    after = pipe.denoiser.stats()
    assert after["batches"] - before["batches"] == 4  # style-a x2 together; style-b, none, style-a@0.5 alone
    assert after["forward_batch_sizes"].get("2", 0) - before["forward_batch_sizes"].get("2", 0) == 2
    for req, got in zip(reqs, out):
        [alone] = pipe.denoiser.denoise([req])
        torch.testing.assert_close(got, alone, rtol=0, atol=1e-5)  # tests/test_parity.py's batch bound
    assert not torch.equal(out[0], out[1]) and not torch.equal(out[0], out[2])


def test_ranks_past_max_rank_are_refused(tiny_dir, lora_dir):
    from serve_app.engines.denoiser import DenoiserEngine

    lora = LoraConfig(enabled=True, dir=str(lora_dir), max_rank=10)
    engine = DenoiserEngine(ModelConfig(source="tiny", tiny_dir=str(tiny_dir)), AppConfig(lora=lora).denoiser, lora=lora)
    engine.check_adapters((("style-b", 1.0),))  # rank 8
    with pytest.raises(AdapterError, match="max_rank"):
        engine.check_adapters((("style-a", 1.0), ("style-b", 1.0)))  # 4 + 8 at the attention


def test_adapter_names_stay_inside_the_folder(lora_dir, tmp_path):
    outside = tmp_path / "outside.safetensors"
    outside.write_bytes((lora_dir / "style-a.safetensors").read_bytes())
    os.symlink(outside, lora_dir / "escape.safetensors")  # a symlink out of the folder
    os.symlink(lora_dir / "style-a.safetensors", lora_dir / "alias.safetensors")  # one inside it is fine
    try:
        assert list_adapters(lora_dir) == ["alias", "folder-c", "style-a", "style-b"]
        assert resolve_adapter(lora_dir, "style-a") == lora_dir / "style-a.safetensors"
        assert resolve_adapter(lora_dir, "folder-c") == lora_dir / "folder-c"
        for bad in ["escape", "../outside", str(outside), str(outside.with_suffix("")), "..", ".", "", "a/b", "style-a.safetensors/..", "style-a.safetensors", "nope"]:
            with pytest.raises(UnknownAdapter):
                resolve_adapter(lora_dir, bad)
    finally:
        (lora_dir / "escape.safetensors").unlink()
        (lora_dir / "alias.safetensors").unlink()


def test_the_tiny_demo_adapter_is_built_and_loads(tiny_dir):
    folder = ensure_tiny_loras(tiny_dir)
    assert DEMO_ADAPTER in list_adapters(folder)
    from diffusers import ZImageTransformer2DModel

    model = ZImageTransformer2DModel(**TINY_TRANSFORMER_CONFIG)
    adapters = LoraAdapters(folder, install_side_paths(model, 16, torch.device("cpu"), torch.float32), dict(model.config),
                            torch.device("cpu"), torch.float32)
    adapters.activate(((DEMO_ADAPTER, 1.0),))
    assert adapters.stats()["loaded"] == [DEMO_ADAPTER] and len(adapters.load(DEMO_ADAPTER).layers) == 7 * 6  # 7 linears x 6 blocks


def test_a_name_with_dots_loads(lora_dir):
    """peft refuses '.' in its adapter names; ours may have them (`v1.5-style`)."""
    build_lora_adapter(lora_dir / "dotted", "v1.5-style", TINY_TRANSFORMER_CONFIG, rank=2, seed=14)
    from diffusers import ZImageTransformer2DModel

    model = ZImageTransformer2DModel(**TINY_TRANSFORMER_CONFIG)
    adapters = LoraAdapters(lora_dir / "dotted", install_side_paths(model, 16, torch.device("cpu"), torch.float32), dict(model.config),
                            torch.device("cpu"), torch.float32)
    adapters.activate((("v1.5-style", 1.0),))
    assert adapters.stats()["active"] == [["v1.5-style", 1.0]]


def test_switching_adapters_never_recompiles(lora_dir):
    """The DiT's blocks compiled as the builder compiles them (regional, dynamic), with side paths: after a
    warm-up with no adapter, activating adapters, combining them and turning them off compiles nothing
    (CPU, Dynamo with the eager backend: recompiles are Dynamo's guards, whatever the backend)."""
    from diffusers import ZImageTransformer2DModel

    from serve_app.engines.compile_watch import compile_watch

    torch.manual_seed(0)
    model = ZImageTransformer2DModel(**TINY_TRANSFORMER_CONFIG).eval().requires_grad_(False)
    adapters = LoraAdapters(lora_dir, install_side_paths(model, 16, torch.device("cpu"), torch.float32), dict(model.config),
                            torch.device("cpu"), torch.float32)
    model.compile_repeated_blocks(fullgraph=True, dynamic=True, backend="eager")
    x = [torch.randn(16, 1, 8, 8)]
    caps = [torch.randn(32, TINY_TRANSFORMER_CONFIG["cap_feat_dim"])]
    t = torch.tensor([0.5])
    watch = compile_watch()
    with torch.no_grad():
        base = model(x, t, caps, return_dict=False)[0][0]
        watch.serving()
        before = watch.snapshot()["compiles_while_serving"]
        outs = []
        for s in [(("style-a", 1.0),), (("style-a", 1.0), ("style-b", 0.5)), (("folder-c", 2.0),), ()]:
            adapters.activate(s)
            outs.append(model(x, t, caps, return_dict=False)[0][0])
    assert watch.snapshot()["compiles_while_serving"] == before
    assert not torch.allclose(outs[0], base) and not torch.allclose(outs[1], outs[0])
    assert torch.equal(outs[-1], base)  # off again: the base model's output
    assert len(side_paths(model)) == sum(isinstance(m, torch.nn.Linear) for m in model.modules())


SP_LAYOUTS = [(2, 1), (1, 2)]  # diffusers' Ulysses 2, our ring 2


def _sp_worker(rank: int, tiny_dir: str, lora_dir: str, ports: list[int], out_dir: str) -> None:
    torch.set_num_threads(1)
    from serve_app.config import DenoiserConfig
    from serve_app.engines.denoiser import DenoiserEngine
    from serve_app.sp.process_group import init_sp_process_group, sp_options

    for (u, r), port in zip(SP_LAYOUTS, ports):
        init_sp_process_group(rank, u * r, "127.0.0.1", port, timeout_s=120)
        cfg = DenoiserConfig(ulysses_degree=u, ring_degree=r)
        engine = DenoiserEngine(ModelConfig(source="tiny", tiny_dir=tiny_dir), cfg, device=torch.device("cpu"), sp=sp_options(cfg),
                                lora=LoraConfig(enabled=True, dir=lora_dir, max_rank=16))
        engine.load_adapter("style-a")  # as the deployment's multiplexed loader does on every rank
        out = [t.cpu() for t in engine.denoise(_sp_requests(engine.cap_feat_dim))]
        if rank == 0:
            torch.save({"latents": out, "lora": engine.stats()["lora"]}, os.path.join(out_dir, f"u{u}r{r}.pt"))
        torch.distributed.destroy_process_group()


def _sp_requests(cap_dim: int):
    from serve_app.engines.denoiser import DenoiseRequest

    emb = torch.randn(9, cap_dim, generator=torch.Generator().manual_seed(0))
    return [DenoiseRequest(embeds=emb, height=SIZE, width=SIZE, steps=2, seed=s, lora=lora)
            for s, lora in ((1, (("style-a", 1.0),)), (2, (("style-b", 0.7), ("style-a", 0.3))), (3, ()))]


def test_sequence_parallel_ranks_apply_the_same_adapters(tiny_dir, lora_dir, tmp_path):
    """Every SP rank holds the same adapters and their side paths compute on its shard: the group's
    latents are the single process's (tests/test_sp_engine.py's bound, atol 1e-4 on fp32 latents)."""
    from serve_app.config import DenoiserConfig
    from serve_app.engines.denoiser import DenoiserEngine
    from tests.rank_processes import free_ports, run_ranks

    run_ranks(_sp_worker, (str(tiny_dir), str(lora_dir), free_ports(len(SP_LAYOUTS)), str(tmp_path)), 2)
    single = DenoiserEngine(ModelConfig(source="tiny", tiny_dir=str(tiny_dir)), DenoiserConfig(), device=torch.device("cpu"),
                            lora=LoraConfig(enabled=True, dir=str(lora_dir), max_rank=16))
    reqs = _sp_requests(single.cap_feat_dim)
    ref = single.denoise(reqs)
    for u, r in SP_LAYOUTS:
        got = torch.load(tmp_path / f"u{u}r{r}.pt")
        assert got["lora"]["loaded"] == ["style-a", "style-b"]
        for a, b in zip(got["latents"], ref):
            assert (a - b).abs().max().item() <= 1e-4
    assert not torch.allclose(ref[0], ref[2]) and not torch.allclose(ref[1], ref[0])


def test_the_lora_block_of_a_config_maps_onto_lora_config():
    import yaml
    from pydantic import ValidationError

    root = Path(__file__).resolve().parents[1]
    args = yaml.safe_load((root / "configs" / "tiny-cpu.yaml").read_text())["applications"][0]["args"]
    cfg = AppConfig.model_validate(args)
    assert cfg.lora == LoraConfig(enabled=True, max_loaded=2, max_adapters_per_request=2, max_rank=16)
    for bad, named in [({"lora": {"max_loadde": 3}}, "lora.max_loadde"),
                       ({"lora": {"max_loaded": 1}}, "max_adapters_per_request (4) must be at most max_loaded (1)"),
                       ({"model": {"source": "hub"}, "lora": {"enabled": True}}, "lora.dir: required")]:
        with pytest.raises(ValidationError, match=re.escape(named)):
            AppConfig.model_validate(bad)
