"""Streaming corrections: text deltas that add up exactly to ``Correction.text``.

The final text is stripped and cut at stop strings, so a delta is only released once it cannot
change: leading whitespace is dropped, trailing whitespace and any tail that could begin a stop
string are held back, and a tail that decodes to an incomplete character waits for its next token.
:func:`produce` and :func:`aproduce` run one prepared request on the engine into a stream (an answer the
inspector passed streams as itself, in one delta); the engine holds the stream only weakly, so a stream
nobody reads any more stops the generation at its next token.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
import time
import weakref
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .correction import Correction
    from .engines.base import GenerationParams
    from .requests import PreparedRequest


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
        delta, self.emitted = safe[len(self.emitted) :], safe
        return delta

    def finish(self, final_text: str) -> str:
        """The last delta, given the text the engine settled on."""
        if final_text.startswith(self.emitted):
            delta, self.emitted = final_text[len(self.emitted) :], final_text
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


# -- producing a stream from an engine -------------------------------------------------------------


def passed(aligner: Any, stream: Any, prepared: PreparedRequest, verdict: tuple[float, float] | None) -> bool:
    """When the answer passed the inspector it is the correction: stream it as one delta, end, and say so."""
    from .gating import gate_metadata, passed_correction
    from .inspector import passes

    if verdict is None or not passes(*verdict):
        return False
    stream.put(prepared.answer)
    stream.done(
        passed_correction(
            prepared.question,
            prepared.answer,
            verdict[0],
            threshold=verdict[1],
            metadata=gate_metadata(aligner),
        )
    )
    return True


def produce(
    aligner: Any,
    stream: CorrectionStream,
    prepared: PreparedRequest,
    params: GenerationParams,
    verdict: tuple[float, float] | None,
) -> None:
    """Generate ``prepared`` on the aligner's engine into ``stream`` (from the engine's worker)."""
    if passed(aligner, stream, prepared, verdict):
        return
    ref = weakref.ref(stream)
    deltas = TextDeltas(params.stop)
    start = time.perf_counter()

    def finished(future: Any) -> None:
        if (alive := ref()) is not None:
            error = future.exception()
            _finish(
                aligner, alive, deltas, prepared, error, None if error else future.result(), start, verdict
            )

    future = aligner.engine.stream(prepared.request, params, lambda text: _deliver(ref, deltas.update(text)))
    future.add_done_callback(finished)


async def aproduce(
    aligner: Any,
    ref: weakref.ref[AsyncCorrectionStream],
    prepared: PreparedRequest,
    params: GenerationParams,
    gate: tuple[Any, float],
) -> None:
    """Async :func:`produce`: the stream's producer task (the inspector scores in a worker thread first)."""
    from .gating import astream_verdict, scored

    try:
        verdict = await astream_verdict(gate[0], gate[1], scored(prepared))
    except Exception as exc:
        if (stream := ref()) is not None:
            stream.done(None, exc)
        return
    if (stream := ref()) is None or passed(aligner, stream, prepared, verdict):
        return
    del stream
    deltas = TextDeltas(params.stop)
    start = time.perf_counter()
    error: BaseException | None = None
    out: Any = None
    try:
        out = await aligner.engine.astream(
            prepared.request, params, lambda text: _deliver(ref, deltas.update(text))
        )
    except asyncio.CancelledError:
        if (stream := ref()) is not None:
            stream.done(None)
        raise
    except BaseException as exc:
        error = exc
    if (stream := ref()) is not None:
        _finish(aligner, stream, deltas, prepared, error, out, start, verdict)


def _finish(
    aligner: Any,
    stream: Any,
    deltas: TextDeltas,
    prepared: PreparedRequest,
    error: BaseException | None,
    output: Any,
    start: float,
    verdict: tuple[float, float] | None,
) -> None:
    """End a stream: its last delta and its correction (with the inspector's verdict), or its error."""
    if isinstance(error, StreamCancelled):
        stream.done(None)
        return
    if error is not None:
        stream.done(None, error)
        return
    correction = aligner.build(prepared, output, latency=time.perf_counter() - start)
    if verdict is not None:
        from .gating import inspected

        correction = inspected(correction, verdict[0], threshold=verdict[1])
    with contextlib.suppress(StreamCancelled):
        stream.put(deltas.finish(correction.text))
    stream.done(correction)


def _deliver(ref: weakref.ref[Any], delta: str) -> None:
    """Hand a delta to its stream; a stream nobody holds any more stops the generation."""
    stream = ref()
    if stream is None:
        raise StreamCancelled
    stream.put(delta)
