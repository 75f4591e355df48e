"""OpenTelemetry spans of the proxy, read back with the SDK's in-memory exporter on the in-process app: a SERVER span
per request with the HTTP conventions, joined to the caller's trace; below it the admission, the upstream call (a
CLIENT span with the GenAI conventions, its context sent upstream) and the library's own correction span, streamed
choices included; no user text anywhere."""

from __future__ import annotations

import asyncio
import socket

import pytest

pytest.importorskip("opentelemetry.sdk")
pytest.importorskip("starlette")
pytest.importorskip("prometheus_client")

from opentelemetry import trace  # noqa: E402
from opentelemetry.sdk.trace import TracerProvider  # noqa: E402
from opentelemetry.sdk.trace.export import SimpleSpanProcessor  # noqa: E402
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter  # noqa: E402
from opentelemetry.trace import SpanKind, StatusCode  # noqa: E402

from aligner_core.inspector import Inspector  # noqa: E402
from aligner_serve import ServeLimits, Upstream, build_app  # noqa: E402
from tests.unit.serve.test_serve_modes import QUESTION, Upstream_, call, chat, events, make_app, score  # noqa: E402

_EXPORTER = InMemorySpanExporter()
TRACE_ID, PARENT_ID = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"


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


@pytest.fixture
def upstream():
    return Upstream_()


@pytest.fixture
def app(tiny_aligner, upstream):
    tiny_aligner.inspector, tiny_aligner.threshold = Inspector(score), 0.5
    yield make_app(tiny_aligner, upstream)
    tiny_aligner.close()


def named(spans, prefix: str) -> list:
    return [s for s in spans.get_finished_spans() if s.name.startswith(prefix)]


def no_user_text(spans, *texts: str) -> None:
    for s in spans.get_finished_spans():
        for value in s.attributes.values():
            assert not any(t in str(value) for t in texts), (s.name, value)


def test_a_request_is_a_server_span_with_the_admission_the_upstream_call_and_the_correction_below(
    app, upstream, spans
):
    resp = chat(
        app, n=2, max_tokens=7, temperature=0.5
    )  # choice 0 passes the inspector gate, choice 1 is corrected
    assert resp.status_code == 200
    (server,) = named(spans, "POST /v1/chat/completions")
    a = dict(server.attributes)
    assert server.kind == SpanKind.SERVER and server.parent is None
    assert (a["http.request.method"], a["http.route"], a["http.response.status_code"]) == (
        "POST",
        "/v1/chat/completions",
        200,
    )
    assert (a["url.path"], a["url.scheme"], a["server.address"], a["aligner.mode"], a["aligner.key"]) == (
        "/v1/chat/completions",
        "http",
        "proxy.test",
        "correct",
        "web",
    )
    (admission,) = named(spans, "aligner.admission")
    assert (
        admission.attributes["aligner.queue.places"] == 2 and admission.attributes["aligner.queue.admitted"]
    )
    (client,) = named(spans, "chat up")
    c = dict(client.attributes)
    assert client.kind == SpanKind.CLIENT and c["gen_ai.operation.name"] == "chat"
    assert (c["gen_ai.request.model"], c["gen_ai.request.max_tokens"], c["gen_ai.request.temperature"]) == (
        "up",
        7,
        0.5,
    )
    assert (c["gen_ai.usage.input_tokens"], c["gen_ai.usage.output_tokens"]) == (5, 4)
    assert c["gen_ai.response.finish_reasons"] == ("stop", "stop") and c["gen_ai.response.id"] == "chatcmpl-x"
    assert (c["server.address"], c["server.port"], c["gen_ai.request.choice.count"]) == (
        "upstream.test",
        80,
        2,
    )
    corrections = named(spans, "text_completion")
    assert len(corrections) == 2  # one per choice: choice 0's ended at the gate, choice 1's generated
    for child in (admission, client, *corrections):
        assert child.parent is not None and child.parent.span_id == server.context.span_id
        assert child.context.trace_id == server.context.trace_id
    sent = upstream.headers[-1]["traceparent"]  # the upstream call's context went upstream
    assert sent.split("-")[1:3] == [f"{client.context.trace_id:032x}", f"{client.context.span_id:016x}"]
    no_user_text(spans, QUESTION, "Answer 0", "Answer 1", "strict")  # nor the API key


def test_a_callers_traceparent_joins_its_trace(app, spans):
    chat(app, headers={"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01"})
    (server,) = named(spans, "POST /v1/chat/completions")
    assert f"{server.context.trace_id:032x}" == TRACE_ID and f"{server.parent.span_id:016x}" == PARENT_ID


def test_streamed_corrections_nest_under_the_request_span_which_ends_with_the_stream(app, spans):
    events(chat(app, n=2, stream=True, headers={"x-aligner-mode": "correct"}))
    (server,) = named(spans, "POST /v1/chat/completions")
    corrections = named(spans, "text_completion")
    assert len(corrections) == 2 and all(s.attributes["gen_ai.request.stream"] for s in corrections)
    assert all(
        s.parent.span_id == server.context.span_id for s in corrections
    )  # choice 1 streams after the head
    assert server.end_time >= max(s.end_time for s in corrections)


def test_inspect_mode_and_refusals_are_spans_too(app, spans):
    chat(app, key="inspect")
    (server,) = named(spans, "POST /v1/chat/completions")
    (inspect,) = named(spans, "aligner.inspect")
    assert inspect.parent.span_id == server.context.span_id and server.attributes["aligner.mode"] == "inspect"
    assert inspect.attributes["aligner.inspector.passed"] == 1 and not named(spans, "text_completion")
    spans.clear()
    assert chat(app, key="nope").status_code == 401
    (refused,) = spans.get_finished_spans()
    assert refused.name == "POST" and refused.attributes["http.response.status_code"] == 401
    assert refused.status.status_code == StatusCode.UNSET and "http.route" not in refused.attributes
    spans.clear()
    assert chat(app, headers={"x-aligner-mode": "off"}).status_code == 403
    assert [s.attributes.get("http.response.status_code") for s in spans.get_finished_spans()] == [403]


def test_an_upstream_failure_marks_both_spans(tiny_aligner, spans):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    upstream = Upstream(f"http://127.0.0.1:{port}/v1", model="m", max_retries=0)
    app = build_app(tiny_aligner, upstream, limits=ServeLimits(max_queue=4))
    assert (
        call(
            app,
            "POST",
            "/v1/chat/completions",
            key=None,
            json={"messages": [{"role": "user", "content": "q"}]},
        ).status_code
        == 502
    )
    (server,) = named(spans, "POST /v1/chat/completions")
    (client,) = named(spans, "chat")
    assert server.status.status_code == StatusCode.ERROR and server.attributes["error.type"] == "502"
    assert client.status.status_code == StatusCode.ERROR
    assert (
        client.attributes["error.type"] == "UpstreamUnavailableError"
        and client.parent.span_id == server.context.span_id
    )
    asyncio.run(upstream.aclose())
