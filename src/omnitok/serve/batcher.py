"""One worker thread owns the model; requests wait in one FIFO queue and compatible ones are decoded together.

torch modules are not re-entrant and a CPU has few cores, so generation never runs concurrently: the asyncio
side only enqueues jobs and awaits them. The worker takes the oldest job, then up to ``max_batch - 1`` queued
jobs with the same batch key (same output kind and decoding options; never streaming ones) and runs them in one
batched call. Serving the head of the queue first keeps concurrent clients fair; pulling matching jobs forward
only ever shortens waits. Streaming jobs run alone: their generator is consumed on the worker and each event is
handed to the event loop with ``call_soon_threadsafe``. A cancelled job (the client went away) is skipped if
still queued, and a stream whose consumer stopped listening is closed at its next event, so the worker never
wedges on a dead client. The queue is bounded: when full, :class:`QueueFull` tells the caller to answer 503.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass, field
from typing import Any

from omnitok.errors import OmnitokError

log = logging.getLogger("omnitok.serve")
_END = object()


class QueueFull(Exception):
    """The bounded request queue has no room; the client should retry later."""


@dataclass(eq=False)
class _Job:
    key: Hashable | None  # None: never batched with another job
    payload: Any
    loop: asyncio.AbstractEventLoop
    batch_fn: Callable[[list[Any]], list[Any]] | None = None
    stream_fn: Callable[[Any], Iterator[Any]] | None = None
    future: asyncio.Future[Any] | None = None
    events: asyncio.Queue[Any] | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)
    enqueued: float = field(default_factory=time.perf_counter)


class StreamHandle:
    """The asyncio end of a streaming job: iterate it for events; ``cancel()`` when the client disconnects."""

    def __init__(self, job: _Job) -> None:
        self._job = job

    def __aiter__(self) -> StreamHandle:
        return self

    async def __anext__(self) -> Any:
        assert self._job.events is not None
        item = await self._job.events.get()
        if item is _END:
            raise StopAsyncIteration
        if isinstance(item, BaseException):
            raise item
        return item

    def cancel(self) -> None:
        self._job.cancelled.set()


class Batcher:
    """The FIFO queue and the worker thread that drains it."""

    def __init__(self, max_batch: int = 8, max_queue: int = 256) -> None:
        if max_batch < 1 or max_queue < 1:
            raise OmnitokError(f"max_batch and max_queue must be >= 1, got {max_batch} and {max_queue}")
        self.max_batch = max_batch
        self.max_queue = max_queue
        self._queue: collections.deque[_Job] = collections.deque()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._stats_lock = threading.Lock()
        self.batch_sizes: collections.Counter[int] = collections.Counter()
        self.streams = 0
        self.failures = 0
        self.busy_s = 0.0

    # --- lifecycle ------------------------------------------------------------------------------------
    def start(self) -> None:
        with self._cond:
            if self._thread is not None and self._thread.is_alive():
                return
            self._stopping = False
            self._thread = threading.Thread(target=self._run, name="omnitok-worker", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        with self._cond:
            self._stopping = True
            for job in self._queue:
                job.cancelled.set()
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    # --- submitting (event loop side) -----------------------------------------------------------------
    def _put(self, job: _Job) -> None:
        self.start()
        with self._cond:
            if len(self._queue) >= self.max_queue:
                raise QueueFull(f"the server queue is full ({self.max_queue} requests waiting); retry later")
            self._queue.append(job)
            self._cond.notify()

    async def submit(self, key: Hashable | None, payload: Any, batch_fn: Callable[[list[Any]], list[Any]]) -> Any:
        """Queue one request; ``batch_fn(payloads)`` runs on the worker and returns one result per payload."""
        loop = asyncio.get_running_loop()
        job = _Job(key, payload, loop, batch_fn=batch_fn, future=loop.create_future())
        self._put(job)
        try:
            return await job.future  # type: ignore[misc]
        except asyncio.CancelledError:
            job.cancelled.set()
            raise

    def stream(self, payload: Any, stream_fn: Callable[[Any], Iterator[Any]]) -> StreamHandle:
        """Queue a streaming request (must be called on the event loop); iterate the handle for its events."""
        loop = asyncio.get_running_loop()
        job = _Job(None, payload, loop, stream_fn=stream_fn, events=asyncio.Queue())
        self._put(job)
        return StreamHandle(job)

    def stats(self) -> dict[str, Any]:
        with self._stats_lock:
            sizes = dict(sorted(self.batch_sizes.items()))
            n = sum(sizes.values())
            return {
                "max_batch": self.max_batch,
                "queued": len(self._queue),
                "batches": n,
                "batched_requests": sum(k * v for k, v in sizes.items()),
                "batch_sizes": {str(k): v for k, v in sizes.items()},
                "largest_batch": max(sizes, default=0),
                "streams": self.streams,
                "failures": self.failures,
                "busy_seconds": round(self.busy_s, 3),
            }

    # --- the worker -----------------------------------------------------------------------------------
    def _take(self) -> list[_Job] | None:
        with self._cond:
            while True:
                while self._queue and self._queue[0].cancelled.is_set():
                    self._queue.popleft()
                if self._queue:
                    break
                if self._stopping:
                    return None
                self._cond.wait()
            head = self._queue.popleft()
            batch = [head]
            if head.key is not None:
                for job in list(self._queue):
                    if len(batch) >= self.max_batch:
                        break
                    if job.key == head.key and job.stream_fn is None and not job.cancelled.is_set():
                        batch.append(job)
                        self._queue.remove(job)
            return batch

    def _run(self) -> None:
        while True:
            batch = self._take()
            if batch is None:
                return
            t0 = time.perf_counter()
            try:
                if batch[0].stream_fn is not None:
                    self._run_stream(batch[0])
                else:
                    self._run_batch(batch)
            except BaseException:  # never let the worker die: log and go on with the next job
                log.exception("worker: unexpected failure")
            with self._stats_lock:
                self.busy_s += time.perf_counter() - t0

    def _run_batch(self, batch: list[_Job]) -> None:
        fn = batch[0].batch_fn
        assert fn is not None
        try:
            results = fn([j.payload for j in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"batch function returned {len(results)} results for {len(batch)} requests")
        except OmnitokError as e:
            if len(batch) > 1:  # one bad request must not fail its neighbours: run them one by one
                for job in batch:
                    self._run_batch([job])
                return
            self._finish(batch[0], error=e)
            return
        except Exception as e:
            log.exception("worker: batch of %d failed", len(batch))
            with self._stats_lock:
                self.failures += len(batch)
            for job in batch:
                self._finish(job, error=e)
            return
        with self._stats_lock:
            self.batch_sizes[len(batch)] += 1
        for job, result in zip(batch, results, strict=True):
            self._finish(job, result=result)

    def _finish(self, job: _Job, result: Any = None, error: BaseException | None = None) -> None:
        def settle() -> None:
            fut = job.future
            if fut is None or fut.done():
                return
            if error is not None:
                fut.set_exception(error)
            else:
                fut.set_result(result)

        _call_soon(job.loop, settle)

    def _run_stream(self, job: _Job) -> None:
        assert job.stream_fn is not None and job.events is not None
        events = job.events
        with self._stats_lock:
            self.streams += 1
        gen = job.stream_fn(job.payload)
        try:
            for event in gen:
                if job.cancelled.is_set():
                    log.info("stream cancelled by the client; stopping generation")
                    break
                if not _call_soon(job.loop, events.put_nowait, event):
                    break
            _call_soon(job.loop, events.put_nowait, _END)
        except Exception as e:
            if not isinstance(e, OmnitokError):
                log.exception("worker: stream failed")
                with self._stats_lock:
                    self.failures += 1
            _call_soon(job.loop, events.put_nowait, e)
        finally:
            close = getattr(gen, "close", None)
            if close is not None:
                close()


def _call_soon(loop: asyncio.AbstractEventLoop, fn: Callable[..., Any], *args: Any) -> bool:
    """Hand ``fn`` to the event loop; False when the loop is gone (server shutting down)."""
    try:
        loop.call_soon_threadsafe(fn, *args)
        return True
    except RuntimeError:
        return False
