"""OpenTelemetry spans of the proxy (``pip install "llm-aligner[otel]"``; without ``opentelemetry-api`` every helper
here is a no-op and the middleware is not installed).

One trace per request, on the ``llm-aligner.serve`` tracer:

- a SERVER span per HTTP request (``TracingMiddleware``), named ``"{method} {route}"`` with the HTTP semantic
  conventions (``http.request.method``, ``http.route``, ``http.response.status_code``, ``url.path``,
  ``url.scheme``, ``server.address``/``server.port``; ``aligner.mode`` and ``aligner.key``, the label of the
  caller's key in the config file, from the endpoint), joined to the caller's trace when the request carries a
  ``traceparent`` header, and current for the whole request, a streamed body included, so that every span below
  nests in it: the library's own ``text_completion {aligner}`` span of each correction (``aligner_core.telemetry``)
  among them;
- ``aligner.admission``: the place in the queue (the proxy never waits for one: it admits or refuses with 429, and
  the span records which, with the places asked, taken and the limit);
- ``chat {model}``: a CLIENT span for the upstream call with the GenAI semantic conventions (``gen_ai.operation.name``
  ``chat``, ``gen_ai.request.*``, ``gen_ai.response.id``/``model``/``finish_reasons``, ``gen_ai.usage.*`` from the
  upstream's ``usage``, ``server.address``/``server.port``); its context goes upstream as ``traceparent``;
- ``aligner.inspect``: the inspector scoring answers in ``inspect`` mode.

These spans record no user text (messages, answers, corrections, stop strings, keys): attributes end up in tracing
back ends that are not meant to hold user content.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any
from urllib.parse import urlparse

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from aligner_core import __version__
from aligner_core.telemetry import available

TRACER_NAME = "llm-aligner.serve"
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"})
_SAMPLING = ("temperature", "top_p", "frequency_penalty", "presence_penalty")


def _tracer() -> Any:
    from opentelemetry import trace

    return trace.get_tracer(TRACER_NAME, __version__)


class Span:
    """A span, or nothing without OpenTelemetry: the helpers below hand one out either way."""

    def __init__(self, raw: Any | None = None) -> None:
        self.raw = raw

    def set(self, attributes: Mapping[str, Any]) -> None:
        if self.raw is not None:
            self.raw.set_attributes({k: v for k, v in attributes.items() if v is not None})

    def fail(self, error: BaseException | str) -> None:
        """Mark the span failed: ``error.type`` (the exception's class, or a status code) and an ERROR status."""
        if self.raw is None:
            return
        from opentelemetry.trace import Status, StatusCode

        kind = error if isinstance(error, str) else type(error).__qualname__
        self.raw.set_attribute("error.type", kind)
        if isinstance(error, BaseException):
            self.raw.record_exception(error)
        self.raw.set_status(Status(StatusCode.ERROR))


@contextlib.contextmanager
def span(name: str, attributes: Mapping[str, Any] | None = None, *, client: bool = False) -> Iterator[Span]:
    """A span around the block, current inside it (an exception escaping it marks it failed)."""
    if not available():
        yield Span()
        return
    from opentelemetry.trace import SpanKind

    kind = SpanKind.CLIENT if client else SpanKind.INTERNAL
    attrs = {k: v for k, v in (attributes or {}).items() if v is not None}
    with _tracer().start_as_current_span(
        name, kind=kind, attributes=attrs, record_exception=False, set_status_on_exception=False
    ) as raw:
        current = Span(raw)
        try:
            yield current
        except BaseException as exc:
            current.fail(exc)
            raise


def flush(timeout_s: float = 5.0) -> None:
    """Export the spans still buffered (an SDK provider's batch processor) before the process exits: uvicorn ends a
    SIGTERM'd server by raising the signal again, so exit hooks never run."""
    if available():
        from opentelemetry import trace

        force_flush = getattr(trace.get_tracer_provider(), "force_flush", None)
        if force_flush is not None:
            force_flush(int(timeout_s * 1000))


def annotate(attributes: Mapping[str, Any]) -> None:
    """Add attributes to the current span (the request's, in a handler); nothing without OpenTelemetry."""
    if available():
        from opentelemetry import trace

        Span(trace.get_current_span()).set(attributes)


def route(method: str, path: str) -> None:
    """Name the current request span after its route, as the HTTP conventions name server spans."""
    if available():
        from opentelemetry import trace

        current = trace.get_current_span()
        current.set_attribute("http.route", path)
        current.update_name(f"{_method(method)} {path}")


# -- the upstream call -------------------------------------------------------------------------------


def upstream_attributes(base_url: str, body: Mapping[str, Any]) -> dict[str, Any]:
    """The GenAI attributes of the upstream call known before it: the model and the request's settings."""
    attrs: dict[str, Any] = {"gen_ai.operation.name": "chat", **server_address(base_url)}
    model = body.get("model")
    if isinstance(model, str):
        attrs["gen_ai.request.model"] = model
    limit = body.get("max_completion_tokens", body.get("max_tokens"))
    if _number(limit):
        attrs["gen_ai.request.max_tokens"] = limit
    for name in _SAMPLING:
        if _number(body.get(name)):
            attrs[f"gen_ai.request.{name}"] = float(body[name])
    if _number(body.get("seed")):
        attrs["gen_ai.request.seed"] = body["seed"]
    n = body.get("n")
    if _number(n) and n != 1:
        attrs["gen_ai.request.choice.count"] = n
    return attrs


def upstream_result(data: Mapping[str, Any]) -> dict[str, Any]:
    """What the upstream's answer says of itself: its id and model, finish reasons, token usage."""
    attrs: dict[str, Any] = {}
    for key in ("id", "model"):
        if isinstance(data.get(key), str):
            attrs[f"gen_ai.response.{key}"] = data[key]
    choices = data.get("choices") if isinstance(data.get("choices"), list) else []
    reasons = [c.get("finish_reason") for c in choices if isinstance(c, Mapping)]
    attrs["gen_ai.response.finish_reasons"] = [r if isinstance(r, str) else "" for r in reasons]
    usage = data.get("usage") if isinstance(data.get("usage"), Mapping) else {}
    for ours, theirs in (("input_tokens", "prompt_tokens"), ("output_tokens", "completion_tokens")):
        if _number(usage.get(theirs)):
            attrs[f"gen_ai.usage.{ours}"] = usage[theirs]
    return attrs


def propagation_headers() -> dict[str, str]:
    """``traceparent`` (and the other propagated fields) of the current span, for the upstream request."""
    if not available():
        return {}
    from opentelemetry import propagate

    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier


def server_address(url: str) -> dict[str, Any]:
    parsed = urlparse(url)
    attrs: dict[str, Any] = {}
    if parsed.hostname:
        attrs["server.address"] = parsed.hostname
    port = parsed.port or {"http": 80, "https": 443}.get(parsed.scheme)
    if port:
        attrs["server.port"] = port
    return attrs


# -- the request span ----------------------------------------------------------------------------------


class TracingMiddleware:
    """The SERVER span of every HTTP request, current while the app answers it (a stream's body included: an ASGI
    app returns once the last byte is sent), ended with the response's status."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        from opentelemetry import propagate, trace
        from opentelemetry.trace import SpanKind

        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope.get("headers") or []}
        method = _method(scope.get("method", ""))
        raw = _tracer().start_span(
            method,
            context=propagate.extract(headers),
            kind=SpanKind.SERVER,
            attributes=request_attributes(scope, headers),
        )
        current = Span(raw)
        status: list[int] = []

        async def send_status(message: Message) -> None:
            if message["type"] == "http.response.start":
                status.append(message["status"])
                raw.set_attribute("http.response.status_code", message["status"])
            await send(message)

        try:
            with trace.use_span(
                raw, end_on_exit=False, record_exception=False, set_status_on_exception=False
            ):
                await self.app(scope, receive, send_status)
        except BaseException as exc:
            current.fail(exc)
            raise
        else:
            if status and status[0] >= 500:
                current.fail(str(status[0]))
        finally:
            raw.end()


def request_attributes(scope: Scope, headers: Mapping[str, str]) -> dict[str, Any]:
    """The HTTP semantic-convention attributes of a request known before it is answered (no query, no body)."""
    method = scope.get("method", "")
    attrs: dict[str, Any] = {
        "http.request.method": _method(method),
        "url.path": scope.get("path", ""),
        "url.scheme": scope.get("scheme", "http"),
    }
    if _method(method) != method:
        attrs["http.request.method_original"] = method
    if scope.get("http_version"):
        attrs["network.protocol.version"] = scope["http_version"]
    host = headers.get("host")
    if host:
        name, _, port = host.rpartition(":") if host.rpartition(":")[2].isdigit() else (host, "", "")
        attrs["server.address"] = name
        if port:
            attrs["server.port"] = int(port)
    return attrs


def _method(method: str) -> str:
    return method if method in _METHODS else "_OTHER"


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


__all__ = [
    "TRACER_NAME",
    "Span",
    "TracingMiddleware",
    "annotate",
    "available",
    "flush",
    "propagation_headers",
    "request_attributes",
    "route",
    "server_address",
    "span",
    "upstream_attributes",
    "upstream_result",
]
