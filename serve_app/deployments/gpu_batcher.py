"""Batching for a stage whose batches run one at a time on one GPU thread.

Ours, not Ray Serve's `@serve.batch`, because that one forms the next batch while the current one still
runs, so under load a long DiT batch is followed by batches of one (benchmarks/README.md, "DiT batching").
Here the next batch is formed when the GPU thread is free: after the first request, wait up to
`wait_timeout_s` for more, then take everything queued, up to `max_batch_size`. `wait_fn(item)` says
whether a batch that starts with `item` waits at all (the DiT: only when other images are on their way,
so a lone request starts at once).

A batch whose `fn` raises is run again item by item, so that only the item that fails gets the error and
its batch-mates their results (a request that fails inside a batch never fails the others).

`cost_fn` / `max_batch_cost` bound a batch by work rather than count (the DiT: pixels per batch), since
batching only pays while one item leaves the GPU idle. The first item of a batch always runs, whatever
its cost.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import Executor
from typing import Any, Callable


class GpuBatcher:
    def __init__(self, fn: Callable[[list], list], executor: Executor, max_batch_size: int, wait_timeout_s: float,
                 cost_fn: Callable[[Any], float] | None = None, max_batch_cost: float | None = None,
                 wait_fn: Callable[[Any], bool] | None = None):
        self.fn = fn  # list of items -> list of results, same order; runs in `executor`
        self.executor = executor
        self.max_batch_size = max_batch_size
        self.wait_timeout_s = wait_timeout_s
        self.cost_fn = cost_fn
        self.max_batch_cost = max_batch_cost
        self.wait_fn = wait_fn  # item -> whether a batch starting with it waits for more (None: always)
        self._queue: asyncio.Queue | None = None
        self._held: tuple | None = None  # an item that did not fit the last batch: first in the next
        self._loop_task: asyncio.Task | None = None
        self.isolated_retries = 0  # batches that failed and were rerun item by item

    def _fits(self, batch: list, item: tuple) -> bool:
        if self.cost_fn is None or self.max_batch_cost is None:
            return True
        return sum(self.cost_fn(x) for x, _ in batch) + self.cost_fn(item[0]) <= self.max_batch_cost

    def pending(self) -> int:
        """Items queued and not yet in a batch (a cancelled one may still count until a batch is formed)."""
        return (self._queue.qsize() if self._queue is not None else 0) + (self._held is not None)

    async def submit(self, item: Any) -> Any:
        if self._queue is None:
            self._queue = asyncio.Queue()
        if self._loop_task is None or self._loop_task.done():
            self._loop_task = asyncio.get_running_loop().create_task(self._run())
        fut = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((item, fut))
        return await fut  # cancelling the caller cancels `fut`: a queued item is then dropped

    async def _next_batch(self) -> list[tuple[Any, asyncio.Future]]:
        assert self._queue is not None
        first, self._held = (self._held, None) if self._held is not None else (await self._queue.get(), None)
        batch = [first]
        wait = self.wait_timeout_s if self.wait_fn is None or self.wait_fn(first[0]) else 0.0
        deadline = asyncio.get_running_loop().time() + wait
        while len(batch) < self.max_batch_size:
            if self._queue.empty():
                remaining = deadline - asyncio.get_running_loop().time()
                if remaining <= 0:
                    break
                try:
                    item = await asyncio.wait_for(self._queue.get(), remaining)
                except asyncio.TimeoutError:
                    break
            else:
                item = self._queue.get_nowait()
            if not self._fits(batch, item):
                self._held = item
                break
            batch.append(item)
        return [(item, fut) for item, fut in batch if not fut.done()]

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._next_batch()
            if not batch:
                continue
            try:
                results = await loop.run_in_executor(self.executor, self.fn, [item for item, _ in batch])
            except Exception as e:
                if len(batch) == 1:
                    _settle(batch[0][1], exception=e)
                    continue
                self.isolated_retries += 1
                for item, fut in batch:  # isolate the failure: each item alone
                    if fut.done():
                        continue
                    try:
                        [result] = await loop.run_in_executor(self.executor, self.fn, [item])
                    except Exception as item_error:
                        _settle(fut, exception=item_error)
                    else:
                        _settle(fut, result=result)
                continue
            for (_, fut), result in zip(batch, results):
                _settle(fut, result=result)


def _settle(fut: asyncio.Future, result: Any = None, exception: BaseException | None = None) -> None:
    if fut.done():
        return
    if exception is not None:
        fut.set_exception(exception)
    else:
        fut.set_result(result)
