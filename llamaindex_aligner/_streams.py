"""Relay a streamed correction into a LlamaIndex streaming response, settling its metadata when it ends."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

from aligner_core import Correction


class Relay:
    """Passes the Aligner's deltas on; at the end fills ``info`` in place (it is the response's metadata).

    ``done(correction)`` and ``fail(exc, partial)`` build the final metadata (``fail`` raises under
    ``on_error='raise'``). When nothing usable was sent (an empty correction, or a failure before the
    first delta) the original answer is sent instead, so the stream always carries an answer.
    """

    def __init__(
        self,
        stream: Any,
        answer: str,
        info: dict[str, Any],
        *,
        done: Callable[[Correction], dict[str, Any]],
        fail: Callable[[Exception, bool], dict[str, Any]],
    ) -> None:
        self.stream, self.answer, self.info = stream, answer, info
        self._done, self._fail = done, fail
        self.emitted = self.finished = False

    def deltas(self) -> Iterator[str]:
        try:
            for delta in self.stream:
                self.emitted = self.emitted or bool(delta)
                yield delta
            tail = self._end()
        except Exception as exc:
            tail = self._failed(exc)
        finally:
            if not self.finished:
                self.stream.close()  # the consumer stopped reading: stop generating
        yield from tail

    async def adeltas(self) -> AsyncIterator[str]:
        try:
            async for delta in self.stream:
                self.emitted = self.emitted or bool(delta)
                yield delta
            tail = self._end()
        except Exception as exc:
            tail = self._failed(exc)
        finally:
            if not self.finished:
                self.stream.close()
        for text in tail:
            yield text

    def _end(self) -> list[str]:
        self.finished = True
        correction = self.stream.correction
        if correction is None:
            raise RuntimeError("the Aligner's stream ended without a correction")
        settle(self.info, self._done(correction))
        return [self.answer] if self.info.get("empty_correction") and not self.emitted else []

    def _failed(self, exc: Exception) -> list[str]:
        self.finished = True
        settle(self.info, self._fail(exc, self.emitted))
        return [] if self.emitted else [self.answer]


def settle(info: dict[str, Any], final: dict[str, Any]) -> None:
    info.clear()
    info.update(final)


async def one(text: str) -> AsyncIterator[str]:
    yield text
