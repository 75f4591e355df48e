"""The proxy app in this process with a tiny real Aligner: security, limits, error statuses, response shapes,
shared batches. The upstream here is a small in-process chat server (``stub_upstream``) for the shapes the
CPU vLLM test server is not set up to produce (tool calls, error bodies echoing a key); the real vLLM
upstream and the real proxy process are in tests/integration/serve/test_serve.py."""

from __future__ import annotations

import asyncio
import json
import socket

import pytest

pytest.importorskip("starlette")
pytest.importorskip("prometheus_client")
openai = pytest.importorskip("openai")

import httpx  # noqa: E402
from openai.types.chat import ChatCompletion, ChatCompletionChunk  # noqa: E402
from starlette.applications import Starlette  # noqa: E402
from starlette.requests import Request  # noqa: E402
from starlette.responses import JSONResponse  # noqa: E402
from starlette.routing import Route  # noqa: E402

from aligner_core.decision import DETAILS, Skip  # noqa: E402
from aligner_core.inspector import Inspector  # noqa: E402
from aligner_serve import ApiKeys, ServeLimits, Upstream, build_app  # noqa: E402

KEY = "test-key-1"
AUTH = {"Authorization": f"Bearer {KEY}"}
UPSTREAM_KEY = "sk-upstream-secret-123456"
TOOL_CALL = {
    "id": "call_1",
    "type": "function",
    "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'},
}


async def _stub_chat(request: Request) -> JSONResponse:
    body = await request.json()
    assert request.headers["authorization"] == f"Bearer {UPSTREAM_KEY}"  # the upstream key, not the client's
    assert "stream" not in body
    if body.get("model") == "bad-model":
        return JSONResponse(
            {
                "error": {
                    "message": f"Incorrect API key provided: {UPSTREAM_KEY}",
                    "type": "auth",
                    "code": "invalid_api_key",
                }
            },
            status_code=401,
        )
    question = body["messages"][-1]["content"]
    if body.get("tools"):
        message = {"role": "assistant", "content": None, "tool_calls": [TOOL_CALL]}
        finish = "tool_calls"
    else:
        message = {"role": "assistant", "content": f"UNCORRECTED answer to {question}"}
        finish = "stop"
    choices = [
        {"index": i, "message": dict(message), "finish_reason": finish} for i in range(body.get("n", 1))
    ]
    return JSONResponse(
        {
            "id": "chatcmpl-stub",
            "object": "chat.completion",
            "created": 1,
            "model": body.get("model", "stub"),
            "choices": choices,
            "usage": {"prompt_tokens": 9, "completion_tokens": 6, "total_tokens": 15},
        }
    )


async def _stub_models(request: Request) -> JSONResponse:
    return JSONResponse(
        {
            "object": "list",
            "data": [
                {
                    "id": "stub-model",
                    "object": "model",
                    "created": 5,
                    "owned_by": "stub",
                    "max_model_len": 4096,
                    "root": "/models/stub",
                }
            ],
        }
    )


stub_upstream = Starlette(
    routes=[
        Route("/v1/chat/completions", _stub_chat, methods=["POST"]),
        Route("/v1/models", _stub_models, methods=["GET"]),
    ]
)


def limit_for(aligner, answer: str) -> int:
    """The correction limit the proxy gives ``answer``: room to restate it, never below the Aligner's default."""
    from aligner_serve.budget import restating

    return max(
        aligner.defaults.max_new_tokens,
        restating(len(aligner.engine.encode(answer, add_special_tokens=False))),
    )


@pytest.fixture
def proxy(tiny_aligner):
    upstream = Upstream(
        "http://upstream.test/v1",
        model="stub-model",
        api_key=UPSTREAM_KEY,
        transport=httpx.ASGITransport(stub_upstream),
    )
    limits = ServeLimits(max_body_bytes=4096, max_queue=8, max_batch_items=4, correction_timeout=60)
    app = build_app(
        tiny_aligner,
        upstream,
        api_keys=ApiKeys([KEY, "other-key"]),
        limits=limits,
        served_model="aligned-stub",
    )
    yield app
    asyncio.run(upstream.aclose())
    tiny_aligner.close()


