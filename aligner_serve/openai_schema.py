"""The OpenAI chat-completions wire format: reading a client's request, shaping responses and SSE chunks.

Plain dicts in and out (no pydantic models): clients send many fields this proxy never reads, and
every one of them must reach the upstream unchanged.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from aligner_core import Correction

#: Roles the Aligner's history takes; OpenAI's ``developer`` role is a system prompt by another name.
_HISTORY_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


class RequestShapeError(ValueError):
    """The request body is JSON but not a request this endpoint can serve (HTTP 400)."""

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class ChatRequest:
    """What the proxy needs from a chat-completions body; ``body`` is forwarded upstream as it came."""

    body: dict[str, Any]
    question: str
    history: list[dict[str, str]]
    stream: bool
    include_usage: bool
    max_tokens: int | None


def text_of(content: Any) -> str | None:
    """The text of a message's ``content``: a string, or the text parts of a list of parts (None if none)."""
    if isinstance(content, str):
        return content
    if isinstance(content, Sequence):
        parts = [p.get("text") for p in content if isinstance(p, Mapping) and p.get("type") == "text"]
        texts = [t for t in parts if isinstance(t, str)]
        return "\n".join(texts) if texts else None
    return None


def parse_chat_request(body: Any) -> ChatRequest:
    """Validate the few fields the proxy reads; the last user message is the question, earlier turns history."""
    if not isinstance(body, dict):
        raise RequestShapeError(f"the request body must be a JSON object, got {type(body).__name__}")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestShapeError("'messages' must be a non-empty list of messages", param="messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise RequestShapeError(f"messages[{i}] must be an object with a 'role'", param=f"messages[{i}]")
    last_user = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=None)
    if last_user is None:
        raise RequestShapeError("'messages' holds no user message: the Aligner needs the question", param="messages")
    question = text_of(messages[last_user].get("content"))
    if question is None:
        raise RequestShapeError(f"messages[{last_user}] (the question) has no text content",
                                param=f"messages[{last_user}].content")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise RequestShapeError(f"'stream' must be true or false, got {stream!r}", param="stream")
    n = body.get("n", 1)
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise RequestShapeError(f"'n' must be a positive integer, got {n!r}", param="n")
    if stream and n not in (None, 1):
        raise RequestShapeError("'stream' with n > 1 is not supported by the correction proxy", param="n")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1):
        raise RequestShapeError(f"'max_tokens' must be a positive integer, got {max_tokens!r}", param="max_tokens")
    options = body.get("stream_options")
    include_usage = bool(stream and isinstance(options, dict) and options.get("include_usage"))
    return ChatRequest(body=body, question=question, history=history_of(messages[:last_user]), stream=stream,
                       include_usage=include_usage, max_tokens=max_tokens)


def history_of(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, str]]:
    """Earlier turns as the Aligner's history: text turns only (tool calls and tool results are left out)."""
    turns = []
    for m in messages:
        role = _HISTORY_ROLES.get(m["role"])
        text = text_of(m.get("content"))
        if role is not None and text:
            turns.append({"role": role, "content": text})
    return turns


def upstream_body(request: ChatRequest, model: str | None) -> dict[str, Any]:
    """The body sent upstream: the client's, asking for the whole answer at once (it is corrected before
    anything is sent back), with the configured upstream model."""
    body = {k: v for k, v in request.body.items() if k not in ("stream", "stream_options")}
    if model:
        body["model"] = model
    return body


def correction_details(correction: Correction, *, include_original: bool) -> dict[str, Any]:
    """The ``aligner`` field: what was corrected and how, beside the OpenAI fields clients already read."""
    details: dict[str, Any] = {"corrected": True}
    if include_original:
        details["original"] = correction.original
    details.update(
        changed=correction.changed,
        similarity=round(correction.similarity, 6),
        template=correction.metadata.get("template"),
        finish_reason=correction.finish_reason,
        usage={"prompt_tokens": correction.prompt_tokens, "completion_tokens": correction.completion_tokens},
        latency_s=round(correction.latency_s, 6),
    )
    if turns := correction.metadata.get("history_turns"):
        details["history_turns"] = turns
    if correction.metadata.get("inspected"):  # the inspector's verdict: a passed answer cost no generation
        details["inspector"] = {"score": correction.metadata["inspector_score"],
                                "threshold": correction.metadata["inspector_threshold"],
                                "passed": correction.metadata["inspector_passed"]}
    return details


def skipped_details(reason: str, message: str) -> dict[str, Any]:
    """The ``aligner`` field of a choice passed through uncorrected, and why."""
    return {"corrected": False, "skipped": reason, "message": message}


TOOL_CALLS_SKIPPED = ("tool_calls", "tool-call responses pass through uncorrected")


def skip_reason(message: Mapping[str, Any]) -> tuple[str, str] | None:
    """Why an upstream message is not corrected (None: it is)."""
    if message.get("tool_calls") or message.get("function_call"):
        return TOOL_CALLS_SKIPPED
    content = message.get("content")
    if not isinstance(content, str) or not content.strip():
        return ("empty_answer", "the upstream answer has no text to correct")
    return None


def new_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def chunk(
    completion_id: str, model: str, created: int, delta: dict[str, Any], finish_reason: str | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """One ``chat.completion.chunk`` with a single choice (index 0)."""
    return {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}], **extra}


def usage_chunk(completion_id: str, model: str, created: int, usage: Mapping[str, Any] | None) -> dict[str, Any]:
    """The last chunk when ``stream_options.include_usage`` is set: no choices, the usage."""
    return {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [], "usage": dict(usage) if usage else None}


def sse(payload: Mapping[str, Any] | str) -> bytes:
    """One server-sent event as OpenAI sends it: ``data: <json>`` and a blank line."""
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
    return f"data: {data}\n\n".encode()


SSE_DONE = sse("[DONE]")


def error_body(message: str, *, type: str, code: str | None = None, param: str | None = None) -> dict[str, Any]:
    """OpenAI's error shape, which its clients turn into their exception types."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def now() -> int:
    return int(time.time())
