"""The ASGI app: OpenAI-compatible chat completions whose answers are corrected by an Aligner.

Every request goes through ``Aligner.acorrect``/``astream`` on the server's event loop, so concurrent
HTTP requests share the local engine's batches (or the server engine's own batching). What gets corrected is
the core's decision, one per upstream choice (``choices``); the tool turns of the request ground the correction
(``grounding``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from aligner_core import Aligner, Correction
from aligner_core.context import Context, normalize_context
from aligner_core.decision import Decision
from aligner_core.errors import AlignerError, InvalidInputError

from . import choices as ch
from . import openai_schema as oa
from . import sse
from .errors import aligner_error_response, aligner_status, json_error, upstream_error_response
from .metrics import Metrics
from .security import Admission, ApiKeys, BodyTooLargeError, MalformedJSONError, read_json
from .upstream import Upstream, UpstreamError

logger = logging.getLogger("aligner_serve")

ENDPOINTS = ("/v1/chat/completions", "/v1/corrections", "/v1/models", "/health", "/metrics")


@dataclass(frozen=True)
class ServeLimits:
    """The limits one proxy enforces."""

    max_body_bytes: int = 1_000_000
    """Largest request body; larger ones get 413 before they are read in full."""
    max_queue: int = 256
    """Requests (batch items count one each) in progress at once; past it 429 with ``Retry-After``."""
    max_batch_items: int = 64
    """Most items in one ``/v1/corrections`` batch (413 beyond)."""
    correction_timeout: float | None = 120.0
    """Seconds one correction may take before the request fails with 504."""
    include_original: bool = True
    """Put the upstream's uncorrected answer in the ``aligner`` field of non-streamed responses."""

    def __post_init__(self) -> None:
        for name in ("max_body_bytes", "max_queue", "max_batch_items"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if self.max_batch_items > self.max_queue:
            raise ValueError(f"max_batch_items ({self.max_batch_items}) cannot exceed max_queue ({self.max_queue}): "
                             "such a batch could never be admitted")


class _Rejected(Exception):
    """A request refused with a ready response (429, 413, ...)."""

    def __init__(self, response: Response) -> None:
        self.response = response


class CorrectionProxy:
    """The proxy's state (Aligner, upstream client, limits, metrics) and its request handlers."""

    def __init__(self, aligner: Aligner, upstream: Upstream, *, limits: ServeLimits, metrics: Metrics,
                 served_model: str | None = None, correct_structured: bool = False) -> None:
        self.aligner = aligner
        self.upstream = upstream
        self.limits = limits
        self.metrics = metrics
        self.served_model = served_model or upstream.model
        self.correct_structured = correct_structured
        """Correct structured answers (JSON mode, a JSON schema) by default; a request's ``aligner`` field wins."""
        self.admission = Admission(limits.max_queue)

    # -- plumbing ------------------------------------------------------------------------------

    async def body(self, request: Request) -> Any:
        try:
            return await read_json(request, self.limits.max_body_bytes)
        except BodyTooLargeError as exc:
            raise _Rejected(json_error(413, str(exc), type="invalid_request_error", code="request_too_large")) from None
        except MalformedJSONError as exc:
            raise _Rejected(json_error(400, str(exc), type="invalid_request_error", code="invalid_json")) from None

    @contextlib.contextmanager
    def slot(self, n: int = 1) -> Any:
        """Hold ``n`` places of the queue for the block, or refuse at once with 429."""
        if not self.admission.try_acquire(n):
            self.metrics.rejected.inc()
            raise _Rejected(json_error(
                429, f"the correction proxy is at its limit of {self.limits.max_queue} requests in progress: retry later",
                type="rate_limit_error", code="queue_full", headers={"Retry-After": str(self.admission.retry_after)},
            ))
        self.metrics.in_progress.inc(n)
        start = time.perf_counter()
        try:
            yield
        finally:
            self.metrics.in_progress.dec(n)
            self.admission.release(n, time.perf_counter() - start)

    def generation(self, max_tokens: int | None) -> dict[str, Any]:
        """The client's token limit caps the correction too (never above the proxy's own limit)."""
        if max_tokens is None:
            return {}
        return {"max_new_tokens": min(max_tokens, self.aligner.defaults.max_new_tokens)}

    async def correct(self, question: str, answer: str, history: list[dict[str, str]], max_tokens: int | None,
                      context: Context = (), *, settle: Callable[[Correction], Correction] | None = None,
                      ) -> Correction:
        """One correction (``settle`` checks it against what was asked, e.g. a schema), counted in the metrics."""
        correction = await self.aligner.acorrect(question, answer, timeout=self.limits.correction_timeout,
                                                 **_grounding(history, context), **self.generation(max_tokens))
        if settle is not None:
            correction = settle(correction)
        self.metrics.record_correction(correction)
        return correction

    def decide(self, chat: oa.ChatRequest, choice: dict[str, Any], index: int) -> Decision:
        """The core's decision for one upstream choice (``UnreadableContentError``, a 502, for unreadable content)."""
        wanted = chat.options.correct_structured
        return ch.decide_choice(ch.message_of(choice), index, chat.structure,
                                correct_structured=self.correct_structured if wanted is None else wanted)

    async def correct_decided(self, chat: oa.ChatRequest, decision: Decision) -> Correction:
        """The correction of an answer the decision corrects, settled (a structured one is kept only if valid)."""
        return await self.correct(chat.question, decision.text, chat.history, chat.max_tokens, chat.context,
                                  settle=decision.settle)

    def passthrough(self, chat: oa.ChatRequest, decision: Decision) -> dict[str, Any]:
        """Count a choice passed through and give its ``aligner`` field."""
        self.metrics.skipped.labels(reason=str(decision.skip)).inc()
        return ch.passthrough_details(decision, chat.structure)

    async def call_upstream(self, chat: oa.ChatRequest) -> dict[str, Any]:
        start = time.perf_counter()
        data = await self.upstream.chat(oa.upstream_body(chat, self.upstream.model))
        self.metrics.record_upstream(data.get("usage"), time.perf_counter() - start)
        return data

    # -- endpoints -----------------------------------------------------------------------------

    async def chat_completions(self, body: Any) -> Response:
        try:
            chat = oa.parse_chat_request(body)
        except oa.RequestShapeError as exc:
            return json_error(400, str(exc), type="invalid_request_error", param=exc.param)
        if chat.stream:
            return await self._stream(chat)
        with self.slot():
            data = await self.call_upstream(chat)
            choices = [c for c in data["choices"] if isinstance(c, dict)]
            decisions = [self.decide(chat, c, i) for i, c in enumerate(choices)]  # unreadable: 502 before any work
            results = await asyncio.gather(*(self._apply(chat, c, d) for c, d in zip(choices, decisions)),
                                           return_exceptions=True)
            for result in results:
                if isinstance(result, BaseException):
                    raise result
        details = [r for r in results if isinstance(r, dict)]
        if details:
            data["aligner"] = details[0]
        return JSONResponse(data)

    async def _apply(self, chat: oa.ChatRequest, choice: dict[str, Any], decision: Decision) -> dict[str, Any]:
        """Carry out the decision on one choice in place; returns its ``aligner`` details."""
        if not decision.corrects:
            details = self.passthrough(chat, decision)
        else:
            correction = await self.correct_decided(chat, decision)
            if not correction.metadata.get("skipped"):  # a kept correction; else the message stays as it came
                message = ch.message_of(choice)
                message["content"] = ch.with_text(message.get("content"), correction.text)
                choice["finish_reason"] = correction.finish_reason
            details = oa.correction_details(correction, include_original=self.limits.include_original)
        choice["aligner"] = details
        return details

    async def _stream(self, chat: oa.ChatRequest) -> Response:
        """Decide, correct, then stream only the corrected text (or the message that passes through, as the
        upstream sent it); errors before the first delta keep their status (unreadable content: 502)."""
        slot = self.slot()
        slot.__enter__()
        try:
            events = await self._events(chat)
        except BaseException:
            slot.__exit__(None, None, None)
            raise

        async def body() -> AsyncIterator[bytes]:
            try:
                async for event in events:
                    yield event
            finally:
                slot.__exit__(None, None, None)

        return StreamingResponse(body(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def _events(self, chat: oa.ChatRequest) -> AsyncIterator[bytes]:
        """The events of a streamed request: everything that can fail with a status is done before the first."""
        data = await self.call_upstream(chat)
        choice = data["choices"][0] if data["choices"] and isinstance(data["choices"][0], dict) else {}
        head = sse.StreamHead(data.get("id") or oa.new_id(), data.get("model") or self.served_model or "", oa.now(),
                              data.get("usage"), chat.include_usage)
        decision = self.decide(chat, choice, 0)
        upstream_finish = choice.get("finish_reason") or "stop"
        if not decision.corrects:  # passes through as the upstream sent it: not a correction
            return sse.whole_message(head, ch.passthrough_delta(ch.message_of(choice), decision), upstream_finish,
                                     self.passthrough(chat, decision))
        if decision.structure is not None:  # opted in: checked whole before anything is sent
            settled = await self.correct_decided(chat, decision)
            finish = upstream_finish if settled.metadata.get("skipped") else settled.finish_reason
            return sse.whole_message(head, {"role": "assistant", "content": settled.text}, finish,
                                     oa.correction_details(settled, include_original=False))
        stream = self.aligner.astream(chat.question, decision.text, **_grounding(chat.history, chat.context),
                                      **self.generation(chat.max_tokens))
        deltas = sse.CorrectionDeltas(stream, self.limits.correction_timeout)
        first = await deltas.first()

        def finished(correction: Correction) -> dict[str, Any]:
            self.metrics.record_correction(correction)
            return oa.correction_details(correction, include_original=False)  # never the uncorrected text

        return sse.correction_events(head, deltas, first, finished)

    async def corrections(self, body: Any) -> Response:
        """``{question, answer[, history][, context]}`` -> one Correction; ``{"items": [...]}`` -> one per item, in
        order."""
        if not isinstance(body, dict):
            return json_error(400, "the body must be a JSON object", type="invalid_request_error")
        limit = body.get("max_new_tokens")
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
            return json_error(400, f"'max_new_tokens' must be a positive integer, got {limit!r}",
                              type="invalid_request_error", param="max_new_tokens")
        if "items" not in body:
            pair = _pair(body, "")
            if isinstance(pair, Response):
                return pair
            with self.slot():
                question, answer, history, context = pair
                correction = await self.correct(question, answer, history, limit, context)
            return JSONResponse(_correction_json(correction))
        items = body["items"]
        if not isinstance(items, list) or not items:
            return json_error(400, "'items' must be a non-empty list of {question, answer} objects",
                              type="invalid_request_error", param="items")
        if len(items) > self.limits.max_batch_items:
            return json_error(413, f"{len(items)} items is over the limit of {self.limits.max_batch_items} per "
                              "request: split the batch", type="invalid_request_error", code="too_many_items")
        pairs: list[_Pair | Response] = [_pair(it, f"items[{i}].") for i, it in enumerate(items)]
        for p in pairs:
            if isinstance(p, Response):
                return p
        with self.slot(len(items)):
            outputs = await asyncio.wait_for(self.aligner.acorrect_batch(
                [{"question": q, "answer": a, **_grounding(h, c)} for q, a, h, c in pairs],  # type: ignore[misc]
                return_exceptions=True, **self.generation(limit),
            ), self.limits.correction_timeout)
        results: list[dict[str, Any]] = []
        for out in outputs:
            if isinstance(out, Correction):
                self.metrics.record_correction(out)
                results.append(_correction_json(out))
            elif isinstance(out, AlignerError):
                status, kind, code = aligner_status(out)
                results.append({**oa.error_body(str(out), type=kind, code=code), "status": status})
            else:
                raise out
        return JSONResponse({"object": "list", "items": results})

    async def models(self, request: Request) -> Response:
        if self.served_model:
            data = [{"id": self.served_model, "object": "model", "created": 0, "owned_by": "aligner-serve"}]
        else:
            data = await self.upstream.models()
        return JSONResponse({"object": "list", "data": data})

    async def health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok", "aligner": self.aligner.name, "template": self.aligner.template.name,
                             "in_progress": self.admission.active, "queue_limit": self.limits.max_queue})

    async def metrics_endpoint(self, request: Request) -> Response:
        return Response(self.metrics.exposition(), media_type=self.metrics.content_type)


_Pair = tuple[str, str, list[dict[str, str]], Context]


def _pair(item: Any, where: str) -> _Pair | Response:
    """``(question, answer, history, context)`` of a corrections item, or the 400 that says what is wrong."""
    if not isinstance(item, dict):
        return json_error(400, f"{where or 'the body'} must be an object with 'question' and 'answer'",
                          type="invalid_request_error")
    for key in ("question", "answer"):
        if not isinstance(item.get(key), str):
            return json_error(400, f"'{where}{key}' must be a string", type="invalid_request_error",
                              param=f"{where}{key}")
    history = item.get("history", item.get("chat_history")) or []
    if not isinstance(history, list):
        return json_error(400, f"'{where}history' must be a list of {{role, content}} turns",
                          type="invalid_request_error", param=f"{where}history")
    try:
        context = normalize_context(item.get("context"), where)
    except InvalidInputError as exc:
        return json_error(400, str(exc), type="invalid_request_error", param=f"{where}context")
    return item["question"], item["answer"], history, context


def _grounding(history: list[dict[str, str]], context: Context) -> dict[str, Any]:
    """The ``history``/``context`` keywords of a correction, only where there are any (no earlier turns and no
    tool turns leave the prompt exactly as a plain pair's)."""
    return {**({"history": history} if history else {}), **({"context": context} if context else {})}


def _correction_json(correction: Correction) -> dict[str, Any]:
    return {"object": "correction", **correction.to_dict(), "template": correction.metadata.get("template")}


def _handler(proxy: CorrectionProxy, endpoint: str, fn: Callable[[Any], Awaitable[Response]], *,
             reads_body: bool) -> Callable[[Request], Awaitable[Response]]:
    """Wrap an endpoint: read its JSON body (capped), map failures to their status, time it, count it.

    Once the body is read, a client that hangs up cancels its request: its place in the queue (and a
    correction not yet started) is freed instead of being computed for nobody.
    """

    async def handle(request: Request) -> Response:
        start = time.perf_counter()
        try:
            if reads_body:
                body = await proxy.body(request)
                response = await _unless_disconnected(request, fn(body))
            else:
                response = await fn(request)
        except _Rejected as rejected:
            response = rejected.response
        except UpstreamError as exc:
            logger.warning("upstream failure on %s: %s", endpoint, type(exc).__name__)
            response = upstream_error_response(exc)
        except AlignerError as exc:
            response = aligner_error_response(exc, proxy.admission.retry_after)
        except asyncio.TimeoutError:  # a whole batch past the correction timeout
            response = json_error(504, "the corrections took longer than the proxy's correction timeout",
                                  type="aligner_timeout", code="correction_timeout")
        except Exception:
            logger.exception("unexpected failure on %s", endpoint)
            response = json_error(500, "internal error in the correction proxy", type="server_error")
        proxy.metrics.requests.labels(endpoint=endpoint, status=str(response.status_code)).inc()
        proxy.metrics.latency.labels(endpoint=endpoint).observe(time.perf_counter() - start)
        return response

    return handle


async def _unless_disconnected(request: Request, work: Awaitable[Response]) -> Response:
    """Run ``work``; cancel it if the client disconnects first (the body is read, so ``receive`` only
    reports the disconnect)."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(request.receive())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if not task.done() and watcher.result().get("type") == "http.disconnect":
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            logger.info("the client disconnected; its request was cancelled")
            return json_error(499, "client closed the request", type="client_closed")
        return await task
    finally:
        for t in (task, watcher):
            t.cancel()


class ApiKeyMiddleware:
    """Checks the API key on every request, whatever its path, before anything else reads it."""

    def __init__(self, app: ASGIApp, keys: ApiKeys, metrics: Metrics) -> None:
        self.app = app
        self.keys = keys
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.keys.enabled or self.keys.allows(Request(scope)):
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        self.metrics.requests.labels(endpoint=path if path in ENDPOINTS else "other", status="401").inc()
        response = json_error(401, "missing or invalid API key: send it as 'Authorization: Bearer KEY'",
                              type="invalid_request_error", code="invalid_api_key",
                              headers={"WWW-Authenticate": "Bearer"})
        await response(scope, receive, send)


def build_app(
    aligner: Aligner,
    upstream: Upstream,
    *,
    api_keys: ApiKeys | None = None,
    limits: ServeLimits | None = None,
    served_model: str | None = None,
    close_aligner: bool = True,
    correct_structured: bool = False,
) -> Starlette:
    """The correction proxy as an ASGI app (run it with uvicorn, or ``aligner serve``).

    ``correct_structured`` corrects structured answers (JSON mode, a JSON schema) too, keeping a correction only
    if it still parses and validates; by default they pass through, and a request's ``aligner`` field decides
    for itself. On shutdown the upstream client is closed, and the Aligner too unless ``close_aligner=False``.
    """
    metrics = Metrics()
    proxy = CorrectionProxy(aligner, upstream, limits=limits or ServeLimits(), metrics=metrics,
                            served_model=served_model, correct_structured=correct_structured)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        try:
            yield
        finally:
            await upstream.aclose()
            if close_aligner:
                await asyncio.to_thread(aligner.close)

    routes = [
        Route(path, _handler(proxy, path, fn, reads_body=method == "POST"), methods=[method])
        for path, method, fn in (
            ("/v1/chat/completions", "POST", proxy.chat_completions),
            ("/v1/corrections", "POST", proxy.corrections),
            ("/v1/models", "GET", proxy.models),
            ("/health", "GET", proxy.health),
            ("/metrics", "GET", proxy.metrics_endpoint),
        )
    ]
    app = Starlette(routes=routes, lifespan=lifespan)
    app.state.proxy = proxy
    app.add_middleware(ApiKeyMiddleware, keys=api_keys or ApiKeys(), metrics=metrics)
    return app
