"""benchmarks/: the serving benchmark's math, and one short run against the real app (CPU, tiny model)."""

import io
import json
import math
import random
import statistics
import sys
from pathlib import Path

import numpy as np
import pytest

BENCH_DIR = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH_DIR))

import bench_serving as bs  # noqa: E402
import compare  # noqa: E402



# ---- pure helpers ------------------------------------------------------------------------------
def test_percentile_matches_numpy_linear_interpolation():
    rng = random.Random(3)
    for n in (1, 2, 5, 10, 101):
        xs = [rng.uniform(0, 10) for _ in range(n)]
        for q in (0, 10, 50, 90, 99, 100):
            assert bs.percentile(xs, q) == pytest.approx(float(np.percentile(xs, q)))
    assert bs.percentile([], 50) is None
    with pytest.raises(ValueError):
        bs.percentile([1.0], 101)


def test_summarize():
    s = bs.summarize([4.0, 1.0, 3.0, 2.0])
    assert s["count"] == 4 and s["mean"] == 2.5 and s["median"] == 2.5 and s["min"] == 1.0 and s["max"] == 4.0
    assert s["p90"] == pytest.approx(3.7) and s["p99"] == pytest.approx(3.97)
    empty = bs.summarize([])
    assert empty["count"] == 0 and empty["median"] is None


def test_poisson_arrivals_are_seeded_increasing_and_have_the_requested_rate():
    a = bs.poisson_arrival_offsets(20000, 4.0, seed=7)
    assert a == bs.poisson_arrival_offsets(20000, 4.0, seed=7)
    assert a != bs.poisson_arrival_offsets(20000, 4.0, seed=8)
    assert a[0] == 0.0 and all(y >= x for x, y in zip(a, a[1:]))
    gaps = [y - x for x, y in zip(a, a[1:])]
    assert statistics.fmean(gaps) == pytest.approx(0.25, rel=0.03)  # mean 1/rate
    assert statistics.pstdev(gaps) == pytest.approx(0.25, rel=0.05)  # exponential: std == mean
    assert bs.poisson_arrival_offsets(5, math.inf, seed=0) == [0.0] * 5
    assert bs.poisson_arrival_offsets(0, 1.0, seed=0) == []
    with pytest.raises(ValueError):
        bs.poisson_arrival_offsets(3, 0.0, seed=0)


def test_stats_delta_differences_counters_and_keeps_levels():
    before = {
        "denoiser": {"forwards": 10, "forward_batch_sizes": {"1": 8, "2": 2}, "peak_memory_bytes": 100, "pid": 5, "busy_s": 1.5,
                     "startup_s": {"build": 3.0, "warmup": 9.0}},
        "vae": {"batches": 3, "batch_sizes": {"1": 3}, "peak_memory_bytes": None},
    }
    after = {
        "denoiser": {"forwards": 22, "forward_batch_sizes": {"1": 8, "2": 6, "4": 1}, "peak_memory_bytes": 300, "pid": 5, "busy_s": 2.0,
                     "startup_s": {"build": 3.0, "warmup": 9.0}},
        "vae": {"batches": 5, "batch_sizes": {"1": 4, "2": 1}, "peak_memory_bytes": None},
        "ingress": {"requests": 7},
    }
    d = bs.stats_delta(before, after)
    assert d["denoiser"]["forwards"] == 12
    assert d["denoiser"]["forward_batch_sizes"] == {"2": 4, "4": 1}  # unchanged sizes dropped
    assert d["denoiser"]["peak_memory_bytes"] == 300 and d["denoiser"]["pid"] == 5
    assert d["denoiser"]["startup_s"] == {"build": 3.0, "warmup": 9.0}  # a level, not a counter
    assert d["denoiser"]["busy_s"] == pytest.approx(0.5)
    assert d["vae"]["batch_sizes"] == {"1": 1, "2": 1}
    assert d["ingress"]["requests"] == 7  # missing before: counted from 0
    assert bs.mean_batch_size({"2": 4, "4": 1}) == pytest.approx(12 / 5)
    assert bs.mean_batch_size({}) is None
    assert bs.peak_memory_by_stage(after) == {"denoiser": 300, "vae": None}


def test_prompts_file_and_sampling():
    prompts = bs.load_prompts(bs.DEFAULT_PROMPT_FILE)
    assert 150 <= len(prompts) <= 250 and len(set(prompts)) == len(prompts)
    chinese = [p for p in prompts if any("\u4e00" <= c <= "\u9fff" for c in p)]
    assert 0.15 <= len(chinese) / len(prompts) <= 0.25
    words = [len(p.split()) for p in prompts if p not in chinese]
    assert min(words) <= 3 and max(words) >= 60
    s = bs.sample_prompts(prompts, 2 * len(prompts) + 3, seed=1)
    assert len(s) == 2 * len(prompts) + 3 and set(s) == set(prompts)
    assert s == bs.sample_prompts(prompts, 2 * len(prompts) + 3, seed=1)


