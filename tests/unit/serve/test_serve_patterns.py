"""What ``aligner serve`` corrects, pattern by pattern, on the in-process app with a tiny real Aligner: the core's
decision per upstream choice (structured output, tool calls, refusals, lists of text parts, unreadable content),
the request's tool turns as the correction's context (checked on the prompt the engine receives), and streams
that never carry uncorrected text. The upstream is a scripted in-process chat server: each request gets the next
scripted message, so the tests choose the exact shapes real servers send; the real vLLM upstream and a real proxy
process are in tests/integration/serve/test_serve_patterns.py."""

from __future__ import annotations

import asyncio
import json
from collections import deque
from typing import Any

import pytest

pytest.importorskip("starlette")
pytest.importorskip("prometheus_client")
openai = pytest.importorskip("openai")

import httpx  # noqa: E402
from openai.types.chat import ChatCompletionChunk  # noqa: E402
from pydantic import BaseModel  # noqa: E402
from starlette.applications import Starlette  # noqa: E402
from starlette.requests import Request  # noqa: E402
from starlette.responses import JSONResponse  # noqa: E402
from starlette.routing import Route  # noqa: E402

from aligner_core.decision import DETAILS, Skip  # noqa: E402
from aligner_core.engines.base import GenerationOutput  # noqa: E402
from aligner_serve import ServeLimits, Upstream, build_app  # noqa: E402
from tests.unit.serve.test_serve_app import limit_for  # noqa: E402

QUESTION = "What is the weather in Paris?"
TOOL_CALL = {
    "id": "call_7",
    "type": "function",
    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
}
SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "temp_c": {"type": "integer"}},
    "required": ["city", "temp_c"],
    "additionalProperties": False,
}
SCHEMA_FORMAT = {"type": "json_schema", "json_schema": {"name": "weather", "schema": SCHEMA, "strict": True}}
VALID = '{"city": "Paris", "temp_c": 21}'


class ScriptedUpstream:
    """An in-process chat server: each request gets the next scripted message (a plain answer when none is left)
    and its body is kept, so a test sees exactly what the proxy forwarded."""

    def __init__(self) -> None:
        self.replies: deque[dict[str, Any]] = deque()
        self.bodies: list[dict[str, Any]] = []
        self.app = Starlette(routes=[Route("/v1/chat/completions", self._chat, methods=["POST"])])

    def reply(self, content: Any = None, **message: Any) -> None:
        self.replies.append({"role": "assistant", "content": content, **message})

    async def _chat(self, request: Request) -> JSONResponse:
        body = await request.json()
        self.bodies.append(body)
        n = body.get("n", 1)
        scripted = [
            self.replies.popleft() if self.replies else {"role": "assistant", "content": "A plain answer."}
            for _ in range(n)
        ]
        choices = [
            {"index": i, "message": m, "finish_reason": "tool_calls" if m.get("tool_calls") else "stop"}
            for i, m in enumerate(scripted)
        ]
        return JSONResponse(
            {
                "id": "chatcmpl-scripted",
                "object": "chat.completion",
                "created": 1,
                "model": "up",
                "choices": choices,
                "usage": {"prompt_tokens": 9, "completion_tokens": 6, "total_tokens": 15},
            }
        )


class EngineRecorder:
    """Wraps the Aligner's engine: records every request it gets (``prompt``, ``messages``); with ``text`` set,
    answers with that text instead of generating (to make a correction valid or invalid JSON on purpose)."""

    def __init__(self, engine: Any, monkeypatch: pytest.MonkeyPatch) -> None:
        self.requests: list[Any] = []
        self.text: str | None = None
        real_agenerate, real_astream = engine.agenerate, engine.astream

        async def agenerate(request, params):
            self.requests.append(request)
            if self.text is not None:
                return GenerationOutput(self.text, 5, "stop", 0.0)
            return await real_agenerate(request, params)

        async def astream(request, params, on_text):
            self.requests.append(request)
            if self.text is not None:
                on_text(self.text)
                return GenerationOutput(self.text, 5, "stop", 0.0)
            return await real_astream(request, params, on_text)

        monkeypatch.setattr(engine, "agenerate", agenerate)
        monkeypatch.setattr(engine, "astream", astream)

    @property
    def prompts(self) -> list[str]:
        return [r.prompt or json.dumps(r.messages) for r in self.requests]


