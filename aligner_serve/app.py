"""The ASGI app: OpenAI-compatible chat completions whose answers are corrected by an Aligner.

This module wires the parts together: the endpoints (``chat``, ``corrections``, and here the small ones), the API
key check in front of every path (which also finds the caller's policy), OpenAI-shaped JSON for every status
Starlette answers itself (404, 405, 500), the request spans (``tracing``, with OpenTelemetry installed) and the
shutdown. What the proxy shares across endpoints is ``proxy.CorrectionProxy``.

Only chat completions are proxied: ``/v1/completions`` and ``/v1/responses`` (and embeddings) answer a JSON 404 that
lists what is served, rather than an answer the Aligner never saw.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from aligner_core import Aligner

from . import tracing
from .chat import ChatCompletions
from .corrections import Corrections
from .drain import Drain
from .errors import json_error
from .handler import POLICY_SCOPE_KEY, endpoint
from .limits import ServeLimits
from .metrics import Metrics
from .models import ModelMap
from .policy import KeyRing
from .proxy import CorrectionProxy
from .security import ApiKeys, presented_key
from .upstream import Upstream

logger = logging.getLogger("aligner_serve")

#: Every path the proxy serves, with its method (anything else is a JSON 404, a wrong method a JSON 405).
ENDPOINTS = {
    "/v1/chat/completions": "POST",
    "/v1/corrections": "POST",
    "/v1/models": "GET",
    "/health": "GET",
    "/metrics": "GET",
}


class SmallEndpoints:
    """``/v1/models``, ``/health`` and ``/metrics``."""

    def __init__(self, proxy: CorrectionProxy) -> None:
        self.proxy = proxy

    async def models(self, request: Request) -> Response:
        """The upstream's models with every field it gave, and the operator's aliases (``models.ModelMap``)."""
        return JSONResponse(
            {"object": "list", "data": self.proxy.models.listing(await self.proxy.upstream.models())}
        )

    async def health(self, request: Request) -> Response:
        """``ok``; after SIGTERM ``draining`` with 503, so a load balancer stops sending requests."""
        proxy = self.proxy
        draining = proxy.drain.draining
        return JSONResponse(
            {
                "status": "draining" if draining else "ok",
                "aligner": proxy.aligner.name,
                "template": proxy.aligner.template.name,
                "in_progress": proxy.admission.active,
                "queue_limit": proxy.limits.max_queue,
            },
            status_code=503 if draining else 200,
        )

    async def metrics(self, request: Request) -> Response:
        return Response(self.proxy.metrics.exposition(), media_type=self.proxy.metrics.content_type)


class ApiKeyMiddleware:
    """Checks the API key on every request, whatever its path, before anything else reads it, and leaves the key's
    policy in the scope for the endpoints (the default policy where no keys are configured)."""

    def __init__(self, app: ASGIApp, keys: KeyRing, metrics: Metrics) -> None:
        self.app = app
        self.keys = keys
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        policy = self.keys.policy_for(presented_key(Request(scope)) if self.keys.enabled else None)
        if policy is not None:
            scope[POLICY_SCOPE_KEY] = policy
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        self.metrics.requests.labels(endpoint=path if path in ENDPOINTS else "other", status="401").inc()
        response = json_error(
            401,
            "missing or invalid API key: send it as 'Authorization: Bearer KEY'",
            type="invalid_request_error",
            code="invalid_api_key",
            headers={"WWW-Authenticate": "Bearer"},
        )
        await response(scope, receive, send)


def _http_error(metrics: Metrics) -> Any:
    """Starlette's own 404/405 (and any other ``HTTPException``) as OpenAI-shaped JSON that says what is served."""

    async def handle(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        where = f"{request.method} {request.url.path}"
        served = ", ".join(f"{method} {path}" for path, method in ENDPOINTS.items())
        if exc.status_code == 404:
            message, code = f"{where} is not served by the correction proxy; it serves {served}", "not_found"
        elif exc.status_code == 405:
            message = f"{where}: use {ENDPOINTS.get(request.url.path, 'another method')}"
            code = "method_not_allowed"
        else:
            message, code = str(exc.detail), None
        path = request.url.path
        metrics.requests.labels(
            endpoint=path if path in ENDPOINTS else "other", status=str(exc.status_code)
        ).inc()
        return json_error(
            exc.status_code, message, type="invalid_request_error", code=code, headers=dict(exc.headers or {})
        )

    return handle


async def _internal_error(request: Request, exc: Exception) -> Response:
    """Anything that escaped a handler: an OpenAI-shaped 500, never a text/plain one."""
    logger.error("unexpected failure on %s %s", request.method, request.url.path, exc_info=exc)
    return json_error(500, "internal error in the correction proxy", type="server_error")


def build_app(
    aligner: Aligner,
    upstream: Upstream,
    *,
    api_keys: KeyRing | ApiKeys | None = None,
    limits: ServeLimits | None = None,
    served_model: str | None = None,
    models: ModelMap | None = None,
    close_aligner: bool = True,
    correct_structured: bool = False,
) -> Starlette:
    """The correction proxy as an ASGI app (run it with uvicorn, or ``aligner serve``).

    Model names: ``models`` maps them explicitly; by default ``upstream.model`` is served under its own name and
    ``served_model`` too, and any other name goes upstream as it came. ``correct_structured`` corrects structured
    answers (JSON mode, a JSON schema) too, keeping a correction only if it still parses and validates; by default
    they pass through, and a request's ``aligner`` field decides for itself. On shutdown the upstream client is
    closed, and the Aligner too unless ``close_aligner=False``. ``app.state.drain`` is the graceful stop that
    ``http_server.run`` starts on SIGTERM.

    ``api_keys``: a ``KeyRing`` (keys with their policies, e.g. from ``--config``: each request runs in its key's
    mode, correct, inspect or off, and may pick another where the key allows it) or plain ``ApiKeys`` (all with
    the default policy: correct); none: every request has the ring's default policy. A policy in ``inspect`` mode
    needs the Aligner's inspector (``ValueError`` otherwise). With OpenTelemetry installed every request is a
    span (``tracing``).
    """
    ring = api_keys.ring() if isinstance(api_keys, ApiKeys) else api_keys or KeyRing()
    modes = {ring.default.mode, *(entry.policy.mode for entry in ring.entries)}
    if "inspect" in modes and aligner.inspector is None:
        raise ValueError(
            "a key policy has mode 'inspect' but the Aligner has no inspector to score with: give it "
            "one (--inspector, Aligner(inspector=...))"
        )
    limits = limits or ServeLimits()
    metrics = Metrics()
    drain = Drain(limits.shutdown_grace)
    names = models or ModelMap.build(upstream_model=upstream.model, served_model=served_model)
    proxy = CorrectionProxy(
        aligner,
        upstream,
        limits=limits,
        metrics=metrics,
        models=names,
        correct_structured=correct_structured,
        drain=drain,
    )
    small = SmallEndpoints(proxy)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        try:
            yield
        finally:
            await upstream.aclose()
            if close_aligner:
                await asyncio.to_thread(aligner.close)
            await asyncio.to_thread(tracing.flush)

    handlers = {
        "/v1/chat/completions": ChatCompletions(proxy),
        "/v1/corrections": Corrections(proxy),
        "/v1/models": small.models,
        "/health": small.health,
        "/metrics": small.metrics,
    }
    routes = [
        Route(path, endpoint(proxy, path, handlers[path], reads_body=method == "POST"), methods=[method])
        for path, method in ENDPOINTS.items()
    ]
    app = Starlette(
        routes=routes,
        lifespan=lifespan,
        exception_handlers={HTTPException: _http_error(metrics), Exception: _internal_error},
    )
    app.state.proxy = proxy
    app.state.drain = drain
    app.add_middleware(ApiKeyMiddleware, keys=ring, metrics=metrics)
    if tracing.available():  # outermost: a request refused for its key is a span too
        app.add_middleware(tracing.TracingMiddleware)
    return app


__all__ = ["ENDPOINTS", "ServeLimits", "build_app"]
