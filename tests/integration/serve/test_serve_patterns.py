"""What a real ``aligner serve`` process corrects, over the real vLLM CPU server (structured outputs and a hermes
tool-call parser): the openai SDK's ``.parse()`` and LangChain's ``with_structured_output`` get their objects
through the proxy, JSON mode passes unchanged, the structured opt-in always returns JSON that validates, a tool
call passes through and the answer after it is corrected with the tool result in the Aligner's prompt, and
content as a list of text parts is corrected while a number is a 502, streamed too.

The Aligner runs on the vLLM server behind a recording proxy (``aligner_wire``), so the tests read the very
request the Aligner got; the upstream is the vLLM server behind a fault-injecting proxy (``upstream_wire``) that
can answer with shapes the vLLM server does not send. No local model is loaded: the process starts fast."""

from __future__ import annotations

import json

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.vllm_server]
openai = pytest.importorskip("openai")
pytest.importorskip("starlette")
httpx = pytest.importorskip("httpx")

from pydantic import BaseModel  # noqa: E402

from tests.integration.serve.test_serve import ProxyProcess  # noqa: E402

KEY = "patterns-key-0123456789"
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The current weather of a city.",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    }
]
TOOL_PROMPT = (
    "You can call tools. To call one, answer exactly like this example: "
    '<tool_call>{"name": "get_weather", "arguments": {"city": "London"}}</tool_call>'
)
WEATHER = "What is the weather in Paris?"


class City(BaseModel):
    name: str
    country: str


@pytest.fixture(scope="module")
def upstream_wire(vllm_server):
    from tests.fixtures.servers.fault_proxy import FaultProxy

    wire = FaultProxy(vllm_server.url.removesuffix("/v1"))
    yield wire
    wire.close()


@pytest.fixture(scope="module")
def aligner_wire(vllm_server):
    from tests.fixtures.servers.fault_proxy import FaultProxy

    wire = FaultProxy(vllm_server.url.removesuffix("/v1"))
    yield wire
    wire.close()


@pytest.fixture(scope="module")
def proxy(vllm_server, upstream_wire, aligner_wire, tmp_path_factory):
    p = ProxyProcess(
        [
            "--upstream",
            upstream_wire.url,
            "--upstream-model",
            vllm_server.model,
            "--aligner-server",
            aligner_wire.url,
            "--aligner-model",
            vllm_server.model,
            "--max-new-tokens",
            "48",
            "--api-key",
            KEY,
        ],
        tmp_path_factory.mktemp("serve-patterns") / "proxy.log",
        KEY,
    )
    try:
        yield p.wait_healthy()
    finally:
        p.stop()


def client(p: ProxyProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=p.url, api_key=KEY, max_retries=0, timeout=300)


def aligner_calls(wire) -> list[str]:
    """The bodies of the completion requests the Aligner's server got, as text."""
    return [body.decode() for path, body in wire.bodies if path.endswith("completions")]


def post(p: ProxyProcess, body: dict) -> httpx.Response:
    return httpx.post(f"{p.url}/chat/completions", json=body, headers=p.headers, timeout=300)


