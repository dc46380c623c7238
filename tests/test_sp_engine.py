"""Sequence-parallel DiT (Ulysses x ring) against the single-process engine: CPU, gloo, tiny model, fp32.

One start of 4 processes (tests/rank_processes.py) runs every layout in turn (a fresh process group per
layout, ranks beyond its size sit it out), because a rank process costs seconds to start.
Tolerance: atol 1e-4 on fp32 latents after 2 steps (seen: ~1e-6).
"""

from __future__ import annotations

import os

import pytest
import torch

from serve_app.config import DenoiserConfig, ModelConfig
from serve_app.engines.denoiser import DenoiseRequest, DenoiserEngine
from tests.rank_processes import free_ports, run_ranks

SIZE = 64  # 16 image tokens -> padded to 32 by Z-Image; with a 32-token caption: 64 tokens, not divisible by 3 or 6
STEPS = 2
ATOL = 1e-4
# (ulysses, ring): SP 2, 3 (padded), 4 (= 2 x 2, the 30-head layout for 4 GPUs), pure ring 2. Six-rank
# layouts (6 x 1, 3 x 2) take the same code paths as 3 x 1 and 2 x 2, with two more processes to start
LAYOUTS = [(2, 1), (3, 1), (2, 2), (1, 2)]
# the same with the noise refiners sharded too: diffusers' Ulysses, Ulysses with a pad (32 image tokens
# over 3 ranks), and our Ulysses x ring processor
REFINER_LAYOUTS = [(2, 1), (3, 1), (2, 2)]
# our processor instead of diffusers' Ulysses at ring 1 (`denoiser.sp_attention: packed`): SP 2, and SP 3
# with its pad (main blocks and noise refiners); and on a simulated Hopper with (reference) FA3: the
# unsharded refiners keep FA3, the sharded blocks take diffusers' Ulysses or ours; run last in each
# process (the simulation is not undone). These four with fused projections (`denoiser.fuse_projections`,
# the servers' default): through diffusers' Ulysses and through ours.
# (ulysses, ring, shard_refiner, fa3, fuse, sp_attention)
VARIANTS = ([(u, r, False, False, False, "diffusers") for u, r in LAYOUTS]
            + [(u, r, True, False, False, "diffusers") for u, r in REFINER_LAYOUTS]
            + [(2, 1, False, False, True, "packed"), (3, 1, True, False, True, "packed")]
            + [(2, 1, True, True, True, "diffusers"), (2, 2, False, True, True, "diffusers")])
NPROCS = max(u * r for u, r in LAYOUTS)


def _key(u: int, r: int, shard_refiner: bool, fa3: bool = False, fuse: bool = False, attention: str = "diffusers") -> str:
    return (f"u{u}r{r}" + ("-refiner" if shard_refiner else "") + ("-fa3" if fa3 else "") + ("-fused" if fuse else "")
            + ("-packed" if attention == "packed" else ""))


def _requests(cap_dim: int) -> dict[str, list[DenoiseRequest]]:
    g = torch.Generator().manual_seed(0)

    def emb(n):
        return torch.randn(n, cap_dim, generator=g)

    return {
        "single": [DenoiseRequest(embeds=emb(9), height=SIZE, width=SIZE, steps=STEPS, seed=3)],
        # caption lengths 7 / 40 / 75 -> 32 / 64 / 96 tokens: a batch with a key mask on the shorter two
        "batch": [
            DenoiseRequest(embeds=emb(7), height=SIZE, width=SIZE, steps=STEPS, seed=1),
            DenoiseRequest(embeds=emb(40), height=SIZE, width=SIZE, steps=STEPS, seed=2),
            DenoiseRequest(embeds=emb(75), height=SIZE, width=SIZE, steps=STEPS, seed=3),
        ],
        # classifier-free guidance doubles the batch inside the engine; a 128-wide image is a second shape
        "cfg_mixed": [
            DenoiseRequest(embeds=emb(20), height=SIZE, width=2 * SIZE, steps=STEPS, seed=4, guidance_scale=2.0, negative_embeds=emb(5)),
            DenoiseRequest(embeds=emb(33), height=SIZE, width=SIZE, steps=STEPS, seed=5),
        ],
    }