@pytest.fixture
def upstream():
    return ScriptedUpstream()


@pytest.fixture
def recorder(tiny_aligner, monkeypatch):
    return EngineRecorder(tiny_aligner.engine, monkeypatch)


def make_app(aligner, scripted: ScriptedUpstream, **options: Any):
    up = Upstream("http://upstream.test/v1", transport=httpx.ASGITransport(scripted.app))
    return build_app(
        aligner,
        up,
        limits=ServeLimits(max_queue=8, max_batch_items=4, correction_timeout=60),
        close_aligner=False,
        **options,
    ), up


@pytest.fixture
def app(tiny_aligner, upstream, recorder):
    application, up = make_app(tiny_aligner, upstream)
    yield application
    asyncio.run(up.aclose())


def post(app, path: str, body: dict[str, Any]) -> httpx.Response:
    async def go():
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app), base_url="http://proxy.test"
        ) as client:
            return await client.post(path, json=body)

    return asyncio.run(go())


def chat(app, messages: list[dict[str, Any]] | None = None, **body: Any) -> httpx.Response:
    messages = messages or [{"role": "user", "content": QUESTION}]
    return post(app, "/v1/chat/completions", {"model": "m", "messages": messages, "max_tokens": 6, **body})


def events(resp: httpx.Response) -> tuple[list[ChatCompletionChunk], str]:
    """The chunks of an SSE response (each validated by the official client's type) and the text they carry."""
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream"), resp.text
    raw = [e.removeprefix("data: ") for e in resp.text.split("\n\n") if e]
    assert raw[-1] == "[DONE]", raw[-1]
    chunks = [ChatCompletionChunk.model_validate(json.loads(e)) for e in raw[:-1]]
    return chunks, "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def final_details(chunks: list[ChatCompletionChunk]) -> dict[str, Any]:
    return next(c for c in chunks if c.choices and c.choices[0].finish_reason).model_extra["aligner"]


# -- structured output -----------------------------------------------------------------------------------------


def test_json_mode_and_schema_answers_pass_through_unchanged_by_default(app, upstream, recorder):
    upstream.reply('{"colour": "blue"}')
    data = chat(app, response_format={"type": "json_object"}).json()
    assert data["choices"][0]["message"]["content"] == '{"colour": "blue"}'
    assert data["choices"][0]["aligner"] == {
        "corrected": False,
        "skipped": "structured_output",
        "skipped_detail": DETAILS[Skip.STRUCTURED_OUTPUT],
        "structured": "json",
        "upstream_finish_reason": "stop",
    }
    assert (
        data["usage"] == data["aligner"]["upstream_usage"]
    )  # passed through: the upstream's usage as it came
    upstream.reply(VALID)
    chunks, text = events(chat(app, response_format=SCHEMA_FORMAT, stream=True))
    assert text == VALID and final_details(chunks)["skipped"] == "structured_output"
    assert final_details(chunks)["structured"] == "json_schema"
    assert recorder.requests == []  # nothing went to the Aligner


def test_the_openai_sdk_parse_gets_its_object_through_the_proxy(app, upstream):
    class Weather(BaseModel):
        city: str
        temp_c: int

    upstream.reply(VALID)

    async def go():
        http = httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://proxy.test")
        async with openai.AsyncOpenAI(
            base_url="http://proxy.test/v1", api_key="x", http_client=http
        ) as client:
            return await client.chat.completions.parse(
                model="m", messages=[{"role": "user", "content": QUESTION}], response_format=Weather
            )

    resp = asyncio.run(go())
    assert resp.choices[0].message.parsed == Weather(city="Paris", temp_c=21)
    assert upstream.bodies[-1]["response_format"]["type"] == "json_schema"  # forwarded as the SDK sent it


