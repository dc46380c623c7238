"""Soak with faults: drive a running server at a multiple of its measured capacity for a while, with a
mix of sizes, n, bad requests and client disconnects, optionally killing a stage's replica on a
schedule, and check that nothing is lost or hangs.

    python benchmarks/soak.py --base-url http://127.0.0.1:8000 --duration-s 600 --multiple 2 \
        --sizes 256x256,512x512 --kill-stage denoiser --kill-every-s 60 --output-json soak.json

Capacity: images/s of a closed loop at the ingress's `max_inflight_images` concurrency (from the
server's OpenAPI `info.x-limits`) for `--measure-s`, unless `--capacity` is given. Then requests arrive
open-loop (Poisson) at `multiple` x capacity. A replica kill is SIGKILL of the pid that `/v1/stats`
reports for the stage (so it must run on the server's machine).

Reports per status code (and error code) counts, latency percentiles of 200s, requests with no answer
within 2x the server's request timeout (`hung`), transport errors that were not our own disconnects
(`lost`), and the memory (RSS) of every Ray process before and after. Exits 1 on any lost or hung
request, on any 5xx other than `overloaded` / `worker_died` / `unavailable`, and on any error body that is not OpenAI's
error object or carries internals (tracebacks, pids, addresses, actor ids).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import random
import signal
import statistics
import sys
import time

import httpx

# the contract's 5xx: a stage's queue full (overload gets a fast 503, never a longer queue), a stage restarting or
# its worker killed (the soak kills some); anything else is a failure
ALLOWED_5XX = {"overloaded", "worker_died", "unavailable"}
LEAKS = ("Traceback", "pid=", "ip=", "actor_id", "\x1b[", "object at 0x")  # internals no error body may carry


def error_problem(r: httpx.Response) -> str | None:
    """What is wrong with a non-2xx answer's body, if anything: it must be OpenAI's error object
    ({"error": {"message", "type", "param", "code"}}) and carry nothing internal."""
    try:
        err = r.json()["error"]
        assert isinstance(err, dict) and {"message", "type", "param", "code"} <= set(err) and isinstance(err["message"], str)
    except Exception:
        return f"{r.status_code} not OpenAI-shaped: {r.text[:200]}"
    leaked = [s for s in LEAKS if s in r.text]
    return f"{r.status_code} leaks {leaked}: {r.text[:200]}" if leaked else None
GOOD_PROMPTS = ["a red fox in the snow", "a lighthouse at dawn", "a bowl of ramen, studio light", "an owl on a branch at night"]


def ray_memory() -> dict[str, int]:
    """RSS bytes of every Ray process on this machine, by process name (ray::..., raylet, gcs_server)."""
    import psutil

    out: dict[str, int] = collections.Counter()
    for p in psutil.process_iter(["name", "cmdline", "memory_info"]):
        try:
            cmd = " ".join(p.info["cmdline"] or [])
            name = p.info["name"] or ""
            if cmd.startswith("ray::") or name in ("raylet", "gcs_server") or "ray/dashboard" in cmd:
                key = cmd.split(" ")[0] if cmd.startswith("ray::") else name
                out[key] += p.info["memory_info"].rss
        except (psutil.NoSuchProcess, psutil.AccessDenied, TypeError):
            continue
    return dict(out)


def bad_request(rng: random.Random, limits: dict) -> tuple[bytes, str]:
    kind = rng.choice(["json", "n", "size", "long_prompt", "unknown_field", "steps"])
    body = {"prompt": "x", "size": "64x64"}
    if kind == "json":
        return b"{not json", kind
    if kind == "n":
        body["n"] = limits.get("max_n", 8) + 1
    elif kind == "size":
        body["size"] = "100x7"
    elif kind == "long_prompt":
        body["prompt"] = "a red fox in the snow, " * 400
    elif kind == "unknown_field":
        body["bogus"] = 1
    else:
        body["num_inference_steps"] = limits.get("max_steps", 50) + 1
    return json.dumps(body).encode(), kind


class Soak:
    def __init__(self, args):
        self.args = args
        self.base = args.base_url.rstrip("/")
        self.rng = random.Random(args.seed)
        self.codes: collections.Counter = collections.Counter()
        self.latencies: list[float] = []
        self.hung = 0
        self.lost: list[str] = []
        self.disconnects = 0
        self.bad_5xx: list[str] = []
        self.kills: list[dict] = []
        self.malformed: list[str] = []  # error bodies that are not OpenAI-shaped or leak internals

    async def setup(self, client: httpx.AsyncClient) -> None:
        schema = (await client.get(self.base + "/openapi.json")).json()
        self.limits = schema.get("info", {}).get("x-limits", {})
        self.timeout_s = float(self.args.request_timeout_s or self.limits.get("request_timeout_s", 300))
        self.sizes = self.args.sizes.split(",")

    def good_body(self) -> dict:
        return {"prompt": self.rng.choice(GOOD_PROMPTS), "size": self.rng.choice(self.sizes), "n": self.rng.choice(self.args.n_choices),
                "num_inference_steps": self.args.steps, "seed": self.rng.randrange(2**31)}

    async def one(self, client: httpx.AsyncClient, kind: str, measure: bool = False) -> int:
        headers = {"content-type": "application/json"}
        if kind == "bad":
            content, _ = bad_request(self.rng, self.limits)
        else:
            body = self.good_body()
            content = json.dumps(body).encode()
        t0 = time.perf_counter()
        try:
            if kind == "disconnect":  # the client gives up long before the server answers
                await asyncio.wait_for(client.post(self.base + "/v1/images/generations", content=content, headers=headers),
                                       timeout=self.rng.uniform(0.005, 0.05))
                return 0  # answered before the client left (the timeout is shorter than any request)
            else:
                r = await client.post(self.base + "/v1/images/generations", content=content, headers=headers, timeout=2 * self.timeout_s)
                code = r.status_code
                problem = error_problem(r) if code != 200 else None
                err = r.json()["error"].get("code") if code != 200 and problem is None else None
                if problem and not measure:
                    self.malformed.append(problem)
                if not measure:
                    self.codes[f"{code}" + (f" {err}" if err else "")] += 1
                    if code == 200:
                        self.latencies.append(time.perf_counter() - t0)
                    if code >= 500 and err not in ALLOWED_5XX:
                        self.bad_5xx.append(f"{code} {err}: {r.text[:200]}")
                return json.loads(content).get("n", 1) if code == 200 else 0
        except asyncio.TimeoutError:
            if kind == "disconnect":
                self.disconnects += 1
                return 0
            self.hung += 1
        except httpx.TimeoutException:
            self.hung += 1
        except httpx.HTTPError as e:
            self.lost.append(f"{type(e).__name__}: {e}"[:200])
        return 0

    async def measure_capacity(self, client: httpx.AsyncClient) -> float:
        if self.args.capacity:
            return float(self.args.capacity)
        conc = int(self.args.measure_concurrency or self.limits.get("max_inflight_images", 8))
        stop = time.monotonic() + self.args.measure_s
        images = 0

        async def worker():
            nonlocal images
            while time.monotonic() < stop:
                # not `images += await ...`: that reads `images` before the await and drops what the other
                # workers added meanwhile (it measured ~1 % of the real rate at 256 workers)
                got = await self.one(client, "good", measure=True)
                images += got
                if not got:  # refused (429/503): back off instead of a hot loop of refusals
                    await asyncio.sleep(0.1)

        t0 = time.monotonic()
        await asyncio.gather(*[worker() for _ in range(conc)])
        return max(images / (time.monotonic() - t0), 0.01)

    async def killer(self, client: httpx.AsyncClient, stop_at: float) -> None:
        if not self.args.kill_stage:
            return
        next_kill = time.monotonic() + self.args.kill_every_s
        while time.monotonic() + 1 < stop_at:
            await asyncio.sleep(max(0.0, min(next_kill, stop_at) - time.monotonic()))
            if time.monotonic() >= stop_at:
                return
            try:
                pid = (await client.get(self.base + "/v1/stats", timeout=30)).json()[self.args.kill_stage]["pid"]
                os.kill(pid, signal.SIGKILL)
                self.kills.append({"at_s": round(time.monotonic() - self.t_start, 1), "stage": self.args.kill_stage, "pid": pid})
            except Exception as e:  # the stage may be restarting: try at the next slot
                self.kills.append({"at_s": round(time.monotonic() - self.t_start, 1), "failed": f"{type(e).__name__}"})
            next_kill += self.args.kill_every_s

    async def run(self) -> dict:
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=100)
        async with httpx.AsyncClient(limits=limits, timeout=60) as client:
            await self.setup(client)
            mem_before = ray_memory()
            capacity = await self.measure_capacity(client)
            mean_n = statistics.mean(self.args.n_choices)
            rate = self.args.multiple * capacity / mean_n  # requests/s
            self.t_start = time.monotonic()
            stop_at = self.t_start + self.args.duration_s
            tasks = []
            killer = asyncio.ensure_future(self.killer(client, stop_at))
            # every k-th request disconnects (k = 1 / disconnect_fraction), so even a short soak has some
            every = max(1, round(1 / self.args.disconnect_fraction)) if self.args.disconnect_fraction > 0 else 0
            while time.monotonic() < stop_at:
                if every and len(tasks) % every == every - 1:
                    kind = "disconnect"
                else:
                    kind = "bad" if self.rng.random() < self.args.bad_fraction else "good"
                tasks.append(asyncio.ensure_future(self.one(client, kind)))
                await asyncio.sleep(self.rng.expovariate(rate))
            await killer
            await asyncio.gather(*tasks)
            mem_after = ray_memory()
        lat = sorted(self.latencies)

        def pct(p):
            return round(lat[min(len(lat) - 1, int(p / 100 * len(lat)))], 3) if lat else None

        report = {
            "capacity_images_per_s": round(capacity, 3), "multiple": self.args.multiple, "rate_requests_per_s": round(rate, 3),
            "duration_s": self.args.duration_s, "requests": len(tasks), "codes": dict(self.codes), "client_disconnects": self.disconnects,
            "latency_s": {"p50": pct(50), "p90": pct(90), "p99": pct(99), "max": pct(100)},
            "hung": self.hung, "lost": len(self.lost), "lost_examples": self.lost[:5], "bad_5xx": len(self.bad_5xx),
            "bad_5xx_examples": self.bad_5xx[:5], "malformed_errors": len(self.malformed), "malformed_examples": self.malformed[:5],
            "kills": self.kills,
            "ray_memory_bytes": {"before": mem_before, "after": mem_after,
                                 "total_before": sum(mem_before.values()), "total_after": sum(mem_after.values())},
        }
        report["ok"] = self.hung == 0 and not self.lost and not self.bad_5xx and not self.malformed
        return report


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-url", default="http://127.0.0.1:8000")
    p.add_argument("--duration-s", type=float, default=600)
    p.add_argument("--multiple", type=float, default=2.0, help="arrival rate as a multiple of the measured capacity")
    p.add_argument("--capacity", type=float, default=None, help="images/s; skips the measurement")
    p.add_argument("--measure-s", type=float, default=20)
    p.add_argument("--measure-concurrency", type=int, default=None)
    p.add_argument("--sizes", default="256x256,512x512")
    p.add_argument("--n-choices", type=lambda s: [int(x) for x in s.split(",")], default=[1, 1, 2])
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--bad-fraction", type=float, default=0.1)
    p.add_argument("--disconnect-fraction", type=float, default=0.05)
    p.add_argument("--kill-stage", choices=["text_encoder", "denoiser", "vae"], default=None)
    p.add_argument("--kill-every-s", type=float, default=60)
    p.add_argument("--request-timeout-s", type=float, default=None, help="default: the server's, from /openapi.json")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output-json", default=None)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse(argv)
    report = asyncio.run(Soak(args).run())
    text = json.dumps(report, indent=2)
    print(text)
    if args.output_json:
        with open(args.output_json, "w") as f:
            f.write(text)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
