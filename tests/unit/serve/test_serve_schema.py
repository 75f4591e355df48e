"""The proxy's pieces on their own: reading OpenAI requests, shaping what the official client parses,
API keys, admission and the scrubbing of the upstream key."""

from __future__ import annotations

import pytest

pytest.importorskip("starlette")
openai = pytest.importorskip("openai")

from openai.types.chat import ChatCompletion, ChatCompletionChunk  # noqa: E402

from aligner_core import Correction  # noqa: E402
from aligner_core.errors import UnreadableContentError  # noqa: E402
from aligner_serve import openai_schema as oa  # noqa: E402
from aligner_serve.choices import decide_choice, passthrough_delta, with_text  # noqa: E402
from aligner_serve.grounding import turn_context  # noqa: E402
from aligner_serve.options import read_options  # noqa: E402
from aligner_serve.security import Admission, ApiKeys  # noqa: E402
from aligner_serve.structured import requested_structure  # noqa: E402
from aligner_serve.upstream import Upstream  # noqa: E402


def test_the_last_user_message_is_the_question_and_earlier_text_turns_are_history():
    body = {
        "model": "m",
        "messages": [
            {"role": "developer", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
                ],
            },
            {"role": "tool", "tool_call_id": "c1", "content": "42"},
            {"role": "assistant", "content": "Hello!"},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What is"},
                    {"type": "image_url", "image_url": {}},
                    {"type": "text", "text": "2 + 2?"},
                ],
            },
        ],
        "max_tokens": 7,
    }
    chat = oa.parse_chat_request(body)
    assert chat.question == "What is\n2 + 2?"
    assert chat.history == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
    ]
    assert chat.max_tokens == 7 and not chat.stream and not chat.include_usage
    assert chat.context == () and chat.structure is None  # the tool turns before the question are not context


def test_a_single_turn_request_has_no_history():
    chat = oa.parse_chat_request(
        {
            "messages": [{"role": "user", "content": "Q?"}],
            "stream": True,
            "stream_options": {"include_usage": True},
            "max_completion_tokens": 5,
        }
    )
    assert chat.history == [] and chat.stream and chat.include_usage and chat.max_tokens == 5


@pytest.mark.parametrize(
    "body, says",
    [
        ([], "JSON object"),
        ({"model": "m"}, "'messages'"),
        ({"messages": []}, "'messages'"),
        ({"messages": ["hi"]}, "messages[0]"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "no text"),
        ({"messages": [{"role": "user", "content": "q"}], "stream": "yes"}, "'stream'"),
        ({"messages": [{"role": "user", "content": "q"}], "n": 0}, "'n'"),
        ({"messages": [{"role": "user", "content": "q"}], "stop": [1]}, "'stop'"),
        ({"messages": [{"role": "user", "content": "q"}], "max_tokens": 0}, "max_tokens"),
    ],
)
def test_requests_the_proxy_cannot_serve_say_why(body, says):
    with pytest.raises(oa.RequestShapeError, match=None) as info:
        oa.parse_chat_request(body)
    assert says in str(info.value)


def test_without_a_user_message_the_question_is_the_system_prompt_or_nothing():
    """As vLLM answers such requests, the proxy does too; the Aligner's question is then the instruction the answer
    follows, and with no instruction either it is empty and the conversation is history."""
    chat = oa.parse_chat_request(
        {
            "messages": [
                {"role": "system", "content": "Old"},
                {"role": "developer", "content": "Write a haiku about rain."},
            ]
        }
    )
    assert (chat.question, chat.question_role) == ("Write a haiku about rain.", "system")
    assert chat.history == [{"role": "system", "content": "Old"}]
    only_assistant = oa.parse_chat_request(
        {"messages": [{"role": "assistant", "content": "Once upon a time"}]}
    )
    assert (only_assistant.question, only_assistant.question_role) == ("", None)
    assert only_assistant.history == [{"role": "assistant", "content": "Once upon a time"}]


def test_n_stop_and_logprobs_are_read():
    chat = oa.parse_chat_request(
        {
            "messages": [{"role": "user", "content": "q"}],
            "n": 3,
            "stream": True,
            "stop": ["END", ""],
            "top_logprobs": 2,
        }
    )
    assert (chat.n, chat.stop, chat.logprobs) == (3, ("END",), True)
    plain = oa.parse_chat_request({"messages": [{"role": "user", "content": "q"}], "n": None, "stop": "x"})
    assert (plain.n, plain.stop, plain.logprobs) == (1, ("x",), False)