@pytest.mark.parametrize("stream", [False, True])
def test_opted_in_a_valid_corrected_json_is_kept(app, upstream, recorder, stream):
    upstream.reply('{"city": "paris", "temp_c": 21}')
    recorder.text = " " + VALID + "\n"
    resp = chat(app, response_format=SCHEMA_FORMAT, stream=stream, aligner={"correct_structured": True})
    if stream:
        chunks, text = events(resp)
        details = final_details(chunks)
        assert (
            len([c for c in chunks if c.choices and c.choices[0].delta.content]) == 1
        )  # checked, then sent whole
    else:
        details = resp.json()["aligner"]
        text = resp.json()["choices"][0]["message"]["content"]
        assert details["original"] == '{"city": "paris", "temp_c": 21}'
    assert text == VALID and details["corrected"] is True and details["structured"] == "json_schema"
    assert "aligner" not in upstream.bodies[-1]  # the proxy's own field never goes upstream
    assert len(recorder.requests) == 1


@pytest.mark.parametrize("stream", [False, True])
def test_opted_in_an_invalid_correction_gives_back_the_original_with_the_reason(
    app, upstream, recorder, stream
):
    upstream.reply(VALID)
    recorder.text = '{"city": "Paris", "temp_c": "warm"}'  # JSON, but not valid against the schema
    resp = chat(app, response_format=SCHEMA_FORMAT, stream=stream, aligner={"correct_structured": True})
    if stream:
        chunks, text = events(resp)
        details = final_details(chunks)
    else:
        details, text = resp.json()["aligner"], resp.json()["choices"][0]["message"]["content"]
    assert (
        text == VALID and details["corrected"] is False and details["skipped"] == "structured_output_invalid"
    )
    assert (
        "'warm' is not of type 'integer'" in details["invalid_reason"]
        and details["usage"]["completion_tokens"] == 5
    )
    json.loads(text)  # whatever happened, the client gets JSON that parses


def test_the_server_flag_corrects_structured_output_and_a_request_can_decline(
    tiny_aligner, upstream, recorder
):
    app, up = make_app(tiny_aligner, upstream, correct_structured=True)
    try:
        recorder.text = VALID
        upstream.reply('{"city": "Paris", "temp_c": 20}')
        assert chat(app, response_format=SCHEMA_FORMAT).json()["choices"][0]["message"]["content"] == VALID
        upstream.reply('{"city": "Paris", "temp_c": 20}')
        declined = chat(app, response_format=SCHEMA_FORMAT, aligner={"correct_structured": False}).json()
        assert declined["aligner"]["skipped"] == "structured_output" and len(recorder.requests) == 1
        upstream.reply("blue")  # a regex/choice answer cannot be checked: it always passes
        regex = chat(app, structured_outputs={"choice": ["red", "blue"]}).json()
        assert (
            regex["aligner"]["skipped"] == "structured_output" and regex["aligner"]["structured"] == "choice"
        )
        assert len(recorder.requests) == 1
    finally:
        asyncio.run(up.aclose())


@pytest.mark.parametrize(
    "options, says",
    [
        ("yes", "must be an object"),
        ({"correct_structure": True}, "unknown"),
        ({"correct_structured": "yes"}, "true or false"),
    ],
)
def test_bad_aligner_options_are_400(app, options, says):
    resp = chat(app, aligner=options)
    assert resp.status_code == 400 and says in resp.json()["error"]["message"]
    assert resp.json()["error"]["param"].startswith("aligner")


# -- tool calls, refusals, empty and non-text answers --------------------------------------------------------


def test_a_refusal_passes_through_with_its_reason(app, upstream, recorder):
    upstream.reply(None, refusal="I can't help with that.")
    data = chat(app).json()
    assert data["choices"][0]["message"]["refusal"] == "I can't help with that."
    assert data["aligner"]["skipped"] == "refusal" and recorder.requests == []
    upstream.reply(None, refusal="I can't help with that.")
    chunks, _ = events(chat(app, stream=True))
    assert chunks[0].choices[0].delta.refusal == "I can't help with that."
    assert final_details(chunks)["skipped"] == "refusal"


