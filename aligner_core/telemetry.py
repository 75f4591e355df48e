"""OpenTelemetry spans for corrections, with the GenAI semantic-convention attributes (``pip install
"llm-aligner[otel]"``).

Without ``opentelemetry-api`` every helper here is a no-op that costs one ``import`` check. With it, each call of
``Aligner.correct``/``acorrect``/``correct_batch``/``acorrect_batch``/``stream``/``astream`` is one span on the
``llm-aligner`` tracer, named as the GenAI conventions name an inference span (``"text_completion {model}"``):

- ``gen_ai.operation.name`` ``text_completion``, ``gen_ai.provider.name`` ``llm-aligner``,
  ``gen_ai.request.model`` (the Aligner's name), ``gen_ai.request.max_tokens``, ``gen_ai.request.temperature``
  (sampled calls), ``gen_ai.request.stop_sequences``, ``gen_ai.request.stream``;
- ``gen_ai.usage.input_tokens`` / ``output_tokens`` and ``gen_ai.response.finish_reasons`` (summed / listed over a
  batch), ``error.type`` and an ERROR status when the call fails;
- ``aligner.engine``, ``aligner.template``, ``aligner.pairs``, ``aligner.changed`` (how many),
  ``aligner.skipped`` (the reasons answers passed through), ``aligner.context_items``.

Spans are INTERNAL for engines in this process and CLIENT for an OpenAI-compatible server (with ``server.address``
and ``server.port``). No text (questions, answers, corrections) is recorded: span attributes end up in tracing
back ends that are not meant to hold user content.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import Callable, Iterator, Sequence
from contextvars import ContextVar
from typing import Any, TypeVar
from urllib.parse import urlparse

TRACER_NAME = "llm-aligner"


def _tracer() -> Any | None:
    try:
        from opentelemetry import trace
    except ImportError:
        return None
    from .version import __version__

    return trace.get_tracer(TRACER_NAME, __version__)


@functools.lru_cache(maxsize=1)
def available() -> bool:
    """Whether ``opentelemetry-api`` is installed (the spans are no-ops otherwise)."""
    try:
        import opentelemetry.trace  # noqa: F401
    except ImportError:
        return False
    return True


def request_attributes(aligner: Any, params: Any, *, pairs: int, stream: bool = False) -> dict[str, Any]:
    """The attributes known before the call: the model, the request's generation settings, the engine."""
    attrs: dict[str, Any] = {
        "gen_ai.operation.name": "text_completion",
        "gen_ai.provider.name": "llm-aligner",
        "gen_ai.request.model": aligner.name or "aligner",
        "gen_ai.request.max_tokens": int(params.max_new_tokens),
        "gen_ai.request.stream": stream,
        "aligner.engine": aligner.engine.name,
        "aligner.template": aligner.template.name,
        "aligner.pairs": pairs,
    }
    if getattr(params, "do_sample", False) and getattr(params, "temperature", None) is not None:
        attrs["gen_ai.request.temperature"] = float(params.temperature)
    if getattr(params, "stop", ()):
        attrs["gen_ai.request.stop_sequences"] = list(params.stop)
    url = getattr(aligner.engine, "base_url", None)
    if isinstance(url, str) and url:
        parsed = urlparse(url)
        if parsed.hostname:
            attrs["server.address"] = parsed.hostname
        if parsed.port:
            attrs["server.port"] = parsed.port
    return attrs


def result_attributes(results: Sequence[Any]) -> dict[str, Any]:
    """What the call produced: token usage, finish reasons, how many changed or passed through, and why."""
    from .correction import Correction

    done = [r for r in results if isinstance(r, Correction)]
    skipped = sorted({str(r.metadata["skipped"]) for r in done if r.metadata.get("skipped")})
    attrs: dict[str, Any] = {
        "gen_ai.usage.input_tokens": sum(r.prompt_tokens for r in done),
        "gen_ai.usage.output_tokens": sum(r.completion_tokens for r in done),
        "gen_ai.response.finish_reasons": [r.finish_reason for r in done],
        "aligner.changed": sum(1 for r in done if r.changed),
        "aligner.context_items": sum(int(r.metadata.get("context_items", 0)) for r in done),
    }
    if skipped:
        attrs["aligner.skipped"] = skipped
    failed = [r for r in results if isinstance(r, BaseException)]
    if failed:
        attrs["aligner.errors"] = len(failed)
    return attrs