def test_the_tool_turns_after_the_question_become_context_items_in_order():
    messages = [
        {"role": "user", "content": "Weather in Paris and Oslo?"},
        {
            "role": "assistant",
            "content": "Let me check.",
            "tool_calls": [
                {
                    "id": "a",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                },
                {"id": "b", "type": "function", "function": {"name": "get_time", "arguments": ""}},
            ],
        },
        {"role": "tool", "tool_call_id": "b", "content": "noon"},
        {
            "role": "tool",
            "tool_call_id": "a",
            "content": [{"type": "text", "text": "sunny, "}, {"type": "text", "text": "21C"}],
        },
        {"role": "tool", "tool_call_id": "unknown", "name": "lookup", "content": "42"},
        {
            "role": "assistant",
            "content": None,
            "function_call": {"name": "get_weather", "arguments": {"city": "Oslo"}},
        },
        {"role": "function", "name": "get_weather", "content": "snow"},
    ]
    items = [item.to_dict() for item in turn_context(messages[1:], 1)]
    assert items == [
        {"type": "tool_call", "name": "get_weather", "content": '{"city": "Paris"}'},
        {"type": "tool_call", "name": "get_time", "content": "{}"},
        {"type": "tool_result", "name": "get_time", "content": "noon"},
        {"type": "tool_result", "name": "get_weather", "content": "sunny, 21C"},
        {"type": "tool_result", "name": "lookup", "content": "42"},
        {"type": "tool_call", "name": "get_weather", "content": '{"city": "Oslo"}'},
        {"type": "tool_result", "name": "get_weather", "content": "snow"},
    ]
    assert oa.parse_chat_request({"messages": messages}).context == turn_context(messages[1:], 1)


@pytest.mark.parametrize(
    "turn, says",
    [
        ({"role": "tool", "tool_call_id": "a", "content": 42}, "messages[1].content"),
        ({"role": "tool", "tool_call_id": "a", "content": [{"type": "hologram"}]}, "messages[1].content"),
        ({"role": "assistant", "tool_calls": {"id": "a"}}, "messages[1].tool_calls must be a list"),
        ({"role": "assistant", "tool_calls": [{"id": "a"}]}, "messages[1].tool_calls[0]"),
    ],
)
def test_tool_turns_the_proxy_cannot_read_are_400(turn, says):
    with pytest.raises(oa.RequestShapeError) as info:
        oa.parse_chat_request({"messages": [{"role": "user", "content": "q"}, turn]})
    assert says in str(info.value) and info.value.param.startswith("messages[1]")


@pytest.mark.parametrize(
    "body, kind, checkable, schema",
    [
        ({}, None, None, None),
        ({"response_format": {"type": "text"}}, None, None, None),
        ({"response_format": {"type": "json_object"}}, "json", True, None),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "w", "schema": {"type": "object"}},
                }
            },
            "json_schema",
            True,
            {"type": "object"},
        ),
        ({"response_format": {"type": "grammar", "grammar": "root ::= x"}}, "grammar", False, None),
        ({"structured_outputs": {"json": {"type": "array"}}}, "json_schema", True, {"type": "array"}),
        ({"structured_outputs": {"json": '{"type": "array"}'}}, "json_schema", True, {"type": "array"}),
        ({"structured_outputs": {"json_object": True}}, "json", True, None),
        ({"structured_outputs": {"choice": ["a", "b"]}}, "choice", False, None),
        ({"structured_outputs": {"regex": "[0-9]+"}}, "regex", False, None),
        ({"guided_json": {"type": "object"}}, "json_schema", True, {"type": "object"}),
        ({"guided_json": "not json"}, "json_schema", False, None),
        ({"guided_regex": "[a-z]+"}, "regex", False, None),
        ({"ebnf": "root ::= 'a'"}, "grammar", False, None),
    ],
)
def test_the_structure_a_request_asks_for(body, kind, checkable, schema):
    found = requested_structure(body)
    if kind is None:
        assert found is None
    else:
        assert (found.kind, found.checkable, found.structure.schema) == (kind, checkable, schema)