def test_tool_calls_stream_as_the_upstream_sent_them(app, upstream, recorder):
    upstream.reply("Let me check.", tool_calls=[TOOL_CALL])
    chunks, text = events(chat(app, stream=True))
    assert chunks[0].choices[0].delta.tool_calls[0].function.arguments == '{"city": "Paris"}'
    assert final_details(chunks) == {
        "corrected": False,
        "skipped": "tool_calls",
        "skipped_detail": DETAILS[Skip.TOOL_CALLS],
        "upstream_finish_reason": "tool_calls",
    }
    assert chunks[-1].choices[0].finish_reason == "tool_calls" and recorder.requests == []


@pytest.mark.parametrize(
    "content, reason",
    [
        ("  ", "empty_answer"),
        (None, "empty_answer"),
        ([{"type": "image_url", "image_url": {"url": "x"}}], "non_text_content"),
    ],
)
def test_answers_without_text_pass_through(app, upstream, content, reason):
    upstream.reply(content)
    data = chat(app).json()
    assert data["aligner"]["skipped"] == reason and data["choices"][0]["message"]["content"] == content


# -- content as a list of text parts, and content the Aligner cannot read --------------------------------------


PARTS = [
    {"type": "text", "text": "It is sunny "},
    {"type": "image_url", "image_url": {"url": "https://x/y.png"}},
    {"type": "text", "text": "and 21C in Paris."},
]


def test_a_list_of_text_parts_is_corrected_as_its_text_and_keeps_its_shape(
    app, upstream, recorder, tiny_aligner
):
    upstream.reply(PARTS)
    data = chat(app).json()
    expected = tiny_aligner.correct(
        QUESTION,
        "It is sunny and 21C in Paris.",
        max_new_tokens=limit_for(tiny_aligner, "It is sunny and 21C in Paris."),
    )
    content = data["choices"][0]["message"]["content"]
    assert content == [{"type": "text", "text": expected.text}, PARTS[1]]  # the image stays where it was
    assert (
        data["aligner"]["corrected"] is True
        and data["aligner"]["original"] == "It is sunny and 21C in Paris."
    )
    assert data["aligner"]["non_text_parts"] == 1
    assert "It is sunny and 21C in Paris." in recorder.prompts[0]


def test_a_streamed_list_of_text_parts_carries_only_corrected_text(app, upstream, recorder, tiny_aligner):
    upstream.reply(
        [{"type": "text", "text": "UNCORRECTED one. "}, {"type": "text", "text": "UNCORRECTED two."}]
    )
    resp = chat(app, stream=True)
    chunks, text = events(resp)
    original = "UNCORRECTED one. UNCORRECTED two."
    expected = tiny_aligner.correct(QUESTION, original, max_new_tokens=limit_for(tiny_aligner, original))
    assert text == expected.text and "UNCORRECTED" not in resp.text
    assert final_details(chunks)["corrected"] is True and "original" not in final_details(chunks)


@pytest.mark.parametrize(
    "content", [12345, {"text": "a dict"}, [{"type": "hologram", "data": "?"}], [{"type": "text", "text": 7}]]
)
@pytest.mark.parametrize("stream", [False, True])
def test_content_the_aligner_cannot_read_is_a_502_never_the_text(app, upstream, recorder, content, stream):
    upstream.reply(content)
    resp = chat(app, stream=stream)
    assert resp.status_code == 502 and resp.headers["content-type"] == "application/json"
    error = resp.json()["error"]
    assert error["code"] == "unreadable_content" and error["type"] == "upstream_error"
    assert "choices[0].message.content" in error["message"] and "data:" not in resp.text
    assert recorder.requests == []