def call(app, method, path, *, headers=AUTH, **kwargs):
    async def go():
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app), base_url="http://proxy.test"
        ) as client:
            return await client.request(method, path, headers=headers, **kwargs)

    return asyncio.run(go())


def chat(app, content="What is 2 + 2?", **body):
    return call(
        app,
        "POST",
        "/v1/chat/completions",
        json={"model": "m", "messages": [{"role": "user", "content": content}], "max_tokens": 6, **body},
    )


@pytest.mark.parametrize(
    "path, method",
    [
        ("/v1/chat/completions", "POST"),
        ("/v1/corrections", "POST"),
        ("/v1/models", "GET"),
        ("/health", "GET"),
        ("/metrics", "GET"),
        ("/no/such/path", "GET"),
    ],
)
@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}])
def test_every_request_needs_a_valid_key(proxy, path, method, headers):
    resp = call(proxy, method, path, headers=headers, content=b"{}")
    assert resp.status_code == 401 and resp.headers["www-authenticate"] == "Bearer"
    assert resp.json()["error"]["code"] == "invalid_api_key"


def test_either_key_and_x_api_key_are_accepted(proxy):
    assert call(proxy, "GET", "/health", headers={"Authorization": "Bearer other-key"}).status_code == 200
    models = call(proxy, "GET", "/v1/models", headers={"X-API-Key": KEY}).json()["data"]
    assert [m["id"] for m in models] == [
        "aligned-stub",
        "stub-model",
    ]  # the served name, then the upstream's own
    assert (
        models[0]["max_model_len"] == 4096 and models[0]["root"] == "/models/stub"
    )  # the upstream's fields kept


def test_a_body_over_the_limit_is_413_declared_or_streamed(proxy):
    big = json.dumps({"messages": [{"role": "user", "content": "x" * 5000}]}).encode()
    assert call(proxy, "POST", "/v1/chat/completions", content=big).status_code == 413

    async def chunks():  # no Content-Length: the cap applies while reading
        for i in range(0, len(big), 1000):
            yield big[i : i + 1000]

    resp = call(proxy, "POST", "/v1/corrections", content=chunks())
    assert resp.status_code == 413 and resp.json()["error"]["code"] == "request_too_large"


@pytest.mark.parametrize(
    "content, code",
    [(b"{not json", "invalid_json"), (b"\xff\xfe", "invalid_json"), (b'{"messages": "hi"}', None)],
)
def test_malformed_requests_are_400(proxy, content, code):
    resp = call(proxy, "POST", "/v1/chat/completions", content=content)
    assert resp.status_code == 400 and resp.json()["error"]["type"] == "invalid_request_error"
    assert resp.json()["error"]["code"] == code


def test_a_chat_completion_carries_the_correction_and_parses_in_the_official_client(proxy, tiny_aligner):
    resp = chat(proxy)
    assert resp.status_code == 200
    data = resp.json()
    parsed = ChatCompletion.model_validate(data)
    original = "UNCORRECTED answer to What is 2 + 2?"
    expected = tiny_aligner.correct(
        "What is 2 + 2?", original, max_new_tokens=limit_for(tiny_aligner, original)
    )
    assert parsed.choices[0].message.content == expected.text
    assert data["aligner"]["original"] == original and data["aligner"]["changed"] == expected.changed
    assert (
        data["aligner"]["template"] == "aligner-v1"
        and data["choices"][0]["finish_reason"] == expected.finish_reason
    )
    choice = data["choices"][0]["aligner"]
    assert choice["usage"] == {
        "prompt_tokens": expected.prompt_tokens,
        "completion_tokens": expected.completion_tokens,
    }
    top = {k: v for k, v in data["aligner"].items() if k != "upstream_usage"}
    assert top == {**choice, "usage": {**choice["usage"], "total_tokens": sum(choice["usage"].values())}}
    assert choice["upstream_finish_reason"] == "stop"
    tokens = (
        expected.completion_tokens
    )  # usage counts what the client got: the correction, after the upstream's prompt
    assert data["usage"] == {"prompt_tokens": 9, "completion_tokens": tokens, "total_tokens": 9 + tokens}
    assert data["aligner"]["upstream_usage"] == {
        "prompt_tokens": 9,
        "completion_tokens": 6,
        "total_tokens": 15,
    }
    assert data["aligner"]["usage"]["completion_tokens"] == tokens


