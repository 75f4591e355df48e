"""The server-sent events of a streamed chat completion, as OpenAI sends them.

Two shapes per choice, and neither ever carries uncorrected text as if corrected: a message sent whole (an answer
that passes through as the upstream sent it, or a structured correction checked before a byte is sent) and a
correction streamed as it is generated. The final chunk of either carries the ``aligner`` field; a streamed
correction's leaves the original out. With ``n`` > 1 the choices stream one after another, each under its index.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from aligner_core import Correction
from aligner_core.errors import AlignerError, CorrectionTimeoutError
from aligner_core.streaming import AsyncCorrectionStream

from . import openai_schema as oa
from .errors import aligner_status, failure_message

logger = logging.getLogger("aligner_serve")


@dataclass(frozen=True)
class StreamHead:
    """What every chunk of one stream repeats (id, model, created), and what ends it (the usage chunk when the
    client asked for it, then ``[DONE]``)."""

    id: str
    model: str
    created: int
    include_usage: bool = False

    def event(
        self,
        delta: dict[str, Any],
        finish_reason: str | None = None,
        *,
        index: int = 0,
        logprobs: Any = None,
        **extra: Any,
    ) -> bytes:
        return oa.sse(
            oa.chunk(
                self.id,
                self.model,
                self.created,
                delta,
                finish_reason,
                index=index,
                logprobs=logprobs,
                **extra,
            )
        )

    def end(self, usage: Mapping[str, Any] | None, **extra: Any) -> Iterator[bytes]:
        if self.include_usage:
            yield oa.sse(oa.usage_chunk(self.id, self.model, self.created, usage, **extra))
        yield oa.SSE_DONE


async def whole_message(
    head: StreamHead,
    index: int,
    delta: dict[str, Any],
    finish_reason: str,
    details: dict[str, Any],
    logprobs: Any = None,
) -> AsyncIterator[bytes]:
    """A message as one delta (with the upstream's log probabilities where its text is what is sent), then its
    final chunk with the ``aligner`` field."""
    yield head.event(delta, index=index, logprobs=logprobs)
    yield head.event({}, finish_reason, index=index, aligner=details)


class CorrectionDeltas:
    """A streamed correction read under one deadline for the whole of it (``CorrectionTimeoutError`` past it)."""

    def __init__(self, stream: AsyncCorrectionStream, timeout: float | None) -> None:
        self.stream = stream
        self.timeout = timeout
        self.deadline = None if timeout is None else time.monotonic() + timeout

    async def next(self) -> str | None:
        """The next delta, or None at the end."""
        remaining = None if self.deadline is None else max(0.001, self.deadline - time.monotonic())
        try:
            return await asyncio.wait_for(self.stream.__anext__(), remaining)
        except StopAsyncIteration:
            return None
        except asyncio.TimeoutError:
            self.stream.close()
            raise CorrectionTimeoutError(
                f"the correction took longer than timeout={self.timeout:g}s"
            ) from None

    async def first(self) -> str | None:
        """The first delta, awaited before the response starts, so a failure here keeps its HTTP status."""
        try:
            return await self.next()
        except BaseException:
            self.stream.close()
            raise


async def correction_events(
    head: StreamHead,
    index: int,
    deltas: CorrectionDeltas,
    first: str | None,
    finished: Callable[[Correction], tuple[str, dict[str, Any]]],
) -> AsyncIterator[bytes]:
    """The events of a correction streamed as it is generated, starting with ``first``; ``finished`` records the
    finished correction and gives the final chunk's finish reason and ``aligner`` field. Failures propagate to
    ``compose``."""
    delta: str | None = first
    try:
        yield head.event({"role": "assistant", "content": ""}, index=index)
        while delta is not None:
            yield head.event({"content": delta}, index=index)
            delta = await deltas.next()
    finally:
        deltas.stream.close()
    correction = deltas.stream.correction
    if correction is None:  # pragma: no cover - the stream always sets it when it ends cleanly
        raise RuntimeError("the correction stream ended without its correction")
    finish_reason, details = finished(correction)
    yield head.event({}, finish_reason, index=index, aligner=details)


async def compose(
    parts: AsyncIterator[AsyncIterator[bytes]], end: Callable[[], Iterator[bytes]]
) -> AsyncIterator[bytes]:
    """The choices' events one after another, then ``end()`` (usage chunk, ``[DONE]``). A failure after the response
    started ends the stream with an ``error`` event instead of ``[DONE]``."""
    try:
        async for part in parts:
            async for event in part:
                yield event
    except AlignerError as exc:
        _, kind, code = aligner_status(exc)
        logger.warning("a streamed correction failed after it started (%s)", type(exc).__name__)
        yield oa.sse(oa.error_body(failure_message(exc), type=kind, code=code))
        return
    except Exception:
        logger.exception("a streamed correction failed after it started")
        yield oa.sse(oa.error_body("internal error in the correction proxy", type="server_error"))
        return
    for event in end():
        yield event


__all__ = ["CorrectionDeltas", "StreamHead", "compose", "correction_events", "whole_message"]
