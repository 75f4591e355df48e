"""Relay a streamed correction into a LlamaIndex streaming response, settling its metadata when it ends; and what
an AlignedLLM stream sends (the kept prefix of a ReAct step, then only corrected text)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

from aligner_core import Correction

from ._aligner_llm import correction_of

if TYPE_CHECKING:
    from ._plan import Plan


class Relay:
    """Passes the deltas of a correction's stream responses on; at the end fills ``info`` in place (it is the
    response's metadata).

    ``done(correction)`` and ``fail(exc, partial)`` build the final details (``fail`` raises under
    ``on_error='raise'``). When nothing usable was sent (an empty correction, or a failure before the first delta)
    the original answer is sent instead, so the stream always carries an answer. A consumer that stops reading
    closes the responses, which stops the generation.
    """

    def __init__(
        self,
        responses: Any,
        answer: str,
        info: dict[str, Any],
        *,
        done: Callable[[Correction], dict[str, Any]],
        fail: Callable[[Exception, bool], dict[str, Any]],
    ) -> None:
        self.responses, self.answer, self.info = responses, answer, info
        self._done, self._fail = done, fail
        self.emitted = self.finished = False
        self.last: Any = None

    def deltas(self) -> Iterator[str]:
        try:
            for response in self.responses:
                self.last = response
                if response.delta:
                    self.emitted = True
                    yield response.delta
            tail = self._end()
        except Exception as exc:
            tail = self._failed(exc)
        finally:
            if not self.finished:
                self.responses.close()
        yield from tail

    async def adeltas(self) -> AsyncIterator[str]:
        try:
            async for response in self.responses:
                self.last = response
                if response.delta:
                    self.emitted = True
                    yield response.delta
            tail = self._end()
        except Exception as exc:
            tail = self._failed(exc)
        finally:
            if not self.finished:
                await self.responses.aclose()
        for text in tail:
            yield text

    def _end(self) -> list[str]:
        self.finished = True
        settle(self.info, self._done(correction_of(self.last)))
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


def sent(plan: Plan, deltas: Iterable[str]) -> Iterable[str]:
    """What a stream sends: a passed-through answer as it is; a corrected one as the kept prefix, then the
    correction (never the upstream's answer)."""
    if not plan.decision.corrects:
        yield from (d for d in [plan.decision.text] if d)
        return
    if plan.prefix:
        yield plan.prefix
    yield from (d for d in deltas if d)


async def asent(plan: Plan, relay: Relay | None, whole: str) -> AsyncIterator[str]:
    if not plan.decision.corrects:
        if plan.decision.text:
            yield plan.decision.text
        return
    if plan.prefix:
        yield plan.prefix
    if relay is None:
        if whole:
            yield whole
        return
    async for delta in relay.adeltas():
        if delta:
            yield delta
