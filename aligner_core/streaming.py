"""Streaming corrections: text deltas that add up exactly to ``Correction.text``.

The final text is stripped and cut at stop strings, so a delta is only released once it cannot
change: leading whitespace is dropped, trailing whitespace and any tail that could begin a stop
string are held back, and a tail that decodes to an incomplete character waits for its next token.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .correction import Correction

_END = object()


class StreamCancelled(Exception):
    """Raised inside generation when the consumer stopped reading; ends the run early."""


class TextDeltas:
    """Turns the growing generated text into safe-to-emit deltas.

    Engines report the whole raw text so far (decoded tokens, or server-sent pieces joined); a
    delta is released only once later text cannot change it.
    """

    def __init__(self, stop: Sequence[str] = ()):
        self.stop = tuple(stop)
        self.emitted = ""
        self.stopped = False

    def update(self, text: str) -> str:
        """The new delta for the raw ``text`` generated so far ("" when nothing is safe yet)."""
        if self.stopped:
            return ""
        return self._advance(self._safe(text))

    def _safe(self, text: str) -> str:
        cut = min((p for p in (text.find(s) for s in self.stop) if p >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            return text[:cut].strip()
        hold = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(text)), 0, -1):
                if text.endswith(s[:n]):
                    hold = max(hold, n)
                    break
        return text[: len(text) - hold].strip()

    def _advance(self, safe: str) -> str:
        if not safe.startswith(self.emitted):
            return ""  # a tokenizer clean-up rewrote earlier text; wait for the final text
        delta, self.emitted = safe[len(self.emitted):], safe
        return delta

    def finish(self, final_text: str) -> str:
        """The last delta, given the text the engine settled on."""
        if final_text.startswith(self.emitted):
            delta, self.emitted = final_text[len(self.emitted):], final_text
            return delta
        raise RuntimeError(  # pragma: no cover - would mean the decoder is not prefix-stable
            f"streamed text {self.emitted!r} is not a prefix of the final text {final_text!r}"
        )


class CorrectionStream:
    """Iterator of text deltas; ``correction`` holds the final ``Correction`` once exhausted."""

    def __init__(self) -> None:
        self._queue: queue.Queue[Any] = queue.Queue()
        self._cancelled = threading.Event()
        self.correction: Correction | None = None
        self.span: Any = None  # the call's telemetry span, ended with the stream

    # producer side (worker thread)
    def put(self, delta: str) -> None:
        if self._cancelled.is_set():
            raise StreamCancelled
        if delta:
            self._queue.put(delta)

    def done(self, correction: Correction | None, error: BaseException | None = None) -> None:
        self.correction = correction
        _end_span(self, correction, error)
        self._queue.put(error if error is not None else _END)

    # consumer side
    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        item = self._queue.get()
        if item is _END:
            self._queue.put(_END)
            raise StopIteration
        if isinstance(item, BaseException):
            self._queue.put(_END)
            raise item
        return item

    def close(self) -> None:
        """Stop generating: the worker ends this stream at its next token."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()


class AsyncCorrectionStream:
    """Async iterator of text deltas; ``correction`` holds the final ``Correction`` once exhausted."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self._cancelled = threading.Event()
        self.correction: Correction | None = None
        self._task: asyncio.Task[None] | None = None  # the producer, held so it is not garbage-collected
        self.span: Any = None  # the call's telemetry span, ended with the stream

    def put(self, delta: str) -> None:
        if self._cancelled.is_set():
            raise StreamCancelled
        if delta:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, delta)

    def done(self, correction: Correction | None, error: BaseException | None = None) -> None:
        self.correction = correction
        _end_span(self, correction, error)
        item = error if error is not None else _END
        with contextlib.suppress(RuntimeError):  # the consumer's loop may be gone
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)

    def __aiter__(self) -> AsyncIterator[str]:
        return self

    async def __anext__(self) -> str:
        try:
            item = await self._queue.get()
        except asyncio.CancelledError:
            self.close()
            raise
        if item is _END:
            self._queue.put_nowait(_END)
            raise StopAsyncIteration
        if isinstance(item, BaseException):
            self._queue.put_nowait(_END)
            raise item
        return item

    async def aclose(self) -> None:
        self.close()

    def close(self) -> None:
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()


def _end_span(stream: Any, correction: Correction | None, error: BaseException | None) -> None:
    """End the stream's telemetry span (once) with how it ended: a correction, an error, or cancelled."""
    span, stream.span = stream.span, None
    if span is not None:
        span.finish([correction] if correction is not None else [], error)
