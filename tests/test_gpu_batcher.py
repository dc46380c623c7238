"""GpuBatcher: the next batch is formed when the GPU thread is free, from everything that queued.

No test here waits for time to pass or measures it: the batch function is held on an event while the
test queues items, `wait_fn` (called as a batch starts forming) tells the test that a batch's wait has
begun, and the assertions are on what went into each batch. HANG_S bounds every wait only so that a
broken batcher fails the test instead of hanging it.
"""

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from serve_app.deployments.gpu_batcher import GpuBatcher

HANG_S = 30.0  # a hang guard only; nothing should come near it
FOREVER = 3600.0  # a batch wait that no test may sit out: a batch waiting this long fails on HANG_S


class Recorder:
    """The batch function: records each batch (and the thread it ran on) and returns `result(item)` per
    item (10x by default). With `hold_first`, the first batch signals `started` and then blocks until
    the test sets `release`."""

    def __init__(self, hold_first: bool = False, result=lambda x: x * 10):
        self.result = result
        self.batches: list[list] = []
        self.threads: set = set()
        self.started = threading.Event()
        self.release = threading.Event()
        if not hold_first:
            self.release.set()

    def __call__(self, items):
        self.threads.add(threading.get_ident())
        self.batches.append(list(items))
        self.started.set()
        if not self.release.wait(HANG_S):
            raise TimeoutError("the test never released the batch")
        if "boom" in items:
            raise ValueError("boom in batch")
        return [self.result(x) for x in items]


async def _until(event: threading.Event) -> None:
    assert await asyncio.to_thread(event.wait, HANG_S), "hang guard"


def _after_queued(callback) -> None:
    """Run `callback` once the submit tasks created so far have queued their items. A task's first step
    (GpuBatcher.submit up to its `await fut`: the item is queued by then) is scheduled when the task is
    created, and the event loop runs scheduled callbacks in the order they were scheduled."""
    asyncio.get_running_loop().call_soon(callback)


def test_arrivals_during_a_batch_form_the_next_batch():
    async def main():
        fn = Recorder(hold_first=True)
        b = GpuBatcher(fn, ThreadPoolExecutor(max_workers=1), 4, 0.0)
        first = asyncio.ensure_future(b.submit(0))
        await _until(fn.started)  # batch [0] is running, held
        rest = [asyncio.ensure_future(b.submit(i)) for i in range(1, 7)]
        _after_queued(fn.release.set)
        return await asyncio.wait_for(asyncio.gather(first, *rest), HANG_S), fn

    results, fn = asyncio.run(main())
    assert results == [i * 10 for i in range(7)]
    # with Serve's batching the batch after [0] would hold one item; here it holds all that queued
    assert fn.batches == [[0], [1, 2, 3, 4], [5, 6]]
    assert len(fn.threads) == 1


@pytest.mark.parametrize("wait_s, expected", [
    (FOREVER, [[0, 1, 2, 3]]),  # the late item joins the burst's batch, which starts once full
    (0.0, [[0, 1, 2], [3]]),  # no wait: the burst's batch is formed before the late item queues
])
def test_the_wait_coalesces_a_burst_with_what_arrives_during_it(wait_s, expected):
    async def main():
        fn = Recorder()
        forming = asyncio.Event()

        def wait_fn(item):  # called as a batch starting with `item` is formed: its wait begins now
            forming.set()
            return True

        b = GpuBatcher(fn, ThreadPoolExecutor(max_workers=1), 4, wait_s, wait_fn=wait_fn)
        burst = [asyncio.ensure_future(b.submit(i)) for i in range(3)]  # queued together
        await asyncio.wait_for(forming.wait(), HANG_S)
        burst.append(asyncio.ensure_future(b.submit(3)))  # queued once the batch has begun its wait
        return await asyncio.wait_for(asyncio.gather(*burst), HANG_S), fn.batches

    results, batches = asyncio.run(main())
    assert results == [0, 10, 20, 30]
    assert batches == expected