def test_response_parsing_counts_error_codes():
    r = bs.RequestResult(index=0, prompt_words=1)
    bs._parse_response(r, 429, json.dumps({"error": {"message": "busy", "type": "x", "param": None, "code": "rate_limit_exceeded"}}).encode())
    assert not r.success and r.error == "429:rate_limit_exceeded" and r.error_message == "busy"
    r = bs.RequestResult(index=0, prompt_words=1)
    bs._parse_response(r, 502, b"Bad Gateway")
    assert r.error == "502" and "Bad Gateway" in r.error_message
    r = bs.RequestResult(index=0, prompt_words=1)
    body = {"created": 1, "data": [{"b64_json": "AAAA", "seed": 3, "timings": {"total_s": 0.5, "denoiser_s": 0.3}}], "timings": {"total_s": 0.6}}
    bs._parse_response(r, 200, json.dumps(body).encode())
    assert r.success and r.image_bytes == [3] and r.image_timings[0]["denoiser_s"] == 0.3
    assert bs._server_total(r) == 0.6


def test_unknown_benchmark_option_is_an_error():
    with pytest.raises(ValueError, match="unknown"):
        bs._normalise_args({"num_promts": 3})


def test_compare_overrides_and_encode_bench():
    args = {"denoiser": {"compile": False}, "model": {"source": "random-full"}}
    out = compare.apply_overrides(args, ["denoiser.compile=true", "vae.compile=1", "server.default_size=512x512"])
    assert out["denoiser"]["compile"] is True and out["vae"]["compile"] == 1 and out["server"]["default_size"] == "512x512"
    assert args["denoiser"]["compile"] is False  # the input is not modified
    with pytest.raises(ValueError):
        compare.apply_overrides(args, ["denoiser.compile"])
    cfg = compare.load_serve_config(str(BENCH_DIR.parent / "configs" / "tiny-cpu.yaml"), ["denoiser.default_steps=3"])
    assert cfg["args"]["denoiser"]["default_steps"] == 3 and cfg["name"] == "z-image" and cfg["port"] == 8000
    enc = compare.run_encode_bench(reps=1, size=64)
    assert set(enc["noise"]) == set(enc["smooth"]) and enc["noise"]["png_level1"]["bytes"] > 0
    assert enc["smooth"]["png_level6"]["bytes"] < enc["noise"]["png_level6"]["bytes"]


# ---- against the real app ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def bench_app(tiny_server):
    from tests.tiny_server import BASE

    return BASE  # the root tiny app (tests/tiny_server.py)


def test_run_benchmark_against_the_real_app(bench_app, tmp_path):
    out = tmp_path / "bench.json"
    steps = 2
    r = bs.run_benchmark({
        "base_url": bench_app, "num_prompts": 6, "max_concurrency": 3, "size": "64x64", "steps": steps,
        "warmup_requests": 1, "seed": 1, "output_json": str(out), "disable_tqdm": True, "quiet": True,
    })
    assert json.loads(out.read_text())["completed"] == 6
    assert r["completed"] == 6 and r["failed"] == 0 and r["errors"] == {}
    assert r["images"] == 6 and r["image_throughput_ips"] > 0 and r["duration_s"] > 0
    assert all(r["latency_s"][k] > 0 for k in ("mean", "median", "p90", "p99", "min", "max"))
    assert r["latency_s"]["min"] <= r["latency_s"]["median"] <= r["latency_s"]["max"]
    assert r["model"] == "z-image-turbo"
    for k in ("text_encoder_s", "denoiser_s", "vae_s", "encode_s", "queue_s", "total_s"):
        assert k in r["stage_timings_s"], k
    assert r["stage_timings_s"]["denoiser_s"]["median"] > 0
    # the stats deltas cover exactly the timed requests (the warm-up is excluded)
    dn = r["stats_delta"]["denoiser"]
    assert dn["requests"] == 6
    sizes = r["denoiser_forward_batch_sizes"]
    assert sum(int(b) * c for b, c in sizes.items()) == 6 * steps  # every image ran `steps` forwards
    assert dn["forwards"] == sum(sizes.values())
    assert set(r["peak_memory_bytes"]) == {"text_encoder", "denoiser", "vae"}  # None on CPU
    assert r["payload_bytes"]["image_mean"] > 0 and r["client_overhead_s"]["count"] == 6
    buf = io.StringIO()
    bs.print_table(r, file=buf)
    assert "Image throughput" in buf.getvalue()
