"""Map a correction back to the type of the answer it corrects.

A ``str`` answer gives a ``str``; an ``AIMessage`` a copy of it with corrected content (id, tool calls, usage and
response metadata kept, the details under ``response_metadata["aligner"]``); a structured result (a pydantic object)
an object of its type. The details are the shared kernel's (``aligner_core.reporting.details``).
"""

from __future__ import annotations

import json
import logging
from typing import Any

from langchain_core.messages import AIMessage, AIMessageChunk

from aligner_core.correction import Correction
from aligner_core.reporting import describe, details, failure_details

from ._inputs import Pair

logger = logging.getLogger("langchain_aligner")

#: Key of the correction details in ``AIMessage.response_metadata``.
METADATA_KEY = "aligner"


def _with_text(content: str | list[Any], text: str) -> str | list[Any]:
    """``content`` with ``text`` in place of its text parts (one text part where the first was; others kept)."""
    if isinstance(content, str):
        return text
    out: list[Any] = []
    placed = False
    for block in content:
        is_text = isinstance(block, str) or (
            isinstance(block, dict) and block.get("type") in ("text", "output_text")
        )
        if not is_text:
            out.append(block)
        elif not placed:
            base = {k: v for k, v in block.items() if k != "annotations"} if isinstance(block, dict) else {}
            out.append({**base, "type": "text", "text": text})
            placed = True
    return out if placed else [*out, {"type": "text", "text": text}]


def with_details(answer: AIMessage, meta: dict[str, Any], **update: Any) -> AIMessage:
    """A copy of ``answer`` with ``meta`` under ``response_metadata["aligner"]`` (and ``update`` applied)."""
    return answer.model_copy(
        update={**update, "response_metadata": {**answer.response_metadata, METADATA_KEY: meta}}
    )


def output(
    pair: Pair, correction: Correction, model: str, *, include_original: bool = False
) -> tuple[Any, dict[str, Any]]:
    """A correction mapped back to the answer's type, with its details.

    A passed-through answer comes back as it was (a message gets the details). An empty correction is never a
    better answer: the original is kept and the details say so. A corrected structured answer is kept only when it
    validates (``Decision.settle``) and is parsed back into its type (a pydantic object, a tool call's arguments).
    """
    if pair.decision.corrects:
        correction = pair.decision.settle(correction)
    meta = details(correction, model=model, include_original=include_original)
    text = correction.text
    if pair.decision.corrects and not text.strip():
        text = pair.text
        meta.update(changed=False, similarity=1.0, empty_correction=True)
    if isinstance(pair.answer, str):
        return text, meta
    unchanged = not pair.decision.corrects or text == pair.text
    if not isinstance(pair.answer, AIMessage):  # a structured result (a pydantic object)
        return (pair.answer if unchanged else type(pair.answer).model_validate_json(text)), meta
    if unchanged:
        return with_details(pair.answer, meta), meta
    structure = pair.decision.structure
    if structure is not None and structure.kind == "tool_call" and pair.answer.tool_calls:
        call = {**pair.answer.tool_calls[0], "args": json.loads(text)}
        return with_details(pair.answer, meta, tool_calls=[call, *pair.answer.tool_calls[1:]]), meta
    return with_details(pair.answer, meta, content=_with_text(pair.answer.content, text)), meta


def passthrough(pair: Pair, exc: BaseException, model: str) -> tuple[Any, dict[str, Any]]:
    """The original answer after a corrector failure (``on_error="passthrough"``), with the error recorded in its
    details and the log."""
    logger.warning("the Aligner failed, passing the answer through: %s", describe(exc))
    meta = failure_details(pair.text, exc, model=model)
    if isinstance(pair.answer, AIMessage):
        return with_details(pair.answer, meta, content=_with_text(pair.answer.content, pair.text)), meta
    return pair.answer, meta


def to_chunk(message: AIMessage) -> AIMessageChunk:
    """The message as one chunk (tool calls become tool call chunks)."""
    if isinstance(message, AIMessageChunk):
        return message
    return AIMessageChunk(**message.model_dump(exclude={"type"}))


__all__ = ["METADATA_KEY", "output", "passthrough", "to_chunk", "with_details"]
