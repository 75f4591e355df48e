"""The proxy's pieces on their own: reading OpenAI requests, shaping what the official client parses,
API keys, admission and the scrubbing of the upstream key."""

from __future__ import annotations

import pytest

pytest.importorskip("starlette")
openai = pytest.importorskip("openai")

from openai.types.chat import ChatCompletion, ChatCompletionChunk  # noqa: E402

from aligner_core import Correction  # noqa: E402
from aligner_serve import openai_schema as oa  # noqa: E402
from aligner_serve.security import Admission, ApiKeys  # noqa: E402
from aligner_serve.upstream import Upstream  # noqa: E402


def test_the_last_user_message_is_the_question_and_earlier_text_turns_are_history():
    body = {"model": "m", "messages": [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function",
                                                               "function": {"name": "f", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "42"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": [{"type": "text", "text": "What is"}, {"type": "image_url", "image_url": {}},
                                     {"type": "text", "text": "2 + 2?"}]},
    ], "max_tokens": 7}
    chat = oa.parse_chat_request(body)
    assert chat.question == "What is\n2 + 2?"
    assert chat.history == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                            {"role": "assistant", "content": "Hello!"}]
    assert chat.max_tokens == 7 and not chat.stream and not chat.include_usage


def test_a_single_turn_request_has_no_history():
    chat = oa.parse_chat_request({"messages": [{"role": "user", "content": "Q?"}], "stream": True,
                                  "stream_options": {"include_usage": True}, "max_completion_tokens": 5})
    assert chat.history == [] and chat.stream and chat.include_usage and chat.max_tokens == 5


@pytest.mark.parametrize("body, says", [
    ([], "JSON object"),
    ({"model": "m"}, "'messages'"),
    ({"messages": []}, "'messages'"),
    ({"messages": ["hi"]}, "messages[0]"),
    ({"messages": [{"role": "system", "content": "x"}]}, "no user message"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "no text"),
    ({"messages": [{"role": "user", "content": "q"}], "stream": "yes"}, "'stream'"),
    ({"messages": [{"role": "user", "content": "q"}], "stream": True, "n": 2}, "n > 1"),
    ({"messages": [{"role": "user", "content": "q"}], "max_tokens": 0}, "max_tokens"),
])
def test_requests_the_proxy_cannot_serve_say_why(body, says):
    with pytest.raises(oa.RequestShapeError, match=None) as info:
        oa.parse_chat_request(body)
    assert says in str(info.value)


def test_the_upstream_gets_the_clients_fields_but_never_a_stream():
    chat = oa.parse_chat_request({"model": "client-model", "messages": [{"role": "user", "content": "q"}],
                                  "stream": True, "stream_options": {"include_usage": True}, "temperature": 0.3,
                                  "tools": [{"type": "function", "function": {"name": "f"}}]})
    assert oa.upstream_body(chat, "gpt-4o-mini") == {
        "model": "gpt-4o-mini", "messages": [{"role": "user", "content": "q"}], "temperature": 0.3,
        "tools": [{"type": "function", "function": {"name": "f"}}]}
    assert oa.upstream_body(chat, None)["model"] == "client-model"


def _correction(text="Canberra.", original="Sydney.", **meta):
    return Correction.build(question="Capital of Australia?", original=original, text=text, prompt_tokens=30,
                            completion_tokens=4, finish_reason="stop", latency_s=0.5,
                            metadata={"template": "chat", **meta})


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
    usage = ChatCompletionChunk.model_validate(oa.usage_chunk("id1", "m", 1, {"prompt_tokens": 3,
                                                                              "completion_tokens": 2,
                                                                              "total_tokens": 5}))
    assert first.choices[0].delta.role == "assistant"
    assert last.choices[0].finish_reason == "stop" and last.model_extra["aligner"]["changed"] is True
    assert usage.choices == [] and usage.usage.total_tokens == 5
    assert oa.sse({"a": "é"}) == 'data: {"a":"é"}\n\n'.encode() and oa.SSE_DONE == b"data: [DONE]\n\n"
    completion = ChatCompletion.model_validate({
        "id": "x", "object": "chat.completion", "created": 1, "model": "m",
        "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "Canberra."},
                     "aligner": details}], "aligner": details})
    assert completion.model_extra["aligner"]["similarity"] == details["similarity"]


def test_tool_calls_and_empty_answers_are_not_corrected():
    call = {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    assert oa.skip_reason({"role": "assistant", "content": None, "tool_calls": [call]})[0] == "tool_calls"
    assert oa.skip_reason({"role": "assistant", "content": "  "})[0] == "empty_answer"
    assert oa.skip_reason({"role": "assistant", "content": "Paris."}) is None


def test_api_keys_from_flags_and_a_file(tmp_path):
    from starlette.requests import Request

    path = tmp_path / "keys.txt"
    path.write_text("# team keys\nkey-b\n\n  key-c  \n")
    keys = ApiKeys.load(["key-a", ""], path)
    assert len(keys) == 3 and "key" not in repr(keys).replace("key(s)", "")

    def request(headers):
        return Request({"type": "http", "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()]})

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
        body = {"error": {"message": "Incorrect API key provided: sk-secret-0123456789 (sk-secre...789)",
                          "items": ["sk-secret-0123456789"]}}
        assert "sk-secre" not in str(up.scrub(body))
    finally:
        import asyncio

        asyncio.run(up.aclose())
    with pytest.raises(ValueError, match="http"):
        Upstream("127.0.0.1:8000")
