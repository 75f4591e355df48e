"""``POST /v1/chat/completions``: the upstream's answer, each choice decided by the core and its text corrected,
plain or streamed.

Everything that can fail with a status (the upstream call, the decisions, the first streamed choice's first delta)
happens before a response starts; ``n`` choices take ``n`` places in the queue. What ``finish_reason``, ``usage``
and ``logprobs`` say is ``contract``'s job, what the Aligner sees of the request ``grounding``'s.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from typing import Any

from starlette.responses import JSONResponse, Response, StreamingResponse

from aligner_core import Correction
from aligner_core.decision import Decision

from . import choices as ch
from . import contract, sse
from . import openai_schema as oa
from .bad_request import RequestShapeError
from .contract import Outcome
from .drain import MESSAGE as SHUTTING_DOWN
from .errors import json_error
from .proxy import CorrectionProxy


class ChatCompletions:
    """The endpoint, bound to one proxy."""

    def __init__(self, proxy: CorrectionProxy) -> None:
        self.proxy = proxy

    async def __call__(self, body: Any) -> Response:
        try:
            chat = oa.parse_chat_request(body)
        except RequestShapeError as exc:
            return json_error(400, str(exc), type="invalid_request_error", param=exc.param)
        limit = self.proxy.limits.choices
        if chat.n > limit:
            return json_error(400, f"n={chat.n} is over the correction proxy's limit of {limit} choices per request "
                              "(--max-n): each choice is corrected", type="invalid_request_error", param="n")
        if chat.stream:
            return await self._stream(chat)
        with self.proxy.slot(chat.n):
            data = await self.proxy.call_upstream(chat)
            choices = [c for c in data["choices"] if isinstance(c, dict)]
            decisions = [self.proxy.decide(chat, c, i) for i, c in enumerate(choices)]  # unreadable: 502 first
            results = await asyncio.gather(*(self._apply(chat, c, d) for c, d in zip(choices, decisions)),
                                           return_exceptions=True)
            for result in results:
                if isinstance(result, BaseException):
                    raise result
        done = [r for r in results if isinstance(r, tuple)]
        outcomes = [outcome for _, outcome in done]
        upstream_usage = data.get("usage")
        if upstream_usage is not None or any(o.returned_tokens is not None for o in outcomes):
            data["usage"] = contract.client_usage(upstream_usage, outcomes)
        if done:
            data["aligner"] = contract.request_details(done[0][0], upstream_usage, outcomes)
        return JSONResponse(data)

    async def _apply(self, chat: oa.ChatRequest, choice: dict[str, Any], decision: Decision
                     ) -> tuple[dict[str, Any], Outcome]:
        """Carry out the decision on one choice in place; its ``aligner`` field and what it returned."""
        if not decision.corrects:
            details = {**self.proxy.passthrough(chat, decision),
                       **contract.contract_details(choice, None, asked_logprobs=chat.logprobs)}
            outcome = Outcome()
        else:
            correction = await self.proxy.correct_decided(chat, decision)
            details = self._details(chat, choice, correction, include_original=self.proxy.limits.include_original)
            if contract.kept(correction):  # else the message stays as it came
                message = ch.message_of(choice)
                message["content"] = ch.with_text(message.get("content"), correction.text)
                contract.rewrite_choice(choice, correction)
            outcome = Outcome.of(correction)
        choice["aligner"] = details
        return details, outcome

    @staticmethod
    def _details(chat: oa.ChatRequest, choice: dict[str, Any], correction: Correction, *, include_original: bool
                 ) -> dict[str, Any]:
        details = {**oa.correction_details(correction, include_original=include_original),
                   **contract.contract_details(choice, correction, asked_logprobs=chat.logprobs)}
        if chat.question_role != "user":  # no user message: say what the Aligner took as the question
            details["question_from"] = chat.question_role or "none"
        return details

    # -- streams -------------------------------------------------------------------------------

    async def _stream(self, chat: oa.ChatRequest) -> Response:
        """Decide, correct, then stream only corrected text (or a message that passes through, as the upstream sent
        it); errors before the first event keep their status (unreadable content: 502)."""
        slot = self.proxy.slot(chat.n)
        slot.__enter__()
        try:
            events = await self._events(chat)
        except BaseException:
            slot.__exit__(None, None, None)
            raise
        closing = oa.sse(oa.error_body(SHUTTING_DOWN, type="service_unavailable", code="shutting_down"))

        async def body() -> AsyncIterator[bytes]:
            try:
                async for event in self.proxy.drain.guard(events, closing):
                    yield event
            finally:
                slot.__exit__(None, None, None)

        return StreamingResponse(body(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def _events(self, chat: oa.ChatRequest) -> AsyncIterator[bytes]:
        """The stream's events: the upstream call, every decision and the first choice's first delta come first."""
        data = await self.proxy.call_upstream(chat)
        choices = [c for c in data["choices"] if isinstance(c, dict)] or [{}]
        decisions = [self.proxy.decide(chat, c, i) for i, c in enumerate(choices)]
        head = sse.StreamHead(data.get("id") or oa.new_id(), data.get("model") or "", oa.now(), chat.include_usage)
        outcomes: list[Outcome] = []
        first = await self._choice_events(chat, head, 0, choices[0], decisions[0], outcomes)

        async def parts() -> AsyncIterator[AsyncIterator[bytes]]:
            yield first
            for i in range(1, len(choices)):
                yield await self._choice_events(chat, head, i, choices[i], decisions[i], outcomes)

        def end() -> Iterator[bytes]:
            upstream_usage = data.get("usage")
            return head.end(contract.client_usage(upstream_usage, outcomes),
                            aligner={"usage": contract.aligner_usage(outcomes), "upstream_usage": upstream_usage})

        return sse.compose(parts(), end)

    async def _choice_events(self, chat: oa.ChatRequest, head: sse.StreamHead, index: int, choice: dict[str, Any],
                             decision: Decision, outcomes: list[Outcome]) -> AsyncIterator[bytes]:
        """One choice's events, once what must come before its first event is done."""
        upstream_finish = choice.get("finish_reason") or "stop"
        if not decision.corrects:  # passes through as the upstream sent it: not a correction
            outcomes.append(Outcome())
            details = {**self.proxy.passthrough(chat, decision),
                       **contract.contract_details(choice, None, asked_logprobs=chat.logprobs)}
            return sse.whole_message(head, index, ch.passthrough_delta(ch.message_of(choice), decision),
                                     upstream_finish, details, logprobs=choice.get("logprobs"))
        if decision.structure is not None:  # opted in: checked whole before anything is sent
            settled = await self.proxy.correct_decided(chat, decision)
            outcomes.append(Outcome.of(settled))
            details = self._details(chat, choice, settled, include_original=False)
            if contract.kept(settled):
                return sse.whole_message(head, index, {"role": "assistant", "content": settled.text},
                                         settled.finish_reason, details)
            return sse.whole_message(head, index, {"role": "assistant", "content": settled.text}, upstream_finish,
                                     details, logprobs=choice.get("logprobs"))
        stream = await self.proxy.stream_decided(chat, decision)
        deltas = sse.CorrectionDeltas(stream, self.proxy.limits.correction_timeout)
        first = await deltas.first()

        def finished(correction: Correction) -> tuple[str, dict[str, Any]]:
            self.proxy.metrics.record_correction(correction)
            outcomes.append(Outcome.of(correction))
            details = self._details(chat, choice, correction, include_original=False)  # never the uncorrected text
            return (correction.finish_reason if contract.kept(correction) else upstream_finish), details

        return sse.correction_events(head, index, deltas, first, finished)


__all__ = ["ChatCompletions"]
