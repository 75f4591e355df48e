"""The OpenAI chat-completions wire format: reading a client's request, shaping responses and SSE chunks.

Plain dicts in and out (no pydantic models): clients send many fields this proxy never reads, and
every one of them must reach the upstream unchanged (all but the proxy's own ``aligner`` field). What of the
messages the Aligner sees is ``grounding``'s job, the structure asked for ``structured``'s.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from aligner_core import Correction
from aligner_core.context import Context

from .bad_request import RequestShapeError
from .grounding import read_turns
from .options import FIELD as OPTIONS_FIELD
from .options import AlignerOptions, read_options
from .structured import RequestedStructure, requested_structure


@dataclass(frozen=True)
class ChatRequest:
    """What the proxy needs from a chat-completions body; ``body`` is forwarded upstream as it came (less the
    proxy's own ``aligner`` field)."""

    body: dict[str, Any]
    question: str
    history: list[dict[str, str]]
    stream: bool
    include_usage: bool
    max_tokens: int | None
    context: Context = ()
    """The tool calls and tool results after the question: what the answer is grounded on."""
    structure: RequestedStructure | None = None
    """The structure the request asks for (``response_format`` and servers' structured outputs), or None."""
    options: AlignerOptions = field(default_factory=AlignerOptions)
    """The request's own ``aligner`` options."""
    n: int = 1
    """Choices asked for: each is decided and corrected on its own, and takes a place in the queue."""
    stop: tuple[str, ...] = ()
    """Stop sequences: the upstream's, and the correction's too (the text returned ends before any of them)."""
    logprobs: bool = False
    """Whether the client asked for log probabilities (kept only where the upstream's text is returned)."""
    question_role: str | None = "user"
    """The role of the message the question came from (``grounding.read_turns``)."""


def parse_chat_request(body: Any) -> ChatRequest:
    """Validate the fields the proxy reads: the question (the last user message, else the last system prompt),
    earlier text turns history, the tool turns after it the grounding context (``grounding``); ``n``, ``stop``,
    ``logprobs``; the structure asked for; ``aligner`` options."""
    if not isinstance(body, dict):
        raise RequestShapeError(f"the request body must be a JSON object, got {type(body).__name__}")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestShapeError("'messages' must be a non-empty list of messages", param="messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise RequestShapeError(f"messages[{i}] must be an object with a 'role'", param=f"messages[{i}]")
    turns = read_turns(messages)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise RequestShapeError(f"'stream' must be true or false, got {stream!r}", param="stream")
    n = body.get("n")
    n = 1 if n is None else n
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise RequestShapeError(f"'n' must be a positive integer, got {n!r}", param="n")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is not None and (
        isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1
    ):
        raise RequestShapeError(
            f"'max_tokens' must be a positive integer, got {max_tokens!r}", param="max_tokens"
        )
    stream_options = body.get("stream_options")
    include_usage = bool(stream and isinstance(stream_options, dict) and stream_options.get("include_usage"))
    return ChatRequest(
        body=body,
        question=turns.question,
        history=turns.history,
        stream=stream,
        include_usage=include_usage,
        max_tokens=max_tokens,
        context=turns.context,
        structure=requested_structure(body),
        options=read_options(body),
        n=n,
        stop=_stop(body.get("stop")),
        logprobs=bool(body.get("logprobs") or body.get("top_logprobs")),
        question_role=turns.question_role,
    )


def _stop(value: Any) -> tuple[str, ...]:
    """``stop`` as OpenAI takes it: null, a string or a list of strings (empty strings stop nothing)."""
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,) if value else ()
    if isinstance(value, list) and all(isinstance(s, str) for s in value):
        return tuple(s for s in value if s)
    raise RequestShapeError(f"'stop' must be a string or a list of strings, got {value!r}", param="stop")


def upstream_body(request: ChatRequest, model: Any) -> dict[str, Any]:
    """The body sent upstream: the client's, asking for the whole answer at once (it is corrected before
    anything is sent back), with ``model`` as the operator mapped it and without the proxy's ``aligner`` field."""
    body = {k: v for k, v in request.body.items() if k not in ("stream", "stream_options", OPTIONS_FIELD)}
    if model is not None:
        body["model"] = model
    return body


#: Correction metadata the ``aligner`` field carries when present (the decision's and the grounding's).
_REPORTED = (
    "invalid_reason",
    "structured",
    "non_text_parts",
    "history_turns",
    "context_items",
    "context_tokens",
    "context_trimmed",
)


def correction_details(correction: Correction, *, include_original: bool) -> dict[str, Any]:
    """The ``aligner`` field: what was corrected and how, beside the OpenAI fields clients already read.

    ``corrected`` is false when the answer came back unchanged for a reason (``skipped``: the inspector passed
    it, or a structured correction did not validate), as the core records it.
    """
    meta = correction.metadata
    details: dict[str, Any] = {"corrected": not meta.get("skipped")}
    if meta.get("skipped"):
        details.update(skipped=meta["skipped"], skipped_detail=meta.get("skipped_detail"))
    if include_original:
        details["original"] = correction.original
    details.update(
        changed=correction.changed,
        similarity=round(correction.similarity, 6),
        template=meta.get("template"),
        finish_reason=correction.finish_reason,
        usage={"prompt_tokens": correction.prompt_tokens, "completion_tokens": correction.completion_tokens},
        latency_s=round(correction.latency_s, 6),
    )
    details.update({key: meta[key] for key in _REPORTED if meta.get(key) is not None})
    if meta.get("inspected"):  # the inspector's verdict: a passed answer cost no generation
        details["inspector"] = {
            "score": meta["inspector_score"],
            "threshold": meta["inspector_threshold"],
            "passed": meta["inspector_passed"],
        }
    return details


def new_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def chunk(
    completion_id: str,
    model: str,
    created: int,
    delta: dict[str, Any],
    finish_reason: str | None = None,
    *,
    index: int = 0,
    logprobs: Any = None,
    **extra: Any,
) -> dict[str, Any]:
    """One ``chat.completion.chunk`` with a single choice (``index``)."""
    return {
        "id": completion_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}],
        **extra,
    }


def usage_chunk(
    completion_id: str, model: str, created: int, usage: Mapping[str, Any] | None, **extra: Any
) -> dict[str, Any]:
    """The last chunk when ``stream_options.include_usage`` is set: no choices, the usage."""
    return {
        "id": completion_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [],
        "usage": dict(usage) if usage else None,
        **extra,
    }


def sse(payload: Mapping[str, Any] | str) -> bytes:
    """One server-sent event as OpenAI sends it: ``data: <json>`` and a blank line."""
    data = (
        payload
        if isinstance(payload, str)
        else json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
    )
    return f"data: {data}\n\n".encode()


SSE_DONE = sse("[DONE]")


def error_body(
    message: str, *, type: str, code: str | None = None, param: str | None = None
) -> dict[str, Any]:
    """OpenAI's error shape, which its clients turn into their exception types."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def now() -> int:
    return int(time.time())
