"""Online serving benchmark for the Z-Image-Turbo server (POST /v1/images/generations over HTTP).

Modeled on the bench_serving tools of vLLM and SGLang-diffusion: prompts from a file, requests sent at
a Poisson rate (or all at once) with at most `--max-concurrency` in flight, latency percentiles and
throughput from the client's clock, plus what only this server reports: per-image stage timings
(queue, text encoder, DiT, VAE, encode) from the response, and the server's `/v1/stats` before and
after the run (batch sizes the DiT actually ran = the difference of `forward_batch_sizes`, peak GPU
memory per stage).

    python benchmarks/bench_serving.py --base-url http://127.0.0.1:8000 --num-prompts 40 \
        --max-concurrency 8 --size 1024x1024 --output-json benchmarks/results/run.json

`run_benchmark(args) -> dict` runs the same in-process (compare.py, tests); `args` is an
`argparse.Namespace` or a dict of the options below (missing keys take their defaults).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import json
import math
import os
import random
import statistics
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

DEFAULT_PROMPT_FILE = Path(__file__).resolve().parent / "prompts.txt"
STAGE_KEYS = ("queue_s", "text_encoder_s", "denoiser_s", "vae_s", "encode_s", "total_s")


# ---------------------------------------------------------------------------------------------
# options
# ---------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--base-url", default="http://127.0.0.1:8000")
    p.add_argument("--num-prompts", type=int, default=20, help="timed requests")
    p.add_argument("--max-concurrency", type=int, default=None, help="requests in flight at most (default: unbounded)")
    p.add_argument("--request-rate", type=float, default=float("inf"), help="Poisson arrival rate in req/s; inf sends all at once")
    p.add_argument("--size", default="1024x1024", help="WIDTHxHEIGHT")
    p.add_argument("--steps", type=int, default=8, help="num_inference_steps (DiT forwards)")
    p.add_argument("--n", type=int, default=1, help="images per request")
    p.add_argument("--guidance-scale", type=float, default=0.0)
    p.add_argument("--output-format", default="png", choices=["png", "jpeg", "webp"])
    p.add_argument("--model", default=None, help="model name to send (default: the first of GET /v1/models, else none)")
    p.add_argument("--prompt-file", default=str(DEFAULT_PROMPT_FILE), help="one prompt per line; blank lines and #-comments skipped")
    p.add_argument("--warmup-requests", type=int, default=1, help="sent first (at up to --max-concurrency), excluded from all figures")
    p.add_argument("--seed", type=int, default=0, help="seeds the prompt order, the arrival times and the per-request image seeds")
    p.add_argument("--request-timeout", type=float, default=600.0, help="client timeout per request, seconds")
    p.add_argument("--wait-ready", type=float, default=0.0, help="poll GET /health for up to this many seconds before starting")
    p.add_argument("--output-json", default=None, help="write the result here")
    p.add_argument("--label", default=None, help="free text stored in the result")
    p.add_argument("--disable-tqdm", action="store_true")
    p.add_argument("--quiet", action="store_true", help="do not print the table")
    return p


def _normalise_args(args: Any) -> argparse.Namespace:
    defaults = vars(build_parser().parse_args([]))
    given = vars(args) if isinstance(args, argparse.Namespace) else dict(args or {})
    unknown = set(given) - set(defaults)
    if unknown:
        raise ValueError(f"unknown benchmark options: {sorted(unknown)}")
    ns = argparse.Namespace(**{**defaults, **given})
    if ns.request_rate is None:
        ns.request_rate = float("inf")
    if ns.max_concurrency is not None and ns.max_concurrency < 1:
        raise ValueError("max_concurrency must be >= 1")
    if ns.request_rate <= 0:
        raise ValueError("request_rate must be > 0 (inf: all at once)")
    return ns


# ---------------------------------------------------------------------------------------------
# pure helpers (unit-tested)
# ---------------------------------------------------------------------------------------------
def load_prompts(path: str | os.PathLike) -> list[str]:
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    prompts = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise ValueError(f"no prompts in {path}")
    return prompts


def sample_prompts(prompts: list[str], n: int, seed: int) -> list[str]:
    """n prompts in a seeded shuffled order; cycles through the file (reshuffled) when n exceeds it."""
    rng = random.Random(seed)
    out: list[str] = []
    while len(out) < n:
        order = list(prompts)
        rng.shuffle(order)
        out += order[: n - len(out)]
    return out


def poisson_arrival_offsets(n: int, rate: float, seed: int) -> list[float]:
    """Send times (seconds from the start) of n requests arriving as a Poisson process of `rate` req/s:
    exponential gaps of mean 1/rate, the first request at 0. rate=inf: all at 0."""
    if n <= 0:
        return []
    if math.isinf(rate):
        return [0.0] * n
    if rate <= 0:
        raise ValueError("rate must be > 0")
    rng = random.Random(seed)
    t, out = 0.0, [0.0]
    for _ in range(n - 1):
        t += rng.expovariate(rate)
        out.append(t)
    return out


def percentile(values: Iterable[float], q: float) -> float | None:
    """q-th percentile (0..100) with linear interpolation between closest ranks (numpy's default)."""
    xs = sorted(values)
    if not xs:
        return None
    if not 0 <= q <= 100:
        raise ValueError("q must be within [0, 100]")
    pos = (len(xs) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summarize(values: Iterable[float]) -> dict[str, float | None]:
    xs = [float(v) for v in values]
    if not xs:
        return {"count": 0, "mean": None, "median": None, "p90": None, "p99": None, "min": None, "max": None, "std": None}
    return {
        "count": len(xs),
        "mean": statistics.fmean(xs),
        "median": statistics.median(xs),
        "p90": percentile(xs, 90),
        "p99": percentile(xs, 99),
        "min": min(xs),
        "max": max(xs),
        "std": statistics.pstdev(xs),
    }


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def stats_delta(before: Any, after: Any) -> Any:
    """What happened between two `/v1/stats` snapshots: counters (numbers, also inside dicts such as
    `forward_batch_sizes`) are differenced key by key (a key missing before counts as 0); fields that
    are levels, not counters (`peak_*`, `pid`, `device`, `inflight_*`, strings, lists), keep their
    value after. Zero entries of count dicts are dropped, so `{"1": 3, "4": 2}` reads as 'three
    forwards at batch 1, two at batch 4 during the run'."""
    if isinstance(after, dict):
        before = before if isinstance(before, dict) else {}
        out = {}
        for k, v in after.items():
            if _is_level_key(k):
                out[k] = v
                continue
            d = stats_delta(before.get(k), v)
            if _is_count_dict_key(k) and isinstance(d, dict):
                d = {kk: vv for kk, vv in d.items() if not (_is_number(vv) and vv == 0)}
            out[k] = d
        return out
    if _is_number(after):
        b = before if _is_number(before) else 0
        d = after - b
        return round(d, 6) if isinstance(d, float) else d
    return after


def _is_level_key(key: str) -> bool:
    return key.startswith(("peak_", "inflight", "max_")) or key in ("pid", "device", "replicas", "startup_s", "startup_compiles")


def _is_count_dict_key(key: str) -> bool:
    return key.endswith("_sizes") or key.endswith("batch_sizes")


def peak_memory_by_stage(stats: dict | None) -> dict[str, int | None]:
    out: dict[str, int | None] = {}
    for stage, s in (stats or {}).items():
        if isinstance(s, dict) and "peak_memory_bytes" in s:
            out[stage] = s["peak_memory_bytes"]
    return out


def mean_batch_size(size_counts: dict[str, int] | None) -> float | None:
    if not size_counts:
        return None
    total = sum(size_counts.values())
    return sum(int(k) * v for k, v in size_counts.items()) / total if total else None


# ---------------------------------------------------------------------------------------------
# one request
# ---------------------------------------------------------------------------------------------
@dataclass
class RequestResult:
    index: int
    prompt_words: int
    success: bool = False
    status: int | None = None
    error: str | None = None  # "429:rate_limit_exceeded", "timeout", "ClientConnectorError", ...
    error_message: str | None = None
    scheduled_s: float = 0.0  # planned send time (from the run's start)
    start_s: float = 0.0  # actual send time (from the run's start; later than scheduled when concurrency-bound)
    latency_s: float = 0.0
    request_bytes: int = 0
    response_bytes: int = 0
    image_bytes: list[int] = field(default_factory=list)
    image_timings: list[dict] = field(default_factory=list)
    request_timings: dict = field(default_factory=dict)


def _payload(args: argparse.Namespace, prompt: str, seed: int) -> dict:
    body: dict[str, Any] = {
        "prompt": prompt,
        "n": args.n,
        "size": args.size,
        "response_format": "b64_json",
        "output_format": args.output_format,
        "num_inference_steps": args.steps,
        "seed": seed,
    }
    if args.guidance_scale:
        body["guidance_scale"] = args.guidance_scale
    if args.model:
        body["model"] = args.model
    return body


def _parse_response(res: RequestResult, status: int, raw: bytes) -> None:
    res.status = status
    res.response_bytes = len(raw)
    try:
        body = json.loads(raw)
    except ValueError:
        body = None
    if status == 200 and isinstance(body, dict) and isinstance(body.get("data"), list) and body["data"]:
        res.success = True
        for item in body["data"]:
            b64 = item.get("b64_json") or ""
            res.image_bytes.append(len(base64.b64decode(b64)) if b64 else 0)
            res.image_timings.append(item.get("timings") or {})
        res.request_timings = body.get("timings") or {}
        return
    code = None
    msg = None
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        code = body["error"].get("code") or body["error"].get("type")
        msg = body["error"].get("message")
    elif isinstance(body, dict) and "detail" in body:
        msg = str(body["detail"])
    res.error = f"{status}:{code}" if code else f"{status}"
    res.error_message = (msg or raw[:300].decode("utf-8", "replace"))[:500]


class _Client:
    """aiohttp when importable (Ray Serve brings it), else httpx."""

    def __init__(self, timeout_s: float, max_connections: int):
        self.timeout_s = timeout_s
        self.max_connections = max_connections
        self._session = None
        try:
            import aiohttp  # noqa: F401

            self.kind = "aiohttp"
        except ImportError:  # pragma: no cover - exercised only without aiohttp
            self.kind = "httpx"

    async def __aenter__(self):
        if self.kind == "aiohttp":
            import aiohttp

            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.timeout_s),
                connector=aiohttp.TCPConnector(limit=self.max_connections, force_close=False),
            )
        else:
            import httpx

            self._session = httpx.AsyncClient(
                timeout=self.timeout_s, limits=httpx.Limits(max_connections=self.max_connections, max_keepalive_connections=self.max_connections)
            )
        return self

    async def __aexit__(self, *exc):
        if self.kind == "aiohttp":
            await self._session.close()
        else:
            await self._session.aclose()

    async def request(self, method: str, url: str, body: bytes | None = None) -> tuple[int, bytes]:
        headers = {"Content-Type": "application/json"} if body is not None else None
        if self.kind == "aiohttp":
            async with self._session.request(method, url, data=body, headers=headers) as r:
                return r.status, await r.read()
        r = await self._session.request(method, url, content=body, headers=headers)
        return r.status_code, r.content

    async def get_json(self, url: str, timeout_s: float = 30.0) -> Any:
        try:
            status, raw = await asyncio.wait_for(self.request("GET", url), timeout_s)
        except Exception:
            return None
        if status != 200:
            return None
        try:
            return json.loads(raw)
        except ValueError:
            return None


