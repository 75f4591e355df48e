"""OpenTelemetry spans of the library's corrections, read back with the SDK's in-memory exporter."""

from __future__ import annotations

import asyncio

import pytest

pytest.importorskip("opentelemetry.sdk")

from opentelemetry import trace  # noqa: E402
from opentelemetry.sdk.trace import TracerProvider  # noqa: E402
from opentelemetry.sdk.trace.export import SimpleSpanProcessor  # noqa: E402
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter  # noqa: E402
from opentelemetry.trace import SpanKind, StatusCode  # noqa: E402

from aligner_core import Aligner, EmptyAnswerError  # noqa: E402

Q, A = "How many legs does a spider have?", "Spiders have six legs."
_EXPORTER = InMemorySpanExporter()


@pytest.fixture(scope="module", autouse=True)
def provider():
    """One SDK provider for the process (OpenTelemetry lets the global provider be set once)."""
    current = trace.get_tracer_provider()
    if not isinstance(current, TracerProvider):
        current = TracerProvider()
        trace.set_tracer_provider(current)
    current.add_span_processor(SimpleSpanProcessor(_EXPORTER))
    yield current


@pytest.fixture
def spans():
    _EXPORTER.clear()
    yield _EXPORTER
    _EXPORTER.clear()


@pytest.fixture(scope="module")
def aligner(tiny_model, tiny_tokenizer):
    a = Aligner.from_model(tiny_model, tiny_tokenizer, template="aligner-v1", name="tiny", max_new_tokens=6)
    yield a
    a.close()


def attrs(span) -> dict:
    return dict(span.attributes)


def test_one_correction_is_one_span_with_the_genai_attributes(aligner, spans):
    fix = aligner.correct(Q, A, context=["Spiders are arachnids."])
    (span,) = spans.get_finished_spans()
    a = attrs(span)
    assert span.name == "text_completion tiny" and span.kind == SpanKind.INTERNAL
    assert a["gen_ai.operation.name"] == "text_completion" and a["gen_ai.provider.name"] == "llm-aligner"
    assert a["gen_ai.request.model"] == "tiny" and a["gen_ai.request.max_tokens"] == 6
    assert (a["gen_ai.usage.input_tokens"], a["gen_ai.usage.output_tokens"]) == (
        fix.prompt_tokens,
        fix.completion_tokens,
    )
    assert a["gen_ai.response.finish_reasons"] == (fix.finish_reason,)
    assert (a["aligner.engine"], a["aligner.template"], a["aligner.pairs"]) == (
        "transformers",
        "aligner-v1",
        1,
    )
    assert a["aligner.context_items"] == 1 and a["aligner.changed"] == int(fix.changed)
    assert not any(Q in str(v) or A in str(v) for v in a.values())  # no user text in traces


def test_a_batch_is_one_span_and_an_inspector_gate_opens_no_second_one(aligner, spans):
    out = aligner.correct_batch(
        [(Q, A), (Q, "Eight."), (Q, "")],
        return_exceptions=True,
        max_new_tokens=4,
        inspector=lambda q, a: 1.0 if a == "Eight." else 0.0,
    )
    (span,) = spans.get_finished_spans()
    a = attrs(span)
    assert a["aligner.pairs"] == 3 and a["gen_ai.request.max_tokens"] == 4
    assert a["aligner.skipped"] == ("inspector_passed",) and a["aligner.errors"] == 1
    assert a["gen_ai.usage.output_tokens"] == sum(c.completion_tokens for c in out[:2])
    spans.clear()
    aligner.correct(Q, A, inspector=lambda q, a: 0.0)  # failed the gate: corrected inside the same call
    assert len(spans.get_finished_spans()) == 1


def test_async_calls_and_streams_end_their_span_when_they_end(aligner, spans):
    async def run() -> None:
        await aligner.acorrect(Q, A)
        await aligner.acorrect_batch([(Q, A)] * 2)
        stream = aligner.astream(Q, A)
        assert not [
            s for s in spans.get_finished_spans() if s.attributes["gen_ai.request.stream"]
        ]  # still open
        async for _ in stream:
            pass

    asyncio.run(run())
    stream = aligner.stream(Q, A)
    "".join(stream)
    finished = spans.get_finished_spans()
    assert [(s.attributes["aligner.pairs"], s.attributes["gen_ai.request.stream"]) for s in finished] == [
        (1, False),
        (2, False),
        (1, True),
        (1, True),
    ]
    assert all(s.attributes["gen_ai.usage.output_tokens"] > 0 for s in finished)


def test_a_failed_call_is_an_error_span(aligner, spans):
    with pytest.raises(EmptyAnswerError):
        aligner.correct(Q, "   ")
    (span,) = spans.get_finished_spans()
    assert span.status.status_code == StatusCode.ERROR and span.attributes["error.type"] == "EmptyAnswerError"
    assert span.events and span.events[0].name == "exception"


def test_spans_nest_under_the_callers_span(aligner, spans):
    tracer = trace.get_tracer("app")
    with tracer.start_as_current_span("handle request") as parent:
        aligner.correct(Q, A)
    child = next(s for s in spans.get_finished_spans() if s.name.startswith("text_completion"))
    assert child.parent is not None and child.parent.span_id == parent.get_span_context().span_id