def _packed_exchange_exact(rank: int, n: int) -> bool:
    """One packed all-to-all of q, k, v (bf16, uneven values per rank) == three `seq_to_heads`, bit for bit."""
    from serve_app.sp.attention import finish_seq_to_heads, seq_to_heads, start_seq_to_heads

    g = torch.Generator().manual_seed(rank)
    group = torch.distributed.group.WORLD
    qkv = [torch.randn(2, 5, 2 * n, 3, generator=g).to(torch.bfloat16) for _ in range(3)]
    packed = finish_seq_to_heads(start_seq_to_heads(qkv, group, n), n)
    return all(torch.equal(p, seq_to_heads(t, group, n)) for p, t in zip(packed, qkv))


def _worker(rank: int, tiny_dir: str, ports: list[int], out_dir: str) -> None:
    import time
    t0 = time.time()
    torch.set_num_threads(1)
    from reference_fa3 import install_reference_fa3, simulate_hopper
    from serve_app.engines.dit_builder import installed_attention
    from serve_app.engines.fused_projections import installed_fusion
    from serve_app.sp.process_group import check_collectives, init_sp_process_group, sp_options, sp_rank_info

    model_cfg = ModelConfig(source="tiny", tiny_dir=tiny_dir)
    for variant, port in zip(VARIANTS, ports):
        u, r, shard_refiner, fa3, fuse, attention = variant
        n = u * r
        if rank >= n:
            continue
        fa3_calls: list = []
        if fa3:
            install_reference_fa3(fa3_calls)
            simulate_hopper()
        init_sp_process_group(rank, n, "127.0.0.1", port, timeout_s=120)
        # mixed caption lengths share forwards (key masks through the sharded attention)
        cfg = DenoiserConfig(ulysses_degree=u, ring_degree=r, sp_shard_noise_refiner=shard_refiner, sp_same_caption_length_batches=False,
                             fuse_projections=fuse, sp_attention=attention)
        sp = DenoiserEngine(model_cfg, cfg, device=torch.device("cpu"), sp=sp_options(cfg))
        seen: list[int] = []  # sequence length the last main block really sees (its shard)
        sp.transformer.layers[-1].register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[1]))
        seen_refiner: list[int] = []  # and the last noise refiner
        sp.transformer.noise_refiner[-1].register_forward_pre_hook(lambda m, a: seen_refiner.append(a[0].shape[1]))
        check_collectives(sp.device, 30)
        results = {name: [t.cpu() for t in sp.denoise(reqs)] for name, reqs in _requests(sp.cap_feat_dim).items()}
        info = {**sp_rank_info(sp), "shard_lens": seen, "refiner_lens": seen_refiner,
                "installed_attention": installed_attention(sp.transformer), "installed_fusion": installed_fusion(sp.transformer),
                "fa3_calls": len(fa3_calls), "packed_exchange_exact": _packed_exchange_exact(rank, u) if attention == "packed" else None}
        if rank == 0:
            print(f"layout {_key(*variant)} done at {time.time() - t0:.1f}s", flush=True)
            torch.save({"results": results, "info": info}, os.path.join(out_dir, _key(*variant) + ".pt"))
        torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def sp_results(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("sp")
    run_ranks(_worker, (str(tiny_dir), free_ports(len(VARIANTS)), str(out)), NPROCS)
    return {v: torch.load(out / (_key(*v) + ".pt")) for v in VARIANTS}


@pytest.fixture(scope="module")
def reference(tiny_dir):
    eng = DenoiserEngine(ModelConfig(source="tiny", tiny_dir=str(tiny_dir)), DenoiserConfig(), device=torch.device("cpu"))
    return {name: eng.denoise(reqs) for name, reqs in _requests(eng.cap_feat_dim).items()}


@pytest.mark.parametrize("variant", VARIANTS, ids=[_key(*v) for v in VARIANTS])
@pytest.mark.parametrize("case", ["single", "batch", "cfg_mixed"])
def test_sp_matches_single_process(sp_results, reference, variant, case):
    got = sp_results[variant]["results"][case]
    info = sp_results[variant]["info"]
    layout, shard_refiner, fa3, fuse, attention = variant[:2], variant[2], variant[3], variant[4], variant[5]
    assert (info["sp"]["ulysses_degree"], info["sp"]["ring_degree"]) == layout and info["backend"] == "gloo"
    ours = layout[1] > 1 or attention == "packed"
    assert info["sp"]["attention"] == ("usp" if ours else "diffusers-ulysses")
    assert info["sp"]["ulysses_exchange"] == (None if layout[0] == 1 else "packed" if ours else "diffusers")
    assert info["sp"]["shards_noise_refiner"] == shard_refiner
    assert info["packed_exchange_exact"] is (True if attention == "packed" else None)
    # what the build record says is what the processors run
    local, sharded = ("fa3" if fa3 else "native"), ("usp" if ours else "ulysses")
    expected = {"context_refiner": local, "noise_refiner": sharded if shard_refiner else local, "layers": sharded}
    assert info["attention"] == expected == info["installed_attention"]
    assert (info["fa3_calls"] > 0) == fa3
    assert info["fused_projections"] is fuse and info["installed_fusion"] is fuse  # the single-process reference is unfused
    n = layout[0] * layout[1]
    # really sharded: the single request's 64 tokens (padded up to a multiple of n) over n ranks
    assert info["shard_lens"][0] == -(-64 // n), info["shard_lens"]
    # its 32 image tokens through the last noise refiner: whole, or 1/n of them (padded)
    assert info["refiner_lens"][0] == (-(-32 // n) if shard_refiner else 32), info["refiner_lens"]
    for ref, lat in zip(reference[case], got):
        assert lat.shape == ref.shape
        diff = (lat - ref).abs().max().item()
        print(f"{layout} {case}: max abs diff {diff:.2e}")
        assert diff <= ATOL, diff


def test_layout_choice_and_clear_errors(tiny_dir):
    from serve_app.engines.model_sources import load_transformer
    from serve_app.sp.plan import choose_layout, enable_sequence_parallel

    assert [choose_layout(n, 30) for n in (2, 3, 4, 6, 8)] == [(2, 1), (3, 1), (2, 2), (6, 1), (2, 4)]
    assert [choose_layout(n, 6) for n in (2, 3, 4, 6)] == [(2, 1), (3, 1), (2, 2), (6, 1)]

    # checked before any process group is touched, so every rank fails alike
    t = load_transformer(ModelConfig(source="tiny", tiny_dir=str(tiny_dir)), torch.device("cpu"), torch.float32)
    with pytest.raises(ValueError, match="ulysses_degree=4 does not divide the model's 6 attention heads; use ulysses_degree=2 x ring_degree=2"):
        enable_sequence_parallel(t, 4, 1)
    with pytest.raises(ValueError, match="ulysses_anything cannot split 6 heads over 4 ranks"):
        enable_sequence_parallel(t, 4, 1, ulysses_anything=True)
    with pytest.raises(ValueError, match="needs ring_degree 1"):
        enable_sequence_parallel(t, 2, 2, ulysses_anything=True)
    with pytest.raises(ValueError, match="not with denoiser.sp_attention 'packed'"):
        enable_sequence_parallel(t, 2, 1, ulysses_anything=True, attention="packed")
    with pytest.raises(ValueError, match="denoiser.sp_attention: 'ring' is not one of"):
        enable_sequence_parallel(t, 2, 1, attention="ring")
    with pytest.raises(ValueError, match="sp_attention"):
        DenoiserConfig(sp_attention="ring")
    assert enable_sequence_parallel(t, 1, 1).attention == "none"


def test_same_caption_length_batches_never_need_a_mask():
    from serve_app.engines.denoiser import group_by_shape

    reqs = [DenoiseRequest(embeds=torch.zeros(n, 8), height=h, width=64, steps=2, seed=0) for n, h in
            ((7, 64), (30, 64), (33, 64), (64, 64), (70, 64), (7, 128))]
    assert list(group_by_shape(reqs).values()) == [[0, 1, 2, 3, 4], [5]]
    # Z-Image pads captions to multiples of 32: 7 and 30 -> 32, 33 and 64 -> 64, 70 -> 96
    assert list(group_by_shape(reqs, same_caption_length=True).values()) == [[0, 1], [2, 3], [4], [5]]


def test_masked_partial_attention_compiles_as_one_graph():
    """The sharded blocks compile with fullgraph=True (a graph break fails them): a key-masked chunk,
    one sample's keys all masked among them, must trace without a data-dependent branch and give the
    eager result."""
    from serve_app.sp.attention import partial_attention

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 8, 2, 16, generator=g) for _ in range(3))
    mask = torch.ones(2, 8, dtype=torch.bool)
    mask[0] = False  # this ring chunk holds none of sample 0's keys
    mask[1, 5:] = False
    compiled = torch.compile(lambda q, k, v, m: partial_attention(q, k, v, m, None), backend="eager", fullgraph=True)
    (out, lse), (ref_out, ref_lse) = compiled(q, k, v, mask), partial_attention(q, k, v, mask, None)
    assert torch.equal(out, ref_out) and torch.equal(lse, ref_lse)
    assert torch.isneginf(lse[0]).all() and (out[0] == 0).all()
