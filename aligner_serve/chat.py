"""``POST /v1/chat/completions``: the upstream's answer, each choice decided by the core and its text corrected,
plain or streamed.

Everything that can fail with a status (the mode the caller may use, the upstream call, the decisions, the
inspector's verdicts, the first streamed choice's first delta) happens before a response starts; ``n`` choices take
``n`` places in the queue. The request's mode (``policy``: correct, inspect, off) decides what happens to the
choices the core would correct, and the outcome also goes out as headers (``outcome_headers``). What
``finish_reason``, ``usage`` and ``logprobs`` say is ``contract``'s job, what the Aligner sees of the request
``grounding``'s.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

from starlette.responses import JSONResponse, Response, StreamingResponse

from aligner_core import Correction
from aligner_core.decision import Decision

from . import choices as ch
from . import contract, sse, tracing
from . import openai_schema as oa
from .bad_request import RequestShapeError
from .config import Mode
from .contract import Outcome
from .drain import MESSAGE as SHUTTING_DOWN
from .errors import json_error
from .inspection import Verdict
from .outcome_headers import ChoiceOutcome, outcome_headers, server_timing
from .policy import Caller
from .proxy import CorrectionProxy

#: Per choice: what the core decided (in the request's mode) and the inspector's verdict (``inspect`` mode).
Plan = tuple[list[Decision], list[Verdict | None]]


class ChatCompletions:
    """The endpoint, bound to one proxy."""

    def __init__(self, proxy: CorrectionProxy) -> None:
        self.proxy = proxy

    async def __call__(self, body: Any, caller: Caller | None = None) -> Response:
        try:
            chat = oa.parse_chat_request(body)
        except RequestShapeError as exc:
            return json_error(400, str(exc), type="invalid_request_error", param=exc.param)
        mode = (caller or Caller()).mode(
            chat.options.mode, inspector=self.proxy.inspects
        )  # PolicyError: 403/400
        tracing.annotate({"aligner.mode": mode, "aligner.choices": chat.n, "aligner.stream": chat.stream})
        limit = self.proxy.limits.choices
        if chat.n > limit:
            return json_error(
                400,
                f"n={chat.n} is over the correction proxy's limit of {limit} choices per request "
                "(--max-n): each choice is corrected",
                type="invalid_request_error",
                param="n",
            )
        if chat.stream:
            return await self._stream(chat, mode)
        with self.proxy.slot(chat.n):
            start = time.perf_counter()
            data = await self.proxy.call_upstream(chat)
            answered = time.perf_counter()
            choices = [c for c in data["choices"] if isinstance(c, dict)]
            decisions, verdicts = await self._plan(chat, choices, mode)  # unreadable: 502 first
            results = await asyncio.gather(
                *(self._apply(chat, c, d, v) for c, d, v in zip(choices, decisions, verdicts)),
                return_exceptions=True,
            )
            for result in results:
                if isinstance(result, BaseException):
                    raise result
            timing = server_timing(answered - start, time.perf_counter() - answered)
        done = [r for r in results if isinstance(r, tuple)]
        outcomes = [outcome for _, outcome in done]
        upstream_usage = data.get("usage")
        if upstream_usage is not None or any(o.returned_tokens is not None for o in outcomes):
            data["usage"] = contract.client_usage(upstream_usage, outcomes)
        if done:
            data["aligner"] = contract.request_details(done[0][0], upstream_usage, outcomes)
        return JSONResponse(
            data, headers={**outcome_headers(mode, [ChoiceOutcome.of(d) for d, _ in done]), **timing}
        )

    async def _plan(self, chat: oa.ChatRequest, choices: list[dict[str, Any]], mode: Mode) -> Plan:
        """Every choice's decision in ``mode`` (off: passed as it is; inspect: scored, never rewritten)."""
        decisions = [self.proxy.decide(chat, c, i, mode) for i, c in enumerate(choices)]
        if mode == "inspect":
            return await self.proxy.inspect(chat, decisions)
        return decisions, [None] * len(decisions)

    async def _apply(
        self, chat: oa.ChatRequest, choice: dict[str, Any], decision: Decision, verdict: Verdict | None
    ) -> tuple[dict[str, Any], Outcome]:
        """Carry out the decision on one choice in place; its ``aligner`` field and what it returned."""
        if not decision.corrects:
            details = {
                **self.proxy.passthrough(chat, decision, verdict),
                **contract.contract_details(choice, None, asked_logprobs=chat.logprobs),
            }
            outcome = Outcome()
        else:
            correction = await self.proxy.correct_decided(chat, decision)
            details = self._details(
                chat, choice, correction, include_original=self.proxy.limits.include_original
            )
            if contract.kept(correction):  # else the message stays as it came
                message = ch.message_of(choice)
                message["content"] = ch.with_text(message.get("content"), correction.text)
                contract.rewrite_choice(choice, correction)
            outcome = Outcome.of(correction)
        choice["aligner"] = details
        return details, outcome

    @staticmethod
    def _details(
        chat: oa.ChatRequest, choice: dict[str, Any], correction: Correction, *, include_original: bool
    ) -> dict[str, Any]:
        details = {
            **oa.correction_details(correction, include_original=include_original),
            **contract.contract_details(choice, correction, asked_logprobs=chat.logprobs),
        }
        if chat.question_role != "user":  # no user message: say what the Aligner took as the question
            details["question_from"] = chat.question_role or "none"
        return details

    # -- streams -------------------------------------------------------------------------------

    async def _stream(self, chat: oa.ChatRequest, mode: Mode) -> Response:
        """Decide, correct, then stream only corrected text (or a message that passes through, as the upstream sent
        it); errors before the first event keep their status (unreadable content: 502)."""
        slot = self.proxy.slot(chat.n)
        slot.__enter__()
        try:
            events, headers = await self._events(chat, mode)
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

        return StreamingResponse(
            body(),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **headers},
        )

    async def _events(self, chat: oa.ChatRequest, mode: Mode) -> tuple[AsyncIterator[bytes], dict[str, str]]:
        """The stream's events and headers: the upstream call, every decision and verdict and the first choice's
        first delta come first; the outcome headers where every choice's outcome is known by then (none is
        corrected), and how long the upstream and the Aligner took until then."""
        start = time.perf_counter()
        data = await self.proxy.call_upstream(chat)
        answered = time.perf_counter()
        choices = [c for c in data["choices"] if isinstance(c, dict)] or [{}]
        decisions, verdicts = await self._plan(chat, choices, mode)
        head = sse.StreamHead(
            data.get("id") or oa.new_id(), data.get("model") or "", oa.now(), chat.include_usage
        )
        outcomes: list[Outcome] = []
        first = await self._choice_events(chat, head, 0, choices[0], decisions[0], verdicts[0], outcomes)
        timing = server_timing(answered - start, time.perf_counter() - answered)

        async def parts() -> AsyncIterator[AsyncIterator[bytes]]:
            yield first
            for i in range(1, len(choices)):
                yield await self._choice_events(
                    chat, head, i, choices[i], decisions[i], verdicts[i], outcomes
                )

        def end() -> Iterator[bytes]:
            upstream_usage = data.get("usage")
            return head.end(
                contract.client_usage(upstream_usage, outcomes),
                aligner={"usage": contract.aligner_usage(outcomes), "upstream_usage": upstream_usage},
            )

        known = (
            None
            if any(d.corrects for d in decisions)
            else [
                ChoiceOutcome(skipped=str(d.skip), verdict=v.details() if v else None)
                for d, v in zip(decisions, verdicts)
            ]
        )
        return sse.compose(parts(), end), {**outcome_headers(mode, known), **timing}

    async def _choice_events(
        self,
        chat: oa.ChatRequest,
        head: sse.StreamHead,
        index: int,
        choice: dict[str, Any],
        decision: Decision,
        verdict: Verdict | None,
        outcomes: list[Outcome],
    ) -> AsyncIterator[bytes]:
        """One choice's events, once what must come before its first event is done."""
        upstream_finish = choice.get("finish_reason") or "stop"
        if not decision.corrects:  # passes through as the upstream sent it: not a correction
            outcomes.append(Outcome())
            details = {
                **self.proxy.passthrough(chat, decision, verdict),
                **contract.contract_details(choice, None, asked_logprobs=chat.logprobs),
            }
            return sse.whole_message(
                head,
                index,
                ch.passthrough_delta(ch.message_of(choice), decision),
                upstream_finish,
                details,
                logprobs=choice.get("logprobs"),
            )
        if decision.structure is not None:  # opted in: checked whole before anything is sent
            settled = await self.proxy.correct_decided(chat, decision)
            outcomes.append(Outcome.of(settled))
            details = self._details(chat, choice, settled, include_original=False)
            if contract.kept(settled):
                return sse.whole_message(
                    head,
                    index,
                    {"role": "assistant", "content": settled.text},
                    settled.finish_reason,
                    details,
                )
            return sse.whole_message(
                head,
                index,
                {"role": "assistant", "content": settled.text},
                upstream_finish,
                details,
                logprobs=choice.get("logprobs"),
            )
        stream = await self.proxy.stream_decided(chat, decision)
        deltas = sse.CorrectionDeltas(stream, self.proxy.limits.correction_timeout)
        first = await deltas.first()

        def finished(correction: Correction) -> tuple[str, dict[str, Any]]:
            self.proxy.metrics.record_correction(correction)
            outcomes.append(Outcome.of(correction))
            details = self._details(
                chat, choice, correction, include_original=False
            )  # never the uncorrected text
            return (correction.finish_reason if contract.kept(correction) else upstream_finish), details

        return sse.correction_events(head, index, deltas, first, finished)


__all__ = ["ChatCompletions"]