@pytest.mark.parametrize(
    "response_format, param",
    [
        ("json", "response_format"),
        ({"type": 1}, "response_format"),
        ({"type": "json_schema"}, "response_format.json_schema"),
        ({"type": "json_schema", "json_schema": {"schema": "x"}}, "response_format.json_schema.schema"),
    ],
)
def test_a_malformed_response_format_is_400(response_format, param):
    with pytest.raises(oa.RequestShapeError) as info:
        oa.parse_chat_request(
            {"messages": [{"role": "user", "content": "q"}], "response_format": response_format}
        )
    assert info.value.param == param


def test_the_aligner_options_are_read_and_never_sent_upstream():
    assert read_options({}).correct_structured is None
    assert read_options({"aligner": None}).correct_structured is None
    assert read_options({"aligner": {"correct_structured": False}}).correct_structured is False
    chat = oa.parse_chat_request(
        {"messages": [{"role": "user", "content": "q"}], "aligner": {"correct_structured": True}}
    )
    assert chat.options.correct_structured is True and "aligner" not in oa.upstream_body(chat, None)
    assert "aligner" in chat.body  # the client's body itself is left as it came


def test_a_corrected_text_goes_back_in_the_shape_the_upstream_used():
    assert with_text("old", "new") == "new"
    image = {"type": "image_url", "image_url": {"url": "u"}}
    parts = [
        image,
        {"type": "text", "text": "a", "annotations": [1]},
        "b",
        {"type": "output_text", "text": "c"},
    ]
    assert with_text(parts, "new") == [image, {"type": "text", "text": "new"}]
    assert with_text(["a", image], "new") == ["new", image]


def test_unreadable_choices_name_their_index_and_passthrough_deltas_carry_text():
    with pytest.raises(UnreadableContentError, match=r"choices\[3\]\.message\.content"):
        decide_choice({"content": 12345}, 3, None, correct_structured=False)
    decision = decide_choice(
        {"content": [{"type": "text", "text": "{}"}]},
        0,
        requested_structure({"response_format": {"type": "json_object"}}),
        correct_structured=False,
    )
    assert decision.skip.value == "structured_output"
    delta = passthrough_delta({"content": [{"type": "text", "text": "{}"}], "refusal": None}, decision)
    assert delta == {"role": "assistant", "content": "{}"}


def test_the_upstream_gets_the_clients_fields_but_never_a_stream():
    chat = oa.parse_chat_request(
        {
            "model": "client-model",
            "messages": [{"role": "user", "content": "q"}],
            "stream": True,
            "stream_options": {"include_usage": True},
            "temperature": 0.3,
            "tools": [{"type": "function", "function": {"name": "f"}}],
        }
    )
    assert oa.upstream_body(chat, "gpt-4o-mini") == {
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": "q"}],
        "temperature": 0.3,
        "tools": [{"type": "function", "function": {"name": "f"}}],
    }
    assert oa.upstream_body(chat, None)["model"] == "client-model"


def _correction(text="Canberra.", original="Sydney.", **meta):
    return Correction.build(
        question="Capital of Australia?",
        original=original,
        text=text,
        prompt_tokens=30,
        completion_tokens=4,
        finish_reason="stop",
        latency_s=0.5,
        metadata={"template": "chat", **meta},
    )


def test_correction_details_hide_the_original_when_asked():
    shown = oa.correction_details(_correction(), include_original=True)
    assert shown["original"] == "Sydney." and shown["changed"] is True and shown["template"] == "chat"
    assert shown["usage"] == {"prompt_tokens": 30, "completion_tokens": 4} and "history_turns" not in shown
    hidden = oa.correction_details(_correction(history_turns=2), include_original=False)
    assert "original" not in hidden and hidden["history_turns"] == 2