def test_each_of_n_choices_is_corrected(proxy):
    data = chat(proxy, n=2).json()
    assert [c["aligner"]["corrected"] for c in data["choices"]] == [True, True]


def test_a_stream_carries_only_corrected_text(proxy, tiny_aligner):
    resp = chat(proxy, content="Name a colour.", stream=True, stream_options={"include_usage": True})
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
    assert "UNCORRECTED" not in resp.text
    events = [line.removeprefix("data: ") for line in resp.text.split("\n\n") if line]
    assert events[-1] == "[DONE]"
    chunks = [ChatCompletionChunk.model_validate(json.loads(e)) for e in events[:-1]]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    final = next(c for c in chunks if c.choices and c.choices[0].finish_reason)
    assert "original" not in final.model_extra["aligner"] and final.model_extra["aligner"]["corrected"]
    original = "UNCORRECTED answer to Name a colour."
    expected = tiny_aligner.correct(
        "Name a colour.", original, max_new_tokens=limit_for(tiny_aligner, original)
    )
    assert text == expected.text and final.choices[0].finish_reason == expected.finish_reason
    assert (
        chunks[-1].usage.completion_tokens == expected.completion_tokens
        and chunks[-1].usage.prompt_tokens == 9
    )
    assert chunks[-1].model_extra["aligner"]["upstream_usage"]["total_tokens"] == 15


def test_tool_calls_pass_through_uncorrected_and_say_so(proxy):
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    data = chat(proxy, tools=tools).json()
    assert data["choices"][0]["message"]["tool_calls"] == [TOOL_CALL]
    assert data["choices"][0]["finish_reason"] == "tool_calls"
    assert data["choices"][0]["aligner"] == {
        "corrected": False,
        "skipped": "tool_calls",
        "skipped_detail": DETAILS[Skip.TOOL_CALLS],
        "upstream_finish_reason": "tool_calls",
    }
    assert (
        data["usage"] == data["aligner"]["upstream_usage"]
    )  # nothing replaced: the upstream's usage as it came
    assert data["aligner"]["usage"]["total_tokens"] == 0
    resp = chat(proxy, tools=tools, stream=True)
    chunks = [
        ChatCompletionChunk.model_validate(json.loads(e.removeprefix("data: ")))
        for e in resp.text.split("\n\n")
        if e and e != "data: [DONE]"
    ]
    assert chunks[0].choices[0].delta.tool_calls[0].function.name == "get_weather"
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_upstream_errors_keep_their_status_and_never_echo_the_upstream_key(proxy):
    resp = chat(proxy, model="bad-model")
    assert resp.status_code == 401 and UPSTREAM_KEY not in resp.text and "sk-upstre" not in resp.text
    assert resp.json()["error"]["code"] == "invalid_api_key"


def test_an_unreachable_upstream_is_502(tiny_aligner):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    upstream = Upstream(f"http://127.0.0.1:{port}/v1", model="m", max_retries=1)
    app = build_app(tiny_aligner, upstream)
    resp = call(app, "POST", "/v1/chat/completions", json={"messages": [{"role": "user", "content": "q"}]})
    assert resp.status_code == 502 and "cannot connect" in resp.json()["error"]["message"]
    asyncio.run(upstream.aclose())


