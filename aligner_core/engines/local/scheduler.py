"""Micro-batching: concurrent callers share batches run by one worker thread that owns the model.

Callers (threads via ``submit(...).result()``, coroutines via ``asyncio.wrap_future``, which resolves
on the caller's loop with ``call_soon_threadsafe``) put validated requests on a bounded queue. The
worker takes the first waiting request, keeps gathering while more arrive within ``max_wait_ms`` of
each other (for at most ``MAX_GATHER_S``, or until the token budget or the row limit is full), groups them by
decoding options and runs each group as one planned batch. A failing
request fails only its own future; a cancelled one is skipped if it has not started.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from typing import Any

from ...errors import EngineClosedError
from ..base import GenerationOutput, GenerationParams, GenerationRequest

logger = logging.getLogger("aligner_core")


class SchedulerClosedError(EngineClosedError):
    """The Aligner was closed; no new requests are accepted and pending ones are failed."""


@dataclass
class Ticket:
    """One queued unit of work: generation requests (or an exclusive callable) and their futures."""

    params: GenerationParams | None
    request: GenerationRequest | None = None
    future: Future = field(default_factory=Future)
    exclusive: Callable[[], Any] | None = None


_STOP = object()

#: Longest a burst is gathered while its requests keep arriving. 256 coroutines that each render and tokenize
#: their prompt before queuing take ~80 ms to arrive; a shorter cap (it was 50 ms) cut such a burst in two
#: batches run one after the other, 0.5x of one ``correct_batch`` on an H100 (docs/performance.md).
MAX_GATHER_S = 0.25


def gather_window(max_wait: float) -> float:
    """Seconds a burst may be gathered in all: ``MAX_GATHER_S``, or ten times ``max_wait`` when that is longer."""
    return max(10 * max_wait, MAX_GATHER_S)


class MicroBatcher:
    """A background worker that serves concurrent requests in shared batches."""

    def __init__(
        self,
        run_batch: Callable[..., list[GenerationOutput | BaseException]],
        *,
        max_wait_ms: float = 5.0,
        max_queue: int = 4096,
        max_batch_tokens: int = 16384,
        max_batch_size: int | None = None,
        lock: threading.Lock | None = None,
    ) -> None:
        if max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must be >= 0, got {max_wait_ms}")
        if max_queue < 1:
            raise ValueError(f"max_queue must be a positive integer, got {max_queue}")
        self.run_batch = run_batch  # the engine's unlocked batch runner: (requests, params, fail_fast=...)
        self.max_wait = max_wait_ms / 1000.0
        self.max_batch_tokens = max_batch_tokens
        self.max_batch_size = max_batch_size
        self.queue: queue.Queue[Any] = queue.Queue(maxsize=max_queue)
        self.lock = lock or threading.Lock()
        self._closed = False
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()
        self.batches_run = 0

    # -- callers -----------------------------------------------------------------------------

    def submit(self, job: Ticket, *, block: bool = True, timeout: float | None = None) -> Future:
        """Queue a job; blocks (backpressure) while the queue is full unless ``block=False``."""
        if self._closed:
            raise SchedulerClosedError("this Aligner is closed: create a new one to correct more answers")
        self._ensure_worker()
        self.queue.put(job, block=block, timeout=timeout)
        return job.future

    def _ensure_worker(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        with self._start_lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="aligner-worker", daemon=True)
                self._thread.start()

    def close(self, timeout: float | None = 10.0) -> None:
        """Stop accepting work: queued requests fail with ``SchedulerClosedError`` at once, the batch
        already running finishes, and the worker stops (waiting for it at most ``timeout`` seconds)."""
        if self._closed:
            return
        self._closed = True
        self._drain_closed()
        if self._thread is not None and self._thread.is_alive():
            self.queue.put(_STOP)
            self._thread.join(timeout)

    @property
    def closed(self) -> bool:
        return self._closed

    # -- the worker --------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            first = self.queue.get()
            if first is _STOP:
                self._drain_closed()
                return
            jobs, stop = self._gather(first)
            try:
                self._serve(jobs)
            except BaseException as exc:  # never let the worker die with futures pending
                logger.exception("aligner worker failed a batch")
                for job in jobs:
                    if not job.future.done():
                        job.future.set_exception(exc)
            if stop:
                self._drain_closed()
                return

    def _gather(self, first: Ticket) -> tuple[list[Ticket], bool]:
        """Collect the burst that arrives with the first job, up to the token budget.

        Waits until no job has arrived for ``max_wait`` (callers still rendering their prompts keep
        the batch open), but never longer than ``MAX_GATHER_S`` (or ten times ``max_wait``) in all.
        """
        jobs = [first]
        if first.exclusive is not None:
            return jobs, False
        budget = _cost(first)
        rows = self.max_batch_size or float("inf")
        now = time.monotonic()
        cap, deadline = now + gather_window(self.max_wait), now + self.max_wait
        while budget < self.max_batch_tokens and len(jobs) < rows:
            remaining = min(deadline, cap) - time.monotonic()
            try:
                job = self.queue.get(timeout=remaining) if remaining > 0 else self.queue.get_nowait()
            except queue.Empty:
                break
            if job is _STOP:
                return jobs, True
            jobs.append(job)
            budget += _cost(job)
            deadline = time.monotonic() + self.max_wait
        return jobs, False

    def _serve(self, jobs: list[Ticket]) -> None:
        groups: dict[GenerationParams, list[Ticket]] = {}
        for job in jobs:
            if job.exclusive is not None:
                if job.future.set_running_or_notify_cancel():
                    with self.lock:
                        _settle(job.future, job.exclusive)
                continue
            if job.future.set_running_or_notify_cancel():  # False: cancelled while queued
                # Each request carries its own max_new_tokens, so calls that differ only there share a batch.
                key = replace(job.params, max_new_tokens=1)  # type: ignore[arg-type]
                groups.setdefault(key, []).append(job)
        for params, group in groups.items():
            self._run_group(params, group)

    def _run_group(self, params: GenerationParams, group: list[Ticket]) -> None:
        """Run one batch; if it fails as a whole, run its jobs one by one, so a failure stays with its request."""
        try:
            with self.lock:
                outputs = self.run_batch([j.request for j in group], params, fail_fast=False)  # type: ignore[misc]
        except BaseException as exc:
            if len(group) == 1 or not isinstance(exc, Exception):
                for job in group:
                    job.future.set_exception(exc)
                return
            logger.warning(
                "a batch of %d failed as a whole (%s: %s); running its requests alone",
                len(group),
                type(exc).__name__,
                exc,
            )
            for job in group:
                self._run_group(params, [job])
            return
        self.batches_run += 1
        for job, out in zip(group, outputs):
            if isinstance(out, BaseException):
                job.future.set_exception(out)
            else:
                job.future.set_result(out)

    def _drain_closed(self) -> None:
        while True:
            try:
                job = self.queue.get_nowait()
            except queue.Empty:
                return
            if job is not _STOP and job.future.set_running_or_notify_cancel():
                job.future.set_exception(
                    SchedulerClosedError("the Aligner was closed before this request ran")
                )


def _cost(job: Ticket) -> int:
    r = job.request
    return 0 if r is None else len(r.prompt_ids) + r.reserve


def _settle(future: Future, fn: Callable[[], Any]) -> None:
    try:
        future.set_result(fn())
    except BaseException as exc:
        future.set_exception(exc)


__all__ = ["GenerationOutput", "Ticket", "MicroBatcher", "SchedulerClosedError"]
