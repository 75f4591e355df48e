"""One decision per upstream choice, made by the core (``aligner_core.decision.decide``), the same as in every
adapter: correct the answer's text, or pass the message through as the upstream sent it, with the reason in the
choice's ``aligner`` field (``corrected: false``, ``skipped``, ``skipped_detail``).

What the proxy adds is the OpenAI wire format around it: reading a choice's message as a ``Reply``, writing a
corrected text back in the shape the upstream used, and the stream delta of a message that passes through.
Content the Aligner cannot read raises ``UnreadableContentError`` (HTTP 502): never passed on as if handled.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from aligner_core.decision import TEXT_PARTS, Decision, Reply, decide
from aligner_core.errors import UnreadableContentError

from .structured import RequestedStructure


def message_of(choice: Mapping[str, Any]) -> dict[str, Any]:
    """A choice's message (an empty one when the upstream sent none)."""
    message = choice.get("message")
    return message if isinstance(message, dict) else {}


def decide_choice(
    message: Mapping[str, Any], index: int, structure: RequestedStructure | None, *, correct_structured: bool
) -> Decision:
    """Correct or pass through one upstream message. ``correct_structured`` applies only where a correction can be
    checked (JSON and JSON schema); a regex, choice or grammar answer always passes through."""
    refusal = message.get("refusal")
    reply = Reply(
        content=message.get("content"),
        tool_calls=bool(message.get("tool_calls") or message.get("function_call")),
        refusal=refusal if isinstance(refusal, str) and refusal else None,
        structure=structure.structure if structure is not None else None,
    )
    checkable = structure is None or structure.checkable
    try:
        return decide(reply, correct_structured=correct_structured and checkable)
    except UnreadableContentError as exc:
        raise UnreadableContentError(f"the upstream's choices[{index}].message.content: {exc}") from None


def passthrough_details(decision: Decision, structure: RequestedStructure | None) -> dict[str, Any]:
    """The ``aligner`` field of a choice passed through uncorrected: the core's record of why."""
    details: dict[str, Any] = {"corrected": False, **decision.metadata()}
    if "structured" in details and structure is not None:
        details["structured"] = structure.kind  # "regex", "choice", ... where the core only knows "json"
    return details


def with_text(content: Any, text: str) -> Any:
    """``content`` holding ``text`` instead of its text, in the shape the upstream used: a string becomes ``text``;
    a list of parts keeps its other parts (images, audio, reasoning) where they were and holds ``text`` as one
    part in the place of its first text part (the others, whose text the correction replaced, are dropped)."""
    if not isinstance(content, list):
        return text
    out: list[Any] = []
    placed = False
    for part in content:
        is_text = isinstance(part, str) or (isinstance(part, Mapping) and part.get("type") in TEXT_PARTS)
        if not is_text:
            out.append(part)
        elif not placed:
            out.append(text if isinstance(part, str) else {"type": part["type"], "text": text})
            placed = True
    return out


def passthrough_delta(message: Mapping[str, Any], decision: Decision) -> dict[str, Any]:
    """A message that passes through, as the one delta of a stream: its tool calls, function call and refusal
    as the upstream sent them; its content as text (stream deltas carry strings, never lists of parts)."""
    content = message.get("content")
    delta: dict[str, Any] = {
        "role": "assistant",
        "content": content if content is None or isinstance(content, str) else decision.text,
    }
    if isinstance(message.get("tool_calls"), list):
        delta["tool_calls"] = [
            {"index": i, **call} if isinstance(call, Mapping) else call
            for i, call in enumerate(message["tool_calls"])
        ]
    if message.get("function_call"):
        delta["function_call"] = message["function_call"]
    if isinstance(message.get("refusal"), str):
        delta["refusal"] = message["refusal"]
    return delta


__all__ = ["decide_choice", "message_of", "passthrough_delta", "passthrough_details", "with_text"]
