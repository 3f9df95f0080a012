"""Gather concurrent requests into batches: a client sending one text at a time still gets the
throughput of batched inference.

One worker scores one batch at a time in a thread of its own (torch uses the cores inside a
batch). While it runs, requests queue; the next batch takes what has queued, up to
`max_batch_size` instances, waiting at most `max_wait_s` for more when the queue runs dry. A
request is never split: its instances are scored together, by one model version.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass
class _Request:
    instances: Sequence[Any]
    done: asyncio.Future


class Batcher:
    """`score(instances)` returns (one result per instance, what scored them: the model
    version); it runs in the batch thread, once per batch."""

    def __init__(self, score: Callable[[list], tuple[Sequence, Any]], *, max_batch_size: int,
                 max_wait_s: float, on_batch: Callable[[int], None] | None = None):
        self.score, self.max_batch_size, self.max_wait_s = score, max_batch_size, max_wait_s
        self.on_batch = on_batch or (lambda size: None)
        self._waiting: collections.deque[_Request] = collections.deque()
        self._arrived: asyncio.Event | None = None
        self._worker: asyncio.Task | None = None
        self._thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="cockatoo-batch")

    async def submit(self, instances: Sequence[Any]) -> tuple[list, Any]:
        """The results of these instances, in order, and what scored them."""
        loop = asyncio.get_running_loop()
        if self._worker is None or self._worker.done():
            self._arrived = asyncio.Event()
            self._worker = loop.create_task(self._run(), name="cockatoo-batcher")
        request = _Request(instances, loop.create_future())
        self._waiting.append(request)
        self._arrived.set()
        return await request.done

    async def _wait_for_requests(self, timeout: float | None) -> bool:
        """Whether any request waits, after at most `timeout` seconds (None: until one does)."""
        if not self._waiting and (timeout is None or timeout > 0):
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), timeout)
            except TimeoutError:
                pass
        return bool(self._waiting)

    async def _gather(self) -> list[_Request]:
        loop = asyncio.get_running_loop()
        await self._wait_for_requests(None)
        batch = [self._waiting.popleft()]
        size = len(batch[0].instances)
        deadline = loop.time() + self.max_wait_s
        while size < self.max_batch_size and await self._wait_for_requests(deadline - loop.time()):
            if size + len(self._waiting[0].instances) > self.max_batch_size:
                break  # it starts the next batch
            batch.append(self._waiting.popleft())
            size += len(batch[-1].instances)
        return batch

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._gather()
            batch = [r for r in batch if not r.done.done()]  # a client that went away
            if not batch:
                continue
            instances = [x for r in batch for x in r.instances]
            self.on_batch(len(instances))
            try:
                results, scored_by = await loop.run_in_executor(self._thread, self.score, instances)
            except Exception as exc:  # noqa: BLE001 - each waiting request gets the error
                for request in batch:
                    if not request.done.done():
                        request.done.set_exception(exc)
                continue
            start = 0
            for request in batch:
                end = start + len(request.instances)
                if not request.done.done():
                    request.done.set_result((list(results[start:end]), scored_by))
                start = end

    def close(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
        self._thread.shutdown(wait=False, cancel_futures=True)