class Span:
    """One call's span (or nothing, without OpenTelemetry): ``finish`` records the results or the error and ends it."""

    def __init__(self, raw: Any | None) -> None:
        self.raw = raw

    def finish(self, results: Sequence[Any] = (), error: BaseException | None = None) -> None:
        if self.raw is None:
            return
        from opentelemetry.trace import Status, StatusCode

        span, self.raw = self.raw, None
        try:
            span.set_attributes(result_attributes(results))
            if error is not None:
                span.set_attribute("error.type", type(error).__qualname__)
                span.record_exception(error)
                span.set_status(Status(StatusCode.ERROR, str(error)[:500]))
        finally:
            span.end()


def start(aligner: Any, params: Any, *, pairs: int, stream: bool = False) -> Span:
    """Open the span of one call (ended by ``Span.finish``, also from another thread: streams end when they do)."""
    tracer = _tracer() if available() else None
    if tracer is None:
        return Span(None)
    from opentelemetry.trace import SpanKind

    attrs = request_attributes(aligner, params, pairs=pairs, stream=stream)
    kind = SpanKind.CLIENT if "server.address" in attrs else SpanKind.INTERNAL
    return Span(
        tracer.start_span(f"text_completion {attrs['gen_ai.request.model']}", kind=kind, attributes=attrs)
    )


#: The Aligner whose call is being traced here: its own inner calls (an inspector gate correcting the failing
#: pairs) belong to the outer span and open none of their own.
_ACTIVE: ContextVar[int | None] = ContextVar("aligner_span", default=None)


@contextlib.contextmanager
def traced(aligner: Any, params: Any, *, pairs: int) -> Iterator[list[Any]]:
    """A span around a block that appends its results to the yielded list (an exception ends it as an error).
    The span is the current one inside the block, so spans opened below it (an engine's HTTP call) nest in it."""
    results: list[Any] = []
    span = start(aligner, params, pairs=pairs) if _ACTIVE.get() != id(aligner) else Span(None)
    if span.raw is None:
        yield results
        return
    from opentelemetry import trace

    token = _ACTIVE.set(id(aligner))
    try:
        with trace.use_span(
            span.raw, end_on_exit=False, record_exception=False, set_status_on_exception=False
        ):
            yield results
    except BaseException as exc:
        span.finish(results, exc)
        raise
    finally:
        _ACTIVE.reset(token)
    span.finish(results)


def call_params(aligner: Any, options: dict[str, Any]) -> Any:
    """The generation settings a call will use, for its span (the call itself reports invalid ones)."""
    from .engines.base import GenerationParams

    known = {k: v for k, v in options.items() if k in GenerationParams.__dataclass_fields__}
    try:
        return aligner.defaults.updated(known)
    except Exception:
        return aligner.defaults


F = TypeVar("F", bound=Callable[..., Any])


def span_of(*, batch: bool) -> Callable[[F], F]:
    """Decorate an ``Aligner`` entry point (sync or async) so each call is one span."""

    def decorate(method: F) -> F:
        def size(first: Any) -> int:
            return len(first) if batch and isinstance(first, Sequence) and not isinstance(first, str) else 1

        if asyncio.iscoroutinefunction(method):

            @functools.wraps(method)
            async def acall(self: Any, first: Any, *args: Any, **kwargs: Any) -> Any:
                if not available():
                    return await method(self, first, *args, **kwargs)
                with traced(self, call_params(self, kwargs), pairs=size(first)) as results:
                    out = await method(self, first, *args, **kwargs)
                    results.extend(out if batch else [out])
                return out

            return acall  # type: ignore[return-value]

        @functools.wraps(method)
        def call(self: Any, first: Any, *args: Any, **kwargs: Any) -> Any:
            if not available():
                return method(self, first, *args, **kwargs)
            with traced(self, call_params(self, kwargs), pairs=size(first)) as results:
                out = method(self, first, *args, **kwargs)
                results.extend(out if batch else [out])
            return out

        return call  # type: ignore[return-value]

    return decorate


__all__ = [
    "TRACER_NAME",
    "Span",
    "available",
    "call_params",
    "request_attributes",
    "result_attributes",
    "span_of",
    "start",
    "traced",
]
