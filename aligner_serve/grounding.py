"""What of a chat request the Aligner sees: the question, the conversation before it, and what the answer
is grounded on.

The last user message is the question. A request without one is answered too (as vLLM answers it): its question
is then the last system or developer message (the instruction the answer follows), and with neither the question
is empty and every text turn is history. The turns before the question are history, text turns only, as the
Aligner's templates take them. The turns after it belong to the answer being made: the assistant's tool calls and the
tools' results, which become the correction's ``context`` (``aligner_core.context``), so the Aligner sees the
evidence the final answer relies on and does not "fix" grounded facts. Tool turns of earlier user turns grounded
earlier answers (which are in the history as text), so they are left out, as are the text parts of the
assistant's tool-call turns (an agent's "let me check", not evidence).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from aligner_core.context import Context, normalize_context
from aligner_core.decision import read_content
from aligner_core.errors import InvalidInputError, UnreadableContentError
from aligner_core.reporting import role_of

from .bad_request import RequestShapeError

#: Where the question is looked for, in order: the last message of the first of these roles found.
QUESTION_ROLES = (("user",), ("system", "developer"))


@dataclass(frozen=True)
class Turns:
    """The question, the text turns before it, and the tool turns after it as context. ``question_role`` is the role
    of the message the question came from (``user``; ``system`` without a user message; None without either)."""

    question: str
    history: list[dict[str, str]]
    context: Context
    question_role: str | None = "user"


def read_turns(messages: Sequence[Mapping[str, Any]]) -> Turns:
    """Split validated messages (each a dict with a ``role``) into question, history and grounding context."""
    for roles in QUESTION_ROLES:
        at = max((i for i, m in enumerate(messages) if m["role"] in roles), default=None)
        if at is not None:
            break
    if at is None:  # only assistant (or tool) turns: no question; the conversation so far is history
        return Turns("", history_of(messages), (), None)
    question = text_of(messages[at].get("content"))
    if question is None:
        raise RequestShapeError(
            f"messages[{at}] (the question) has no text content", param=f"messages[{at}].content"
        )
    role = "system" if messages[at]["role"] == "developer" else messages[at]["role"]
    return Turns(question, history_of(messages[:at]), turn_context(messages[at + 1 :], at + 1), role)


def text_of(content: Any) -> str | None:
    """The text of a message's ``content``: a string, or the text parts of a list of parts (None if none)."""
    if isinstance(content, str):
        return content
    if isinstance(content, Sequence):
        parts = [p.get("text") for p in content if isinstance(p, Mapping) and p.get("type") == "text"]
        texts = [t for t in parts if isinstance(t, str)]
        return "\n".join(texts) if texts else None
    return None


def history_of(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, str]]:
    """Earlier turns as the Aligner's history: text turns only (tool calls and tool results are left out)."""
    turns = []
    for m in messages:
        role = role_of(m["role"])  # OpenAI's ``developer`` is a system prompt by another name
        text = text_of(m.get("content"))
        if role is not None and text:
            turns.append({"role": role, "content": text})
    return turns


def turn_context(messages: Sequence[Mapping[str, Any]], offset: int = 0) -> Context:
    """The tool calls (name and arguments) and tool results (the tool's name found by ``tool_call_id``) of the
    turns after the question, in order, as context items. ``offset`` is the index of the first one in the request
    (for error messages)."""
    names: dict[str, str] = {}
    items: list[dict[str, Any]] = []
    for i, m in enumerate(messages, start=offset):
        role = m["role"]
        if role == "assistant":
            for call in _calls(m, i):
                if isinstance(call.get("id"), str) and call["name"]:
                    names[call["id"]] = call["name"]
                items.append({"type": "tool_call", "name": call["name"], "content": call["arguments"]})
        elif role in ("tool", "function"):
            name = names.get(m.get("tool_call_id")) or m.get("name")  # type: ignore[arg-type]
            items.append(
                {
                    "type": "tool_result",
                    "name": name if isinstance(name, str) else None,
                    "content": _tool_text(m.get("content"), i),
                }
            )
    try:
        return normalize_context(items, "messages: ")
    except InvalidInputError as exc:
        raise RequestShapeError(str(exc), param="messages") from None


def _calls(message: Mapping[str, Any], index: int) -> list[dict[str, Any]]:
    """The tool calls of an assistant turn (``tool_calls``, or the legacy ``function_call``) as
    ``{id, name, arguments}`` with the arguments as text."""
    raw = message.get("tool_calls")
    if raw is not None and not isinstance(raw, list):
        raise RequestShapeError(
            f"messages[{index}].tool_calls must be a list", param=f"messages[{index}].tool_calls"
        )
    calls: list[dict[str, Any]] = []
    for j, call in enumerate(raw or []):
        function = call.get("function") if isinstance(call, Mapping) else None
        if not isinstance(function, Mapping):
            raise RequestShapeError(
                f"messages[{index}].tool_calls[{j}] must be an object with a 'function'",
                param=f"messages[{index}].tool_calls[{j}]",
            )
        calls.append({"id": call.get("id"), **_function(function)})
    legacy = message.get("function_call")
    if isinstance(legacy, Mapping):
        calls.append({"id": None, **_function(legacy)})
    return calls


def _function(function: Mapping[str, Any]) -> dict[str, Any]:
    name = function.get("name")
    arguments = function.get("arguments")
    if isinstance(arguments, Mapping):
        arguments = json.dumps(arguments, ensure_ascii=False, sort_keys=True)
    elif not isinstance(arguments, str) or not arguments.strip():
        arguments = "{}"  # a call without arguments is still a call: keep its name in the context
    return {"name": name if isinstance(name, str) and name else None, "arguments": arguments}


def _tool_text(content: Any, index: int) -> str:
    """A tool result's text: a string or a list of text parts (OpenAI allows both); anything else is a 400."""
    try:
        return read_content(content).text
    except UnreadableContentError as exc:
        raise RequestShapeError(
            f"messages[{index}].content (a tool result): {exc}", param=f"messages[{index}].content"
        ) from None


__all__ = ["QUESTION_ROLES", "Turns", "history_of", "read_turns", "text_of", "turn_context"]
