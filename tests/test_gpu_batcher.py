"""GpuBatcher: the next batch is formed when the GPU thread is free, from everything that queued."""

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from serve_app.deployments.gpu_batcher import GpuBatcher


def make(run_s: float, max_batch: int = 4, wait_s: float = 0.0):
    batches: list[list] = []
    threads: set = set()

    def fn(items):
        threads.add(threading.get_ident())
        batches.append(list(items))
        time.sleep(run_s)
        if "boom" in items:
            raise ValueError("boom in batch")
        return [x * 10 for x in items]

    return GpuBatcher(fn, ThreadPoolExecutor(max_workers=1), max_batch, wait_s), batches, threads


def test_arrivals_during_a_batch_form_the_next_batch():
    async def main():
        b, batches, threads = make(run_s=0.3)
        first = asyncio.ensure_future(b.submit(0))
        await asyncio.sleep(0.05)  # batch [0] is running now
        rest = [asyncio.ensure_future(b.submit(i)) for i in range(1, 7)]
        return await asyncio.gather(first, *rest), batches, threads

    results, batches, threads = asyncio.run(main())
    assert results == [i * 10 for i in range(7)]
    # with Serve's batching the batch after [0] would hold one item; here it holds all that queued
    assert batches == [[0], [1, 2, 3, 4], [5, 6]]
    assert len(threads) == 1


def test_wait_timeout_coalesces_a_burst_and_idle_requests_start_at_once():
    async def main():
        b, batches, _ = make(run_s=0.01, max_batch=8, wait_s=0.1)
        t0 = time.perf_counter()
        burst = [asyncio.ensure_future(b.submit(i)) for i in range(3)]
        await asyncio.sleep(0.02)
        burst.append(asyncio.ensure_future(b.submit(3)))  # within the wait: same batch
        await asyncio.gather(*burst)
        b0, _, _ = make(run_s=0.01, wait_s=0.0)
        t1 = time.perf_counter()
        await b0.submit(9)
        return batches, t1 - t0, time.perf_counter() - t1

    batches, burst_s, idle_s = asyncio.run(main())
    assert batches == [[0, 1, 2, 3]]
    assert burst_s >= 0.1  # the batch was not full: it waited the whole timeout
    assert idle_s < 0.08  # no wait when the timeout is 0


def test_wait_fn_lets_a_lone_item_start_at_once():
    """The DiT waits for siblings only when the request has more than one image (`DenoiseRequest.companions`)."""
    async def main():
        batches: list[list] = []

        def fn(items):
            batches.append(list(items))
            return items

        b = GpuBatcher(fn, ThreadPoolExecutor(max_workers=1), 8, 0.2, wait_fn=lambda item: item[1] > 1)
        t0 = time.perf_counter()
        await b.submit(("alone", 1))
        lone_s = time.perf_counter() - t0
        t1 = time.perf_counter()
        pair = [asyncio.ensure_future(b.submit((f"sib{i}", 2))) for i in range(2)]
        await asyncio.gather(*pair)
        return batches, lone_s, time.perf_counter() - t1

    batches, lone_s, pair_s = asyncio.run(main())
    assert lone_s < 0.1 <= pair_s  # the lone item did not wait the 0.2 s; the pair did (its batch was not full)
    assert batches == [[("alone", 1)], [("sib0", 2), ("sib1", 2)]]


def test_errors_reach_every_caller_of_the_batch_and_cancelled_items_are_dropped():
    async def main():
        b, batches, _ = make(run_s=0.2)
        running = asyncio.ensure_future(b.submit(1))
        await asyncio.sleep(0.05)
        bad = [asyncio.ensure_future(b.submit(x)) for x in (2, "boom")]
        dropped = asyncio.ensure_future(b.submit(3))
        await asyncio.sleep(0.01)
        dropped.cancel()  # queued, not started: never runs
        out = await asyncio.gather(running, *bad, return_exceptions=True)
        after = await b.submit(4)  # the batcher keeps serving after a failed batch
        return out, after, batches

    out, after, batches = asyncio.run(main())
    assert out[0] == 10
    assert all(isinstance(e, ValueError) for e in out[1:])
    assert after == 40
    assert batches == [[1], [2, "boom"], [4]]


@pytest.mark.parametrize("max_batch", [1, 3])
def test_never_more_than_max_batch_size(max_batch):
    async def main():
        b, batches, _ = make(run_s=0.05, max_batch=max_batch, wait_s=0.05)
        return await asyncio.gather(*[b.submit(i) for i in range(7)]), batches

    results, batches = asyncio.run(main())
    assert results == [i * 10 for i in range(7)]
    assert max(len(x) for x in batches) == max_batch and sum(len(x) for x in batches) == 7


def test_a_cost_bound_splits_batches_and_keeps_fifo_order():
    async def main():
        batches: list = []

        def fn(items):
            batches.append(list(items))
            time.sleep(0.05)
            return items

        # cost = the item itself; at most 4 per batch and a cost of 10 per batch
        b = GpuBatcher(fn, ThreadPoolExecutor(max_workers=1), 4, 0.05, cost_fn=lambda x: x, max_batch_cost=10)
        return await asyncio.gather(*[b.submit(x) for x in (4, 4, 4, 1, 1, 12, 3)]), batches

    results, batches = asyncio.run(main())
    assert results == [4, 4, 4, 1, 1, 12, 3]
    # 4+4 fits, +4 does not: held for the next batch, ahead of everything queued later; 12 alone
    assert batches == [[4, 4], [4, 1, 1], [12], [3]]