def test_wait_fn_lets_a_lone_item_start_at_once():
    """The DiT waits for siblings only when the request has more than one image (`DenoiseRequest.companions`).
    The wait is FOREVER: a lone item that waited would take the next arrival into its batch, and a pair
    that did not wait would run as two batches."""
    async def main():
        fn = Recorder(result=lambda x: x)
        forming = asyncio.Event()

        def wait_fn(item):
            forming.set()
            return item[1] > 1

        b = GpuBatcher(fn, ThreadPoolExecutor(max_workers=1), 2, FOREVER, wait_fn=wait_fn)

        async def first_then_second(first, second):
            forming.clear()
            a = asyncio.ensure_future(b.submit(first))
            await asyncio.wait_for(forming.wait(), HANG_S)  # the batch starting with `first` is formed now
            c = asyncio.ensure_future(b.submit(second))
            return await asyncio.wait_for(asyncio.gather(a, c), HANG_S)

        await first_then_second(("alone", 1), ("next", 1))
        await first_then_second(("sib0", 2), ("sib1", 2))
        return fn.batches

    assert asyncio.run(main()) == [[("alone", 1)], [("next", 1)], [("sib0", 2), ("sib1", 2)]]


def test_a_failing_batch_is_rerun_item_by_item_so_only_the_bad_item_fails_and_cancelled_items_are_dropped():
    async def main():
        fn = Recorder(hold_first=True)
        b = GpuBatcher(fn, ThreadPoolExecutor(max_workers=1), 4, 0.0)
        running = asyncio.ensure_future(b.submit(1))
        await _until(fn.started)  # batch [1] is running, held
        bad = [asyncio.ensure_future(b.submit(x)) for x in (2, "boom")]
        dropped = asyncio.ensure_future(b.submit(3))
        _after_queued(dropped.cancel)  # queued, not started: never runs
        _after_queued(fn.release.set)
        out = await asyncio.wait_for(asyncio.gather(running, *bad, return_exceptions=True), HANG_S)
        after = await asyncio.wait_for(b.submit(4), HANG_S)  # the batcher keeps serving after a failed batch
        return out, after, dropped.cancelled(), fn.batches

    out, after, cancelled, batches = asyncio.run(main())
    assert out[0] == 10
    assert out[1] == 20 and isinstance(out[2], ValueError)  # the batch-mate of the bad item gets its result
    assert after == 40
    assert cancelled
    assert batches == [[1], [2, "boom"], [2], ["boom"], [4]]


@pytest.mark.parametrize("max_batch, expected", [
    (1, [[i] for i in range(7)]),
    (3, [[0, 1, 2], [3, 4, 5], [6]]),
])
def test_never_more_than_max_batch_size(max_batch, expected):
    async def main():
        fn = Recorder()
        b = GpuBatcher(fn, ThreadPoolExecutor(max_workers=1), max_batch, 0.0)
        # all seven are queued before the batcher's loop first runs (it is a task the first submit creates)
        return await asyncio.wait_for(asyncio.gather(*[b.submit(i) for i in range(7)]), HANG_S), fn.batches

    results, batches = asyncio.run(main())
    assert results == [i * 10 for i in range(7)]
    assert batches == expected


def _batches_by_cost(costs, max_batch_cost) -> list[list]:
    async def main():
        fn = Recorder()
        # cost = the item itself; at most 4 per batch
        b = GpuBatcher(fn, ThreadPoolExecutor(max_workers=1), 4, 0.0, cost_fn=lambda x: x, max_batch_cost=max_batch_cost)
        results = await asyncio.wait_for(asyncio.gather(*[b.submit(x) for x in costs]), HANG_S)
        assert results == [x * 10 for x in costs]
        return fn.batches

    return asyncio.run(main())


def test_a_cost_bound_splits_batches_and_keeps_fifo_order():
    # 4+4 fits a cost of 10, +4 does not: held for the next batch, ahead of everything queued later; 12 alone
    assert _batches_by_cost((4, 4, 4, 1, 1, 12, 3), 10) == [[4, 4], [4, 1, 1], [12], [3]]


@pytest.mark.parametrize("costs, expected", [
    ((4, 6), [[4, 6]]),  # exactly the bound: one batch
    ((4, 7), [[4], [7]]),  # the bound + 1: two
    ((3, 3, 4, 1), [[3, 3, 4], [1]]),  # the bound reached by three, the fourth waits
], ids=["at-bound", "bound+1", "three-at-bound"])
def test_a_batch_may_cost_exactly_the_bound(costs, expected):
    """`max_batch_cost` is the most a batch may cost (the DiT: `max_batch_pixels`), not one more than it."""
    assert _batches_by_cost(costs, 10) == expected