def test_one_unreadable_choice_of_n_fails_the_request_before_any_correction(app, upstream, recorder):
    upstream.reply("A fine answer.")
    upstream.reply(12345)
    resp = chat(app, n=2)
    assert resp.status_code == 502 and "choices[1]" in resp.json()["error"]["message"]
    assert recorder.requests == [] and "A fine answer." not in resp.text


# -- grounding: the tool turns of the request reach the Aligner's prompt ---------------------------------------


TOOL_TURNS = [
    {"role": "system", "content": "You answer weather questions."},
    {"role": "user", "content": "What is the weather in Oslo?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'},
            }
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": "snow, -3C"},
    {"role": "assistant", "content": "It is snowing in Oslo."},
    {"role": "user", "content": QUESTION},
    {"role": "assistant", "content": None, "tool_calls": [TOOL_CALL]},
    {"role": "tool", "tool_call_id": "call_7", "content": [{"type": "text", "text": "sunny, 21C"}]},
]


@pytest.mark.parametrize("stream", [False, True])
def test_the_tool_turns_after_the_question_are_the_corrections_context(app, upstream, recorder, stream):
    upstream.reply("It is sunny and 21C in Paris.")
    resp = chat(app, TOOL_TURNS, stream=stream)
    details = final_details(events(resp)[0]) if stream else resp.json()["aligner"]
    assert details["corrected"] is True and details["context_items"] == 2 and details["context_tokens"] > 0
    assert (
        details["history_turns"] == 3
    )  # system, user, assistant text: the earlier tool turns are not history
    prompt = recorder.prompts[-1]
    assert 'Tool call (get_weather): {"city": "Paris"}' in prompt
    assert "Tool result (get_weather): sunny, 21C" in prompt
    assert "-3C" not in prompt and '"Oslo"}' not in prompt  # an earlier turn's tool result grounded that turn
    assert upstream.bodies[-1]["messages"] == TOOL_TURNS  # the upstream gets the conversation as it came


def test_a_question_without_tool_turns_gets_the_same_prompt_as_a_plain_pair(app, tiny_aligner, recorder):
    chat(app)
    params = tiny_aligner.defaults.updated({"max_new_tokens": limit_for(tiny_aligner, "A plain answer.")})
    plain = tiny_aligner.prepare(QUESTION, "A plain answer.", params).request.prompt
    assert recorder.prompts[-1] == plain


def test_corrections_items_take_a_context(app, recorder):
    context = [{"type": "tool_result", "name": "get_weather", "content": "sunny, 21C"}]
    one = post(
        app,
        "/v1/corrections",
        {"question": QUESTION, "answer": "Sunny, 21C.", "context": context, "max_new_tokens": 4},
    )
    assert one.status_code == 200 and one.json()["metadata"]["context_items"] == 1
    assert "Tool result (get_weather): sunny, 21C" in recorder.prompts[-1]
    batch = post(
        app,
        "/v1/corrections",
        {
            "items": [
                {"question": QUESTION, "answer": "Sunny.", "context": ["Paris: sunny all week."]},
                {"question": QUESTION, "answer": "Sunny."},
            ],
            "max_new_tokens": 4,
        },
    ).json()["items"]
    assert batch[0]["metadata"]["context_items"] == 1 and "context_items" not in batch[1]["metadata"]
    assert any("Document: Paris: sunny all week." in p for p in recorder.prompts)
    bad = post(
        app,
        "/v1/corrections",
        {"question": "q", "answer": "a", "context": [{"type": "memo", "content": "x"}]},
    )
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "context"


def test_metrics_count_each_reason(app, upstream):
    upstream.reply(None, tool_calls=[TOOL_CALL])
    chat(app)
    upstream.reply("{}")
    chat(app, response_format={"type": "json_object"})

    async def go():
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app), base_url="http://proxy.test"
        ) as client:
            return (await client.get("/metrics")).text

    text = asyncio.run(go())
    assert 'aligner_serve_skipped_total{reason="tool_calls"} 1.0' in text
    assert 'aligner_serve_skipped_total{reason="structured_output"} 1.0' in text