async def _send(client: _Client, url: str, res: RequestResult, body: dict, t0: float) -> RequestResult:
    raw_body = json.dumps(body).encode()
    res.request_bytes = len(raw_body)
    res.start_s = time.perf_counter() - t0
    start = time.perf_counter()
    try:
        status, raw = await client.request("POST", url, raw_body)
        res.latency_s = time.perf_counter() - start
        _parse_response(res, status, raw)
    except asyncio.TimeoutError:
        res.latency_s = time.perf_counter() - start
        res.error, res.error_message = "client_timeout", f"no response within {client.timeout_s} s"
    except Exception as e:  # connection refused / reset, ...
        res.latency_s = time.perf_counter() - start
        res.error, res.error_message = type(e).__name__, str(e)[:500]
    return res


class _Progress:
    def __init__(self, total: int, disable: bool, desc: str):
        self.total, self.done, self.disable = total, 0, disable
        self._bar = None
        if not disable:
            try:
                from tqdm import tqdm

                self._bar = tqdm(total=total, desc=desc, file=sys.stderr, leave=False)
            except ImportError:
                self._bar = None
        self.desc = desc

    def update(self) -> None:
        self.done += 1
        if self.disable:
            return
        if self._bar is not None:
            self._bar.update(1)
        else:
            print(f"\r{self.desc}: {self.done}/{self.total}", end="" if self.done < self.total else "\n", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


async def _run_requests(
    client: _Client, url: str, args: argparse.Namespace, prompts: list[str], seeds: list[int], offsets: list[float], desc: str
) -> tuple[list[RequestResult], float]:
    sem = asyncio.Semaphore(args.max_concurrency) if args.max_concurrency else None
    progress = _Progress(len(prompts), args.disable_tqdm, desc)
    t0 = time.perf_counter()

    async def one(i: int) -> RequestResult:
        delay = offsets[i] - (time.perf_counter() - t0)
        if delay > 0:
            await asyncio.sleep(delay)
        res = RequestResult(index=i, prompt_words=len(prompts[i].split()), scheduled_s=offsets[i])
        body = _payload(args, prompts[i], seeds[i])
        if sem is not None:
            async with sem:
                await _send(client, url, res, body, t0)
        else:
            await _send(client, url, res, body, t0)
        progress.update()
        return res

    results = await asyncio.gather(*[one(i) for i in range(len(prompts))])
    duration = time.perf_counter() - t0
    progress.close()
    return list(results), duration


# ---------------------------------------------------------------------------------------------
# the benchmark
# ---------------------------------------------------------------------------------------------
async def wait_ready(base_url: str, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    async with _Client(30.0, 2) as c:
        while True:
            try:
                status, _ = await asyncio.wait_for(c.request("GET", base_url + "/health"), 30)
                if status == 200:
                    return True
            except Exception:
                pass
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(1.0)


def compute_metrics(results: list[RequestResult], duration_s: float, args: argparse.Namespace) -> dict:
    ok = [r for r in results if r.success]
    failed = [r for r in results if not r.success]
    images = sum(len(r.image_bytes) for r in ok)
    latencies = [r.latency_s for r in ok]
    per_image = collections.defaultdict(list)
    for r in ok:
        for t in r.image_timings:
            for k, v in t.items():
                if _is_number(v):
                    per_image[k].append(float(v))
    stages = {k: {"mean": statistics.fmean(v), "median": statistics.median(v)} for k, v in per_image.items() if v}
    server_total, client_overhead = [], []
    for r in ok:
        t = _server_total(r)
        if t is not None:
            server_total.append(t)
            client_overhead.append(r.latency_s - t)
    return {
        "duration_s": duration_s,
        "completed": len(ok),
        "failed": len(failed),
        "errors": dict(collections.Counter(r.error for r in failed)),
        "error_examples": {r.error: r.error_message for r in failed},
        "images": images,
        "request_throughput_rps": len(ok) / duration_s if duration_s > 0 else 0.0,
        "image_throughput_ips": images / duration_s if duration_s > 0 else 0.0,
        "latency_s": summarize(latencies),
        "latency_per_prompt_words": _latency_by_length(ok),
        # mean requests in flight over the run (Little's law on the client's clock)
        "mean_inflight": sum(r.latency_s for r in results) / duration_s if duration_s > 0 else 0.0,
        "stage_timings_s": stages,
        "server_total_s": summarize(server_total),
        "client_overhead_s": summarize(client_overhead),  # HTTP + JSON + base64 beyond the server's own total
        "payload_bytes": {
            "request_total": sum(r.request_bytes for r in results),
            "response_total": sum(r.response_bytes for r in ok),
            "response_mean": statistics.fmean([r.response_bytes for r in ok]) if ok else None,
            "image_mean": statistics.fmean([b for r in ok for b in r.image_bytes]) if images else None,
        },
    }


def _server_total(r: RequestResult) -> float | None:
    """The server's own time for the request: its request-level `total_s`, else the longest image's."""
    if _is_number(r.request_timings.get("total_s")):
        return float(r.request_timings["total_s"])
    totals = [float(t["total_s"]) for t in r.image_timings if _is_number(t.get("total_s"))]
    return max(totals) if totals else None


def _latency_by_length(ok: list[RequestResult]) -> dict:
    buckets = {"<=10": [], "11-30": [], ">30": []}
    for r in ok:
        key = "<=10" if r.prompt_words <= 10 else "11-30" if r.prompt_words <= 30 else ">30"
        buckets[key].append(r.latency_s)
    return {k: {"count": len(v), "median": statistics.median(v) if v else None} for k, v in buckets.items()}


async def benchmark(args: Any) -> dict:
    args = _normalise_args(args)
    base = args.base_url.rstrip("/")
    url = base + "/v1/images/generations"
    if args.wait_ready and not await wait_ready(base, args.wait_ready):
        raise TimeoutError(f"{base}/health not 200 within {args.wait_ready} s")
    all_prompts = load_prompts(args.prompt_file)
    prompts = sample_prompts(all_prompts, args.warmup_requests + args.num_prompts, args.seed)
    warm_prompts, prompts = prompts[: args.warmup_requests], prompts[args.warmup_requests :]
    seeds = [args.seed * 1_000_003 + i for i in range(args.warmup_requests + args.num_prompts)]
    warm_seeds, seeds = seeds[: args.warmup_requests], seeds[args.warmup_requests :]
    offsets = poisson_arrival_offsets(len(prompts), args.request_rate, args.seed)
    max_conn = max(args.max_concurrency or len(prompts) or 1, 1)

    async with _Client(args.request_timeout, max_conn) as client:
        if args.model is None:
            models = await client.get_json(base + "/v1/models")
            try:
                args.model = models["data"][0]["id"]
            except (TypeError, KeyError, IndexError):
                args.model = None
        warmup = {"requests": len(warm_prompts), "failed": 0}
        if warm_prompts:
            w_res, w_dur = await _run_requests(client, url, args, warm_prompts, warm_seeds, [0.0] * len(warm_prompts), "warm-up")
            warmup.update(failed=sum(not r.success for r in w_res), duration_s=w_dur,
                          errors=dict(collections.Counter(r.error for r in w_res if not r.success)))
        stats_before = await client.get_json(base + "/v1/stats")
        results, duration = await _run_requests(client, url, args, prompts, seeds, offsets, "benchmark")
        stats_after = await client.get_json(base + "/v1/stats")

    out = {
        "label": args.label,
        "base_url": base,
        "model": args.model,
        "client": client.kind,
        "config": {k: (None if isinstance(v, float) and math.isinf(v) else v) for k, v in vars(args).items()},
        "request_rate": "inf" if math.isinf(args.request_rate) else args.request_rate,
        "warmup": warmup,
        **compute_metrics(results, duration, args),
        "stats_before": stats_before,
        "stats_after": stats_after,
        "stats_delta": stats_delta(stats_before, stats_after) if stats_after is not None else None,
        "requests": [_request_row(r) for r in results],
    }
    delta = out["stats_delta"] or {}
    dn = delta.get("denoiser") if isinstance(delta, dict) else None
    out["denoiser_forward_batch_sizes"] = dn.get("forward_batch_sizes") if isinstance(dn, dict) else None
    out["denoiser_mean_forward_batch"] = mean_batch_size(out["denoiser_forward_batch_sizes"])
    out["peak_memory_bytes"] = peak_memory_by_stage(stats_after)
    return out


def _request_row(r: RequestResult) -> dict:
    row = asdict(r)
    row["image_timings"] = [{k: v for k, v in t.items() if _is_number(v)} for t in r.image_timings]
    return row


def run_benchmark(args: Any) -> dict:
    """Run the benchmark to completion and return its result dict (also writes `output_json` and
    prints the table unless `quiet`). Safe to call from code that already runs an event loop."""
    ns = _normalise_args(args)
    try:
        asyncio.get_running_loop()
        in_loop = True
    except RuntimeError:
        in_loop = False
    if not in_loop:
        result = asyncio.run(benchmark(ns))
    else:  # called from async code: run on a private loop in a thread
        box: dict = {}

        def target():
            try:
                box["r"] = asyncio.run(benchmark(ns))
            except BaseException as e:  # noqa: BLE001 - re-raised below
                box["e"] = e

        t = threading.Thread(target=target, name="bench_serving")
        t.start()
        t.join()
        if "e" in box:
            raise box["e"]
        result = box["r"]
    if not ns.quiet:
        print_table(result)
    if ns.output_json:
        write_json(result, ns.output_json)
    return result


def write_json(result: dict, path: str | os.PathLike) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, ensure_ascii=False, default=str) + "\n", encoding="utf-8")


