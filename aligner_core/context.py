"""Grounding context: what an answer was based on (tool calls and their results, retrieved documents).

A corrector that cannot see the evidence will "fix" grounded facts: after a tool said "sunny, 21C", the
answer "It is sunny and 21C in Paris." is right, and only the tool result says so. Every entry point takes
``context=``, a list of items:

- ``{"type": "tool_call", "name": "get_weather", "content": '{"city": "Paris"}'}``: a call the model made;
- ``{"type": "tool_result", "name": "get_weather", "content": "sunny, 21C"}``: what the tool returned;
- ``{"type": "document", "name": "source or title", "content": "..."}`` (or a plain ``str``): retrieved text.

How a template sees it (one rendering path for inference and training, ``history.render_prompt``):
single-turn text templates (the official ``aligner-v1``/``aligner-general``/``aligner-empathy``) get it
folded into the question part after the history, in one fixed form (:func:`fold_context`); the ``chat``
template sends it as real turns (:func:`context_messages`). An empty context leaves every prompt byte-exact.
When the prompt budget is short, context items are dropped first, the one farthest from the question
(the first) first; ``Correction.metadata`` records ``context_items`` (kept), ``context_trimmed`` and
``context_tokens``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from .errors import InvalidInputError

ContextKind = Literal["tool_call", "tool_result", "document"]
KINDS: tuple[str, ...] = ("tool_call", "tool_result", "document")
#: Keys under which records, dict pairs and request bodies carry a context.
CONTEXT_KEYS = ("context",)


@dataclass(frozen=True)
class ContextItem:
    """One piece of grounding: a tool call, a tool result or a document."""

    kind: ContextKind
    content: str
    name: str | None = None

    def line(self) -> str:
        """The item as one entry of the folded text form."""
        label = {"tool_call": "Tool call", "tool_result": "Tool result", "document": "Document"}[self.kind]
        return f"{label} ({self.name}): {self.content}" if self.name else f"{label}: {self.content}"

    def to_dict(self) -> dict[str, str]:
        data = {"type": self.kind, "content": self.content}
        if self.name:
            data["name"] = self.name
        return data


Context = tuple[ContextItem, ...]


def normalize_context(context: Any, where: str = "") -> Context:
    """Validate ``context`` and return it as ``ContextItem``s; ``None`` is no context.

    Accepts a ``str`` (one document), ``ContextItem``s, and dicts with ``type`` (or ``kind``) and ``content``
    (or ``text``), ``name`` optional. A tool call's ``content`` may be its arguments as a dict (JSON-encoded).
    """
    if context is None:
        return ()
    if isinstance(context, str):
        context = [context]
    if isinstance(context, (bytes, Mapping)) or not isinstance(context, Sequence):
        raise InvalidInputError(
            f"{where}context must be a list of {{'type', 'content'}} items or strings, got {type(context).__name__}"
        )
    items: list[ContextItem] = []
    for i, item in enumerate(context):
        if isinstance(item, ContextItem):
            items.append(_checked(item, where, i))
        elif isinstance(item, str):
            items.append(_checked(ContextItem("document", item), where, i))
        elif isinstance(item, Mapping):
            kind = item.get("type", item.get("kind", "document"))
            if kind not in KINDS:
                raise InvalidInputError(
                    f"{where}context item {i} has type {kind!r}; use one of {', '.join(KINDS)}"
                )
            content = item.get("content", item.get("text"))
            if kind == "tool_call" and isinstance(content, Mapping):
                content = json.dumps(content, ensure_ascii=False, sort_keys=True)
            name = item.get("name")
            if name is not None and not isinstance(name, str):
                raise InvalidInputError(
                    f"{where}context item {i} name must be a str, got {type(name).__name__}"
                )
            if not isinstance(content, str):
                raise InvalidInputError(
                    f"{where}context item {i} content must be a str, got {type(content).__name__}"
                )
            items.append(_checked(ContextItem(kind, content, name or None), where, i))
        else:
            raise InvalidInputError(
                f"{where}context item {i} must be a str or a {{'type', 'content'}} dict, "
                f"got {type(item).__name__}"
            )
    return tuple(item for item in items if item.content.strip())


def _checked(item: ContextItem, where: str, index: int) -> ContextItem:
    for what, text in (("content", item.content), ("name", item.name or "")):
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise InvalidInputError(
                f"{where}context item {index} {what} holds a lone surrogate at character {exc.start}: "
                "not valid Unicode text"
            ) from None
    return item


def context_of(record: Mapping[str, Any]) -> Any:
    """The raw context of a record or dict pair, or None. A string that holds a JSON list is read as one (how
    CSV/TSV files carry a list of items); any other string is one document."""
    value = next((record[k] for k in CONTEXT_KEYS if record.get(k) not in (None, "")), None)
    if isinstance(value, str) and value.lstrip().startswith("["):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


#: How a single-turn template sees the context: after the history, before the question.
CONTEXT_HEADER = "The answer may rely on:\n"


def context_lines(context: Context) -> str:
    """The items as text, one per line: ``Tool call (name): ...`` / ``Tool result (name): ...`` / ``Document: ...``."""
    return "\n".join(item.line() for item in context)


def context_texts(context: Context) -> tuple[str, ...]:
    """The user-supplied pieces of a context (kept as plain text when they hold special-token strings)."""
    return tuple(text for item in context for text in (item.content, item.name or "") if text)


def context_messages(context: Context) -> list[dict[str, str]]:
    """The items as chat turns: a tool call is the assistant's turn, its result a ``tool`` turn, and the
    documents one ``system`` turn (in the chat template they sit between the history and the correction request)."""
    messages: list[dict[str, str]] = []
    documents = [item for item in context if item.kind == "document"]
    if documents:
        messages.append({"role": "system", "content": CONTEXT_HEADER + context_lines(tuple(documents))})
    for item in context:
        if item.kind == "tool_call":
            messages.append({"role": "assistant", "content": item.line()})
        elif item.kind == "tool_result":
            messages.append({"role": "tool", "content": item.content})
    return messages


def as_dicts(context: Context) -> list[dict[str, str]]:
    """The items as JSON-ready dicts (what files and request bodies carry)."""
    return [item.to_dict() for item in context]


__all__ = [
    "CONTEXT_HEADER",
    "CONTEXT_KEYS",
    "Context",
    "ContextItem",
    "as_dicts",
    "context_lines",
    "context_messages",
    "context_of",
    "context_texts",
    "normalize_context",
]