def test_past_the_queue_limit_requests_get_429_with_retry_after(proxy):
    gate = proxy.state.proxy.admission
    assert gate.try_acquire(8)  # the queue is full of requests in progress
    resp = chat(proxy)
    assert resp.status_code == 429 and int(resp.headers["retry-after"]) >= 1
    assert resp.json()["error"]["code"] == "queue_full"
    gate.release(8)
    assert chat(proxy).status_code == 200
    metrics = call(proxy, "GET", "/metrics").text
    assert "aligner_serve_rejected_total 1.0" in metrics


def test_corrections_one_and_a_batch_with_per_item_errors(proxy, tiny_aligner):
    one = call(
        proxy, "POST", "/v1/corrections", json={"question": "Q?", "answer": "An answer.", "max_new_tokens": 5}
    )
    assert one.status_code == 200
    assert one.json()["text"] == tiny_aligner.correct("Q?", "An answer.", max_new_tokens=5).text
    assert one.json()["template"] == "aligner-v1" and one.json()["original"] == "An answer."
    batch = call(
        proxy,
        "POST",
        "/v1/corrections",
        json={
            "items": [
                {"question": "Q1?", "answer": "A1."},
                {"question": "Q2?", "answer": "   "},
                {
                    "question": "Q3?",
                    "answer": "A3.",
                    "history": [
                        {"role": "user", "content": "Hi"},
                        {"role": "assistant", "content": "Hello."},
                    ],
                },
            ],
            "max_new_tokens": 5,
        },
    )
    items = batch.json()["items"]
    assert batch.status_code == 200 and [i.get("original") for i in items] == ["A1.", None, "A3."]
    assert items[1]["status"] == 400 and "empty" in items[1]["error"]["message"]
    assert items[2]["metadata"]["history_turns"] == 2
    too_many = call(proxy, "POST", "/v1/corrections", json={"items": [{"question": "q", "answer": "a"}] * 5})
    assert too_many.status_code == 413 and too_many.json()["error"]["code"] == "too_many_items"
    for bad in (
        {"question": "q"},
        {"items": []},
        {"question": "q", "answer": "a", "history": "x"},
        {"question": "q", "answer": "a", "max_new_tokens": 0},
    ):
        assert call(proxy, "POST", "/v1/corrections", json=bad).status_code == 400, bad


def test_a_malformed_batch_item_is_that_items_error_only(proxy, tiny_aligner):
    """Row 9 of issue 22: one malformed item used to fail the whole batch with 400."""
    batch = call(
        proxy,
        "POST",
        "/v1/corrections",
        json={
            "items": [
                {"question": "Q1?", "answer": "A1."},
                "x",
                {"question": "Q3?", "answer": "A3.", "context": 7},
                {"question": "Q4?", "answer": "A4."},
            ]
        },
    )
    assert batch.status_code == 200
    items = batch.json()["items"]
    assert [i.get("status") for i in items] == [None, 400, 400, None]
    assert [i["error"]["param"] for i in items[1:3]] == ["items[1]", "items[2].context"]
    limit = limit_for(tiny_aligner, "A4.")  # no max_new_tokens: room to restate the answer
    assert items[3]["text"] == tiny_aligner.correct("Q4?", "A4.", max_new_tokens=limit).text
    assert proxy.state.proxy.admission.active == 0


def test_chat_history_reaches_the_aligner(proxy):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "And 2 + 2?"},
    ]
    data = call(proxy, "POST", "/v1/chat/completions", json={"messages": messages, "max_tokens": 4}).json()
    assert data["aligner"]["history_turns"] == 3


