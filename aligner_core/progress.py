"""Live progress of a batch: completed rows and generated tokens, reported while decoding runs.

A batch of corrections finishes all at once on the local engine (its rows leave the decoding loop
together), so a bar fed only by finished results sits at 0 and then jumps. Engines instead feed a
:class:`Progress` with token counts as decoding steps happen and with rows as they finish; it
hands :class:`ProgressUpdate` snapshots to callbacks (a tqdm bar, a UI, a test) at most every
``min_interval_s``, plus every time a row completes and once at the end.

Engines call ``update(tokens=..., rows=...)`` with deltas (negative ones retract work that an
out-of-memory retry throws away); an engine that cannot see tokens reports each finished row with
its ``completion_tokens``.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

__all__ = ["Progress", "ProgressCallback", "ProgressUpdate", "bar_callback", "token_postfix", "tracking"]


@dataclass(frozen=True)
class ProgressUpdate:
    """One snapshot of a run: what is done so far, not a delta."""

    #: Completed rows, failed and skipped ones included.
    rows: int
    #: Rows the run will complete (None when unknown, e.g. a file read from a pipe).
    total: int | None
    #: Tokens generated so far, summed over rows.
    tokens: int
    #: Seconds since the run started.
    elapsed_s: float
    #: True on the last update of the run (sent by ``Progress.close``).
    final: bool = False

    @property
    def tokens_per_s(self) -> float:
        """Generated tokens per second since the start."""
        return self.tokens / self.elapsed_s if self.elapsed_s > 0 else 0.0


ProgressCallback = Callable[[ProgressUpdate], None]


class Progress:
    """Thread-safe counter of rows and tokens that reports to callbacks, throttled.

    Token-only changes are reported at most every ``min_interval_s`` (0 reports every engine
    step: useful in tests, costly for a slow terminal); a change in completed rows and ``close``
    always report. Callbacks run on the engine's thread, under a lock, so keep them short.
    """

    def __init__(
        self,
        *callbacks: ProgressCallback | None,
        total: int | None = None,
        initial_rows: int = 0,
        min_interval_s: float = 0.1,
    ) -> None:
        if min_interval_s < 0:
            raise ValueError(f"min_interval_s must be >= 0, got {min_interval_s!r}")
        self.callbacks = [c for c in callbacks if c is not None]
        self.total = total
        self.rows = initial_rows
        self.tokens = 0
        self.min_interval_s = min_interval_s
        self.start = time.perf_counter()
        self._last = float("-inf")
        self._lock = threading.Lock()
        self._closed = False

    def update(self, *, tokens: int = 0, rows: int = 0) -> None:
        """Add ``tokens`` generated and ``rows`` completed (deltas; negative retracts)."""
        if not tokens and not rows:
            return
        with self._lock:
            self.tokens += tokens
            self.rows += rows
            now = time.perf_counter()
            if self.callbacks and (rows or now - self._last >= self.min_interval_s):
                self._emit(now, final=False)

    def close(self) -> None:
        """Send the final snapshot (once); later calls do nothing."""
        with self._lock:
            if not self._closed:
                self._closed = True
                self._emit(time.perf_counter(), final=True)

    @contextlib.contextmanager
    def watched_by(self, callback: ProgressCallback | None) -> Iterator[Progress]:
        """Add ``callback`` for the length of a block: a bar that one call shows over a longer run."""
        if callback is None:
            yield self
            return
        with self._lock:
            self.callbacks.append(callback)
        try:
            yield self
        finally:
            with self._lock:
                self.callbacks.remove(callback)

    def snapshot(self, *, final: bool = False) -> ProgressUpdate:
        """The counts now."""
        return ProgressUpdate(self.rows, self.total, self.tokens, time.perf_counter() - self.start, final)

    def _emit(self, now: float, *, final: bool) -> None:
        self._last = now
        update = ProgressUpdate(self.rows, self.total, self.tokens, now - self.start, final)
        for callback in self.callbacks:
            callback(update)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def bar_callback(bar: Any) -> ProgressCallback:
    """A callback that moves a tqdm ``bar`` to the completed rows and shows tokens and tok/s beside it."""

    def show(update: ProgressUpdate) -> None:
        bar.set_postfix_str(f"{update.tokens} tok, {update.tokens_per_s:.1f} tok/s", refresh=False)
        if update.rows != bar.n:
            bar.update(update.rows - bar.n)  # tqdm throttles its own redraws
        else:
            bar.refresh()  # only tokens moved: redraw the postfix (updates arrive throttled)

    return show


@contextlib.contextmanager
def tracking(
    progress: ProgressCallback | Progress | None,
    bar: Any = None,
    *,
    total: int | None = None,
    initial_rows: int = 0,
) -> Iterator[Progress]:
    """The tracker of one run, moving ``bar`` (a tqdm bar; a disabled one is left alone).

    A ``Progress`` of the caller's is counted into (``initial_rows`` added, ``total`` set if it had
    none) and left open for its owner; a callback gets a new tracker, closed when the run ends.
    """
    shared = isinstance(progress, Progress)
    if isinstance(progress, Progress):
        if progress.total is None:
            progress.total = total
        if initial_rows:
            progress.update(rows=initial_rows)
        tracker = progress
    else:
        tracker = Progress(progress, total=total, initial_rows=initial_rows)
    show = bar is not None and not getattr(bar, "disable", False)
    with tracker.watched_by(bar_callback(bar) if show else None):
        try:
            yield tracker
        finally:
            if not shared:
                tracker.close()


def token_postfix(bar: Any) -> ProgressCallback:
    """A callback that shows generated tokens and tok/s beside a bar that counts something else (prompts,
    judged records), so a long correction step inside one of its units still shows movement."""

    def show(update: ProgressUpdate) -> None:
        if not getattr(bar, "disable", False):
            bar.set_postfix_str(f"{update.tokens} tok, {update.tokens_per_s:.1f} tok/s")

    return show


@contextlib.contextmanager
def batch_tracker(
    total: int, show: bool, progress: ProgressCallback | Progress | None
) -> Iterator[Progress | None]:
    """The tracker of one ``correct_batch`` (the caller's shared one, or a new one), with a bar when shown."""
    if not show and progress is None:
        yield None  # nobody watches: the engine skips counting
        return
    from tqdm.auto import tqdm

    shared = progress if isinstance(progress, Progress) else None
    with (
        tqdm(
            total=shared.total if shared else total,
            initial=shared.rows if shared else 0,
            desc="Correcting",
            unit="pair",
            disable=not show,
        ) as bar,
        tracking(progress, bar, total=None if shared else total) as tracker,  # a shared total is its owner's
    ):
        yield tracker


def generate_tracked(
    engine: Any, requests: list[Any], params: Any, *, fail_fast: bool, progress: Progress | None
) -> list[Any]:
    """``engine.generate`` with live progress; an engine written before ``progress=`` reports rows as they finish."""
    if progress is None:
        return engine.generate(requests, params, fail_fast=fail_fast)
    if _takes_progress(engine):
        return engine.generate(requests, params, fail_fast=fail_fast, progress=progress)
    return engine.generate(
        requests,
        params,
        fail_fast=fail_fast,
        on_result=lambda _i, out: progress.update(
            tokens=0 if isinstance(out, BaseException) else out.completion_tokens, rows=1
        ),
    )


def _takes_progress(engine: Any) -> bool:
    """Whether ``engine.generate`` accepts ``progress=`` (engines written before it do not)."""
    import inspect

    try:
        parameters = inspect.signature(engine.generate).parameters
    except (TypeError, ValueError):  # pragma: no cover - a builtin or C callable
        return False
    return "progress" in parameters or any(
        p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()
    )