def sse_text(resp: httpx.Response) -> tuple[str, dict]:
    """The text a stream carries and its final ``aligner`` field."""
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream"), resp.text
    events = [e.removeprefix("data: ") for e in resp.text.split("\n\n") if e.strip()]
    assert events[-1] == "[DONE]", events[-1]
    chunks = [json.loads(e) for e in events[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    return text, next(c["aligner"] for c in chunks if c["choices"] and c["choices"][0]["finish_reason"])


def test_structured_output_passes_through_parse_json_mode_and_langchain(proxy, vllm_server, aligner_wire):
    before = len(aligner_calls(aligner_wire))
    question = [{"role": "user", "content": "Name a city in France as JSON."}]
    parsed = client(proxy).chat.completions.parse(
        model="smollm2", messages=question, response_format=City, max_tokens=40, temperature=0
    )
    assert isinstance(parsed.choices[0].message.parsed, City)
    assert parsed.model_extra["aligner"]["skipped"] == "structured_output"
    with client(proxy).chat.completions.stream(
        model="smollm2", messages=question, response_format=City, max_tokens=40, temperature=0
    ) as stream:  # the SDK's stream helper
        streamed = stream.get_final_completion()
    assert streamed.choices[0].message.parsed == parsed.choices[0].message.parsed

    direct = openai.OpenAI(base_url=vllm_server.url, api_key="unused", max_retries=0, timeout=300)
    mode = {
        "model": vllm_server.model,
        "messages": [{"role": "user", "content": "Give a JSON object with a key colour."}],
        "response_format": {"type": "json_object"},
        "max_tokens": 24,
        "temperature": 0,
    }
    through = client(proxy).chat.completions.create(**mode)
    assert (
        through.choices[0].message.content
        == direct.chat.completions.create(**mode).choices[0].message.content
    )
    assert through.model_extra["aligner"]["structured"] == "json"

    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(
        base_url=proxy.url, api_key=KEY, model="smollm2", temperature=0, max_tokens=40, max_retries=0
    )
    city = llm.with_structured_output(City, method="json_schema").invoke("Name a city in France as JSON.")
    assert isinstance(city, City)
    assert len(aligner_calls(aligner_wire)) == before  # structured answers never went to the Aligner


def test_the_structured_opt_in_keeps_only_json_that_validates(proxy, upstream_wire, aligner_wire):
    before = len(aligner_calls(aligner_wire))
    resp = client(proxy).chat.completions.parse(
        model="smollm2",
        messages=[{"role": "user", "content": "Name a city in Italy as JSON."}],
        response_format=City,
        max_tokens=40,
        temperature=0,
        extra_body={"aligner": {"correct_structured": True}},
    )
    details = resp.model_extra["aligner"]
    assert isinstance(
        resp.choices[0].message.parsed, City
    )  # kept correction or original: it always validates
    City.model_validate_json(resp.choices[0].message.content)
    assert len(aligner_calls(aligner_wire)) == before + 1  # it was corrected ...
    if details["corrected"]:
        assert details["structured"] == "json_schema"
    else:  # ... and the correction did not validate, so the upstream's JSON came back with the reason
        assert details["skipped"] == "structured_output_invalid" and details["invalid_reason"]
        assert resp.choices[0].message.content == details["original"]
    forwarded = json.loads(upstream_wire.bodies[-1][1])
    assert "aligner" not in forwarded and forwarded["response_format"]["type"] == "json_schema"


def test_a_tool_call_passes_and_the_answer_after_it_is_corrected_with_the_tool_result(proxy, aligner_wire):
    c = client(proxy)
    messages = [{"role": "system", "content": TOOL_PROMPT}, {"role": "user", "content": WEATHER}]
    before = len(aligner_calls(aligner_wire))
    first = c.chat.completions.create(
        model="smollm2", messages=messages, tools=TOOLS, tool_choice="required", max_tokens=60, temperature=0
    )
    calls = first.choices[0].message.tool_calls
    assert calls and calls[0].function.name == "get_weather" and "Paris" in calls[0].function.arguments
    assert (
        first.model_extra["aligner"]["skipped"] == "tool_calls"
        and first.choices[0].finish_reason == "tool_calls"
    )
    assert len(aligner_calls(aligner_wire)) == before

    messages += [
        first.choices[0].message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": calls[0].id, "content": "sunny, 21C"},
    ]
    final = c.chat.completions.create(
        model="smollm2", messages=messages, tools=TOOLS, max_tokens=40, temperature=0
    )
    details = final.model_extra["aligner"]
    assert details["corrected"] is True and details["context_items"] == 2 and final.choices[0].message.content
    prompt = aligner_calls(aligner_wire)[
        -1
    ]  # what the Aligner was asked: the tool call and its result are in it
    assert (
        "sunny, 21C" in prompt and "get_weather" in prompt and json.dumps(details["original"])[1:-1] in prompt
    )


def test_text_parts_are_corrected_and_a_number_is_a_502_streamed_too(proxy, upstream_wire, aligner_wire):
    parts = [{"type": "text", "text": "Paris is the capital "}, {"type": "text", "text": "of France."}]
    body = {
        "model": "smollm2",
        "messages": [{"role": "user", "content": "What is the capital of France?"}],
        "max_tokens": 32,
        "temperature": 0,
    }
    upstream_wire.replies.append({"role": "assistant", "content": parts})
    upstream_wire.faults.append("reply")
    data = post(proxy, body).json()
    assert (
        data["aligner"]["corrected"] is True
        and data["aligner"]["original"] == "Paris is the capital of France."
    )
    content = data["choices"][0]["message"]["content"]
    assert isinstance(content, list) and content[0]["type"] == "text" and content[0]["text"]
    assert "Paris is the capital of France." in aligner_calls(aligner_wire)[-1]

    upstream_wire.replies.append({"role": "assistant", "content": parts})
    upstream_wire.faults.append("reply")
    text, details = sse_text(post(proxy, {**body, "stream": True}))
    assert text and details["corrected"] is True and "original" not in details
    assert "Paris is the capital of France." in aligner_calls(aligner_wire)[-1]

    for stream in (False, True):
        calls = len(aligner_calls(aligner_wire))
        upstream_wire.replies.append({"role": "assistant", "content": 12345})
        upstream_wire.faults.append("reply")
        resp = post(proxy, {**body, "stream": stream})
        assert resp.status_code == 502 and resp.json()["error"]["code"] == "unreadable_content"
        assert "12345" not in resp.text and "data:" not in resp.text
        assert len(aligner_calls(aligner_wire)) == calls
    assert proxy.alive()
