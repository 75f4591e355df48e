"""The proxy's state (Aligner, upstream client, limits, metrics, model names) and what every endpoint shares:
reading the body, a place in the queue, calling the upstream, deciding and correcting one answer.

Every correction goes through ``Aligner.acorrect``/``astream`` on the server's event loop, so concurrent HTTP
requests share the local engine's batches (or the server engine's own batching). Its token limit comes from
``budget`` (room to restate the answer), counted off the event loop. A request's mode (``policy``) decides whether
its answers are corrected, only scored (``inspection``) or left alone; the queue and the upstream call are traced
(``tracing``).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from aligner_core import Aligner, Correction
from aligner_core.context import Context
from aligner_core.decision import Decision
from aligner_core.streaming import AsyncCorrectionStream

from . import choices as ch
from . import inspection, tracing
from . import openai_schema as oa
from .body import BodyTimeoutError, BodyTooLargeError, ClientClosedError, MalformedJSONError, read_json
from .budget import TokenBudget
from .config import Mode
from .drain import Drain
from .errors import json_error
from .inspection import Verdict
from .limits import ServeLimits
from .metrics import Metrics
from .models import ModelMap
from .security import Admission
from .upstream import Upstream, UpstreamStatusError


class Rejected(Exception):
    """A request refused with a ready response (429, 413, 499, ...)."""

    def __init__(self, response: Response) -> None:
        self.response = response


class CorrectionProxy:
    """What the endpoints share; one per app."""

    def __init__(
        self,
        aligner: Aligner,
        upstream: Upstream,
        *,
        limits: ServeLimits,
        metrics: Metrics,
        models: ModelMap | None = None,
        correct_structured: bool = False,
        drain: Drain | None = None,
    ) -> None:
        self.aligner = aligner
        self.upstream = upstream
        self.limits = limits
        self.metrics = metrics
        self.models = models or ModelMap.build(upstream_model=upstream.model)
        self.correct_structured = correct_structured
        """Correct structured answers (JSON mode, a JSON schema) by default; a request's ``aligner`` field wins."""
        self.admission = Admission(limits.max_queue)
        self.budget = TokenBudget(aligner)
        self.drain = drain or Drain(limits.shutdown_grace)

    # -- requests ------------------------------------------------------------------------------

    async def body(self, request: Request) -> Any:
        """The request's JSON body; a refusal with its status when it is too large, too slow, cut off or not JSON."""
        try:
            return await read_json(request, self.limits.max_body_bytes, timeout=self.limits.read_timeout)
        except BodyTooLargeError as exc:
            raise Rejected(
                json_error(413, str(exc), type="invalid_request_error", code="request_too_large")
            ) from None
        except MalformedJSONError as exc:
            raise Rejected(
                json_error(400, str(exc), type="invalid_request_error", code="invalid_json")
            ) from None
        except BodyTimeoutError as exc:
            raise Rejected(
                json_error(
                    408,
                    str(exc),
                    type="invalid_request_error",
                    code="request_timeout",
                    headers={"Connection": "close"},
                )
            ) from None
        except ClientClosedError as exc:
            raise Rejected(json_error(499, str(exc), type="client_closed", code="client_closed")) from None

    @property
    def inspects(self) -> bool:
        """Whether this proxy has an inspector to score with (``inspect`` mode needs one)."""
        return self.aligner.inspector is not None

    @contextlib.contextmanager
    def slot(self, n: int = 1) -> Iterator[None]:
        """Hold ``n`` places of the queue for the block, or refuse at once with 429."""
        with tracing.span(
            "aligner.admission",
            {
                "aligner.queue.places": n,
                "aligner.queue.limit": self.limits.max_queue,
                "aligner.queue.taken": self.admission.active,
            },
        ) as admission:
            admitted = self.admission.try_acquire(n)
            admission.set({"aligner.queue.admitted": admitted})
        if not admitted:
            self.metrics.rejected.inc()
            raise Rejected(
                json_error(
                    429,
                    f"the correction proxy is at its limit of {self.limits.max_queue} places in progress ({n} asked, "
                    f"{self.admission.active} taken): retry later",
                    type="rate_limit_error",
                    code="queue_full",
                    headers={"Retry-After": str(self.admission.retry_after)},
                )
            )
        self.metrics.in_progress.inc(n)
        start = time.perf_counter()
        try:
            yield
        finally:
            self.metrics.in_progress.dec(n)
            self.admission.release(n, time.perf_counter() - start)

    async def call_upstream(self, chat: oa.ChatRequest) -> dict[str, Any]:
        """The upstream's answer to ``chat``, its model name reported as the client asked for it where mapped."""
        start = time.perf_counter()
        requested = chat.body.get("model")
        body = oa.upstream_body(chat, self.models.upstream_name(requested))
        name = body.get("model") if isinstance(body.get("model"), str) else ""
        attrs = tracing.upstream_attributes(self.upstream.base_url, body)
        with tracing.span(f"chat {name}".strip(), attrs, client=True) as call:
            try:
                data = await self.upstream.chat(body, headers=tracing.propagation_headers())
            except UpstreamStatusError as exc:
                call.set({"http.response.status_code": exc.status})
                raise
            call.set(tracing.upstream_result(data))
        self.metrics.record_upstream(data.get("usage"), time.perf_counter() - start)
        reported = self.models.reported_name(requested, data.get("model"))
        if reported is not None:
            data["model"] = reported
        return data

    # -- corrections ---------------------------------------------------------------------------

    def decide(
        self, chat: oa.ChatRequest, choice: dict[str, Any], index: int, mode: Mode = "correct"
    ) -> Decision:
        """The core's decision for one upstream choice (``UnreadableContentError``, a 502, for unreadable content);
        in ``off`` mode the choice passes as it is, unread."""
        if mode == "off":
            return inspection.disabled(ch.message_of(choice).get("content"))
        wanted = chat.options.correct_structured
        return ch.decide_choice(
            ch.message_of(choice),
            index,
            chat.structure,
            correct_structured=self.correct_structured if wanted is None else wanted,
        )

    async def inspect(
        self, chat: oa.ChatRequest, decisions: list[Decision]
    ) -> tuple[list[Decision], list[Verdict | None]]:
        """``inspect`` mode: the verdict on every choice the core would correct (one batch), each turned into a
        choice passed through as inspected only; the others keep their decision and get no verdict."""
        scored = [i for i, d in enumerate(decisions) if d.corrects]
        found = await self.verdicts([(chat.question, decisions[i].text, chat.context) for i in scored])
        verdicts: list[Verdict | None] = [None] * len(decisions)
        for i, verdict in zip(scored, found):
            verdicts[i] = verdict
        return [inspection.inspect_only(d) if v else d for d, v in zip(decisions, verdicts)], verdicts

    async def verdicts(self, items: list[tuple[str, str, Context]]) -> list[Verdict]:
        """The inspector's verdicts on ``(question, answer, context)`` items (one batch), counted in the metrics."""
        found = await inspection.score(self.aligner, items)
        for verdict in found:
            self.metrics.record_verdict(verdict.passed)
        return found

    def passthrough(
        self, chat: oa.ChatRequest, decision: Decision, verdict: Verdict | None = None
    ) -> dict[str, Any]:
        """Count a choice passed through and give its ``aligner`` field (with the inspector's verdict, if any)."""
        self.metrics.skipped.labels(reason=str(decision.skip)).inc()
        details = ch.passthrough_details(decision, chat.structure)
        if verdict is not None:
            details["inspector"] = verdict.details()
        return details

    async def correct(
        self,
        question: str,
        answer: str,
        history: list[dict[str, str]],
        context: Context = (),
        *,
        stop: tuple[str, ...] = (),
        max_new_tokens: int | None = None,
        settle: Callable[[Correction], Correction] | None = None,
    ) -> Correction:
        """One correction, its limit room to restate the answer unless given (``settle`` checks it against what was
        asked, e.g. a schema), counted in the metrics."""
        limit = max_new_tokens or await self.budget.limit(answer)
        correction = await self.aligner.acorrect(
            question,
            answer,
            timeout=self.limits.correction_timeout,
            **grounding(history, context),
            **generation(limit, stop),
        )
        if settle is not None:
            correction = settle(correction)
        self.metrics.record_correction(correction)
        return correction

    async def correct_decided(self, chat: oa.ChatRequest, decision: Decision) -> Correction:
        """The correction of a choice the decision corrects, settled (a structured one is kept only if valid)."""
        return await self.correct(
            chat.question, decision.text, chat.history, chat.context, stop=chat.stop, settle=decision.settle
        )

    async def stream_decided(self, chat: oa.ChatRequest, decision: Decision) -> AsyncCorrectionStream:
        """The streamed correction of a choice the decision corrects."""
        limit = await self.budget.limit(decision.text)
        return self.aligner.astream(
            chat.question,
            decision.text,
            **grounding(chat.history, chat.context),
            **generation(limit, chat.stop),
        )


def grounding(history: list[dict[str, str]], context: Context) -> dict[str, Any]:
    """The ``history``/``context`` keywords of a correction, only where there are any (no earlier turns and no
    tool turns leave the prompt exactly as a plain pair's)."""
    return {**({"history": history} if history else {}), **({"context": context} if context else {})}


def generation(max_new_tokens: int, stop: tuple[str, ...]) -> dict[str, Any]:
    """The generation keywords of a correction: its limit, and the request's stop sequences where it has any."""
    return {"max_new_tokens": max_new_tokens, **({"stop": list(stop)} if stop else {})}


__all__ = ["CorrectionProxy", "Rejected", "generation", "grounding"]