def test_concurrent_requests_share_batches(proxy, tiny_aligner):
    async def go():
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(proxy), base_url="http://proxy.test"
        ) as client:
            return await asyncio.gather(
                *(
                    client.post(
                        "/v1/corrections",
                        headers=AUTH,
                        json={"question": f"Question {i}?", "answer": f"Answer {i}.", "max_new_tokens": 4},
                    )
                    for i in range(8)
                )
            )

    before = tiny_aligner.engine.scheduler.batches_run
    out = asyncio.run(go())
    assert [r.json()["original"] for r in out] == [f"Answer {i}." for i in range(8)]
    assert tiny_aligner.engine.scheduler.batches_run - before < 8


def test_health_models_and_metrics(proxy):
    health = call(proxy, "GET", "/health").json()
    assert health["status"] == "ok" and health["queue_limit"] == 8 and health["template"] == "aligner-v1"
    chat(proxy)
    call(proxy, "GET", "/health", headers={})
    metrics = call(proxy, "GET", "/metrics")
    assert metrics.headers["content-type"].startswith("text/plain")
    text = metrics.text
    for line in (
        'aligner_serve_requests_total{endpoint="/v1/chat/completions",status="200"} 1.0',
        'aligner_serve_requests_total{endpoint="/health",status="401"} 1.0',
        'aligner_serve_tokens_total{kind="prompt",source="upstream"} 9.0',
        "aligner_serve_changed_share",
        "aligner_serve_request_latency_seconds_bucket",
        "aligner_serve_correction_latency_seconds_count 1.0",
        'source="aligner"',
    ):
        assert line in text, line
    assert KEY not in text and UPSTREAM_KEY not in text


def test_limits_are_checked():
    with pytest.raises(ValueError, match="max_batch_items"):
        ServeLimits(max_queue=2, max_batch_items=4)
    with pytest.raises(ValueError, match="max_queue"):
        ServeLimits(max_queue=0)


def test_an_inspector_lets_passing_answers_through_without_generation(proxy, tiny_aligner):
    """With the Aligner's inspector set (``aligner serve --inspector``), the response says what it decided."""
    tiny_aligner.inspector, tiny_aligner.threshold = Inspector(lambda q, a: 0.9 if "2 + 2" in q else 0.1), 0.5
    passed = chat(proxy).json()
    assert passed["choices"][0]["message"]["content"] == "UNCORRECTED answer to What is 2 + 2?"
    assert passed["aligner"]["inspector"] == {"score": 0.9, "threshold": 0.5, "passed": True}
    assert passed["aligner"]["corrected"] is False and passed["aligner"]["skipped"] == "inspector_passed"
    assert passed["aligner"]["usage"]["completion_tokens"] == 0 and passed["aligner"]["changed"] is False
    failed = chat(proxy, content="What is 3 + 3?").json()
    assert (
        failed["aligner"]["inspector"]["passed"] is False
        and failed["aligner"]["usage"]["completion_tokens"] > 0
    )
    assert failed["aligner"]["corrected"] is True and "skipped" not in failed["aligner"]
    assert 'aligner_serve_skipped_total{reason="inspector_passed"} 1.0' in call(proxy, "GET", "/metrics").text


@pytest.mark.parametrize("flag, expected", [([], False), (["--correct-structured"], True)])
def test_the_cli_flag_sets_whether_structured_output_is_corrected(tiny_aligner, monkeypatch, flag, expected):
    """``aligner serve --correct-structured`` reaches the app (the model load and uvicorn are stood in for)."""
    from typer.testing import CliRunner

    from aligner_core.cli import app as cli
    from aligner_core.jobs.choice import EngineChoice
    from aligner_serve import http_server

    served = {}
    monkeypatch.setattr(EngineChoice, "load", lambda self, **kwargs: tiny_aligner)
    monkeypatch.setattr(http_server, "run", lambda app, **kwargs: served.update(app=app))
    run = CliRunner().invoke(cli, ["serve", "--upstream", "http://127.0.0.1:9/v1", *flag])
    assert run.exit_code == 0, run.output
    assert served["app"].state.proxy.correct_structured is expected