def test_chunks_and_completions_parse_in_the_official_client():
    details = oa.correction_details(_correction(), include_original=False)
    first = ChatCompletionChunk.model_validate(oa.chunk("id1", "m", 1, {"role": "assistant", "content": ""}))
    last = ChatCompletionChunk.model_validate(oa.chunk("id1", "m", 1, {}, "stop", aligner=details))
    usage = ChatCompletionChunk.model_validate(
        oa.usage_chunk("id1", "m", 1, {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5})
    )
    assert first.choices[0].delta.role == "assistant"
    assert last.choices[0].finish_reason == "stop" and last.model_extra["aligner"]["changed"] is True
    assert usage.choices == [] and usage.usage.total_tokens == 5
    assert oa.sse({"a": "é"}) == 'data: {"a":"é"}\n\n'.encode() and oa.SSE_DONE == b"data: [DONE]\n\n"
    completion = ChatCompletion.model_validate(
        {
            "id": "x",
            "object": "chat.completion",
            "created": 1,
            "model": "m",
            "choices": [
                {
                    "index": 0,
                    "finish_reason": "stop",
                    "message": {"role": "assistant", "content": "Canberra."},
                    "aligner": details,
                }
            ],
            "aligner": details,
        }
    )
    assert completion.model_extra["aligner"]["similarity"] == details["similarity"]


def test_tool_calls_and_empty_answers_are_not_corrected():
    call = {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}

    def skip(message):
        decision = decide_choice(message, 0, None, correct_structured=False)
        return decision.skip.value if decision.skip else None

    assert skip({"role": "assistant", "content": None, "tool_calls": [call]}) == "tool_calls"
    assert (
        skip({"role": "assistant", "content": "", "function_call": {"name": "f", "arguments": "{}"}})
        == "tool_calls"
    )
    assert skip({"role": "assistant", "content": "  "}) == "empty_answer"
    assert skip({"role": "assistant", "content": None}) == "empty_answer"
    assert skip({"role": "assistant", "content": "Paris."}) is None


def test_a_key_file_without_keys_or_not_utf8_refuses_and_a_bom_is_stripped(tmp_path):
    from aligner_serve.security import KeyFileError

    empty = tmp_path / "empty.txt"
    empty.write_text("# no keys yet\n\n   \n# still none\n")
    with pytest.raises(KeyFileError, match="holds no key"):
        ApiKeys.load([], empty)
    latin = tmp_path / "latin.txt"
    latin.write_bytes("cl\xe9\n".encode("latin-1"))
    with pytest.raises(KeyFileError, match="not UTF-8"):
        ApiKeys.load([], latin)
    bom = tmp_path / "bom.txt"
    bom.write_bytes(b"\xef\xbb\xbfkey-1\n")
    assert len(ApiKeys.load([], bom)) == 1 and ApiKeys.load([], bom)._keys == [b"key-1"]


def test_api_keys_from_flags_and_a_file(tmp_path):
    from starlette.requests import Request

    path = tmp_path / "keys.txt"
    path.write_text("# team keys\nkey-b\n\n  key-c  \n")
    keys = ApiKeys.load(["key-a", ""], path)
    assert len(keys) == 3 and "key" not in repr(keys).replace("key(s)", "")

    def request(headers):
        return Request(
            {"type": "http", "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()]}
        )

    assert keys.allows(request({"Authorization": "Bearer key-c"}))
    assert keys.allows(request({"X-API-Key": "key-a"}))
    assert not keys.allows(request({"Authorization": "Bearer key-d"}))
    assert not keys.allows(request({"Authorization": "Basic key-a"}))
    assert not keys.allows(request({}))
    assert ApiKeys().allows(request({}))  # no keys configured: open (bound to 127.0.0.1 by default)


def test_admission_refuses_past_the_limit_and_frees_on_release():
    gate = Admission(3)
    assert gate.try_acquire(2) and gate.try_acquire() and not gate.try_acquire()
    gate.release(2, elapsed_s=4.0)
    assert gate.try_acquire(2) and not gate.try_acquire()
    assert gate.retry_after == 2  # ceil of the moving average 0.8 * 1 + 0.2 * 4
    with pytest.raises(ValueError, match="positive"):
        Admission(0)


def test_the_upstream_key_is_scrubbed_and_never_in_the_repr():
    up = Upstream("http://127.0.0.1:9/v1", model="m", api_key="sk-secret-0123456789")
    try:
        assert "sk-" not in repr(up)
        body = {
            "error": {
                "message": "Incorrect API key provided: sk-secret-0123456789 (sk-secre...789)",
                "items": ["sk-secret-0123456789"],
            }
        }
        assert "sk-secre" not in str(up.scrub(body))
    finally:
        import asyncio

        asyncio.run(up.aclose())
    with pytest.raises(ValueError, match="http"):
        Upstream("127.0.0.1:8000")