# ---------------------------------------------------------------------------------------------
# printing
# ---------------------------------------------------------------------------------------------
def _fmt(v: Any, unit: str = "") -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4f}{unit}" if abs(v) < 100 else f"{v:.1f}{unit}"
    return f"{v}{unit}"


def _gib(b: Any) -> str:
    return f"{b / 2**30:.2f} GiB" if _is_number(b) else "-"


def print_table(r: dict, file=None) -> None:
    file = file or sys.stdout
    w = 60
    cfg = r.get("config", {})

    def row(k, v):
        print(f"{k:<38}{v:>22}", file=file)

    print("\n" + " Serving Benchmark Result ".center(w, "="), file=file)
    if r.get("label"):
        row("Label:", str(r["label"]))
    row("Base URL:", r.get("base_url", "-"))
    row("Size / steps / n:", f"{cfg.get('size')} / {cfg.get('steps')} / {cfg.get('n')}")
    row("Output format:", str(cfg.get("output_format")))
    row("Max concurrency:", str(cfg.get("max_concurrency") or "unbounded"))
    row("Request rate (req/s):", str(r.get("request_rate")))
    row("Warm-up requests (excluded):", str(r.get("warmup", {}).get("requests")))
    print("-" * w, file=file)
    row("Completed requests:", str(r["completed"]))
    row("Failed requests:", str(r["failed"]))
    for code, count in sorted(r.get("errors", {}).items()):
        row(f"  {code}:", str(count))
    row("Benchmark duration (s):", _fmt(r["duration_s"]))
    row("Request throughput (req/s):", _fmt(r["request_throughput_rps"]))
    row("Image throughput (images/s):", _fmt(r["image_throughput_ips"]))
    row("Mean requests in flight:", _fmt(r.get("mean_inflight")))
    print(" Latency (s) ".center(w, "-"), file=file)
    for k in ("mean", "median", "p90", "p99", "min", "max"):
        row(f"{k}:", _fmt(r["latency_s"][k]))
    print(" Server stage time per image (s): mean / median ".center(w, "-"), file=file)
    names = {"queue_s": "queue", "text_encoder_s": "text encoder", "denoiser_s": "DiT denoiser", "vae_s": "VAE decode",
             "encode_s": "image encode", "total_s": "server total"}
    for k, name in names.items():
        s = r.get("stage_timings_s", {}).get(k)
        row(f"{name}:", f"{_fmt(s['mean'])} / {_fmt(s['median'])}" if s else "-")
    row("client overhead (median):", _fmt(r.get("client_overhead_s", {}).get("median")))
    print(" Server ".center(w, "-"), file=file)
    bs = r.get("denoiser_forward_batch_sizes")
    row("DiT forwards by batch size:", json.dumps(bs) if bs else "-")
    row("DiT mean forward batch:", _fmt(r.get("denoiser_mean_forward_batch")))
    delta = r.get("stats_delta") or {}
    for stage in ("text_encoder", "vae"):
        s = delta.get(stage) if isinstance(delta, dict) else None
        if isinstance(s, dict) and s.get("batch_sizes"):
            row(f"{stage} batches by size:", json.dumps(s["batch_sizes"]))
    for stage, b in (r.get("peak_memory_bytes") or {}).items():
        row(f"peak memory {stage}:", _gib(b))
    p = r.get("payload_bytes", {})
    row("Response bytes (mean):", _fmt(p.get("response_mean")))
    row("Image bytes (mean):", _fmt(p.get("image_mean")))
    print("=" * w, file=file)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    result = run_benchmark(args)
    return 0 if result["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
