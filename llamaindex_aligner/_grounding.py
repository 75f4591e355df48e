"""What a correction is grounded on, read from LlamaIndex objects: a chat's question, history and tool turns,
retrieved nodes, and the answer's content blocks as the core's content parts.

The Aligner must see the evidence an answer relies on, or it will "fix" grounded facts: tool calls and their
results after the user's question (a function-calling agent's ``tool`` messages, a ReAct agent's actions and
``Observation:`` messages) and retrieved text (a synthesizer's ``context_str``, a response's ``source_nodes``)
go to the core as ``context``; the system prompt and earlier turns go as ``history``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from llama_index.core.base.llms.types import ChatMessage, ChatResponse, MessageRole, TextBlock, ToolCallBlock
from llama_index.core.schema import MetadataMode, NodeWithScore

from aligner_core.context import ContextItem
from aligner_core.reporting import role_of

from . import _react

#: LlamaIndex content block types as the core's content part types (others are unreadable: an error).
BLOCK_PARTS = {
    "image": "image",
    "audio": "audio",
    "video": "video",
    "document": "file",
    "thinking": "thinking",
    "tool_call": "tool_call",
    "cache": "non_standard",
    "citation": "non_standard",
    "citable": "non_standard",
}
#: Node metadata keys that name a document in the Aligner's prompt, first found wins.
NAME_KEYS = ("file_name", "title")
TOOL_ROLES = (MessageRole.TOOL, MessageRole.FUNCTION)
#: Shorter documents are not taken out of the history (see :func:`without`).
MIN_DOCUMENT = 20


@dataclass
class Turn:
    """The question an answer replies to, the conversation before it, and its grounding."""

    question: str
    history: list[dict[str, str]] = field(default_factory=list)
    context: list[ContextItem] = field(default_factory=list)


def history_turns(messages: Sequence[ChatMessage]) -> list[dict[str, str]]:
    """Messages as the core's ``history`` turns (text blocks joined); tool and function results, and messages
    without text (an assistant turn that only calls tools), are not history."""
    turns = []
    for message in messages:
        role, text = role_of(message.role), message.content or ""
        if role is not None and text.strip():
            turns.append({"role": role, "content": text})
    return turns


def read_chat(
    messages: Sequence[ChatMessage],
    *,
    question: str | None = None,
    documents: Sequence[str] = (),
    react: bool = False,
    tool_calls: Callable[[ChatMessage], list[tuple[str | None, str, Any]]] | None = None,
) -> Turn:
    """Split a chat at the user's last message: the question (``question`` if given: a prompt's ``query_str``),
    the turns before it as history, the tool calls and results after it (and ``documents``) as context.

    ``react``: the first system message is the ReAct agent's format instructions (not history), and
    ``Observation:`` messages are tool results, not the user's question."""
    messages = list(messages)
    if react and messages and messages[0].role == MessageRole.SYSTEM:
        messages = messages[1:]
    at = next((i for i in range(len(messages) - 1, -1, -1) if _asks(messages[i], react)), None)
    if at is None:
        text = question or "\n".join(f"{m.role.value}: {m.content or ''}" for m in messages)
        return Turn(text, [], [document(d) for d in documents])
    context = [document(d) for d in documents]
    context += react_context(messages[at + 1 :]) if react else tool_context(messages[at + 1 :], tool_calls)
    return Turn(
        question or messages[at].content or "", without(history_turns(messages[:at]), documents), context
    )


def _asks(message: ChatMessage, react: bool) -> bool:
    return (
        message.role == MessageRole.USER
        and bool((message.content or "").strip())
        and not (react and _react.is_observation(message))
    )


def tool_context(
    messages: Sequence[ChatMessage],
    tool_calls: Callable[[ChatMessage], list[tuple[str | None, str, Any]]] | None,
) -> list[ContextItem]:
    """Tool calls (assistant turns) and their results (``tool`` turns) as context items, results named after
    the call they answer."""
    items: list[ContextItem] = []
    names: dict[str, str] = {}
    for message in messages:
        if message.role in TOOL_ROLES:
            call_id = message.additional_kwargs.get("tool_call_id")
            name = message.additional_kwargs.get("name") or names.get(str(call_id))
            items.append(ContextItem("tool_result", message.content or "", name))
        elif message.role == MessageRole.ASSISTANT:
            for call_id, name, arguments in tool_calls(message) if tool_calls else []:
                names[str(call_id)] = name
                content = (
                    arguments
                    if isinstance(arguments, str)
                    else json.dumps(arguments, ensure_ascii=False, default=str)
                )
                items.append(ContextItem("tool_call", content, name))
    return items


def react_context(messages: Sequence[ChatMessage]) -> list[ContextItem]:
    """A ReAct agent's reasoning so far: its actions as tool calls, the observations as their results."""
    items, action = [], None
    for message in messages:
        item, action = _react.reasoning_context(
            getattr(message.role, "value", message.role), message.content or "", action
        )
        if item is not None:
            items.append(item)
    return items


def tool_calls_in(message: ChatMessage, llm: Any = None) -> list[tuple[str | None, str, Any]]:
    """``(id, name, arguments)`` of the tool calls a message makes: its ``ToolCallBlock``s, else what the
    function-calling ``llm`` reads from it (providers keep them in ``additional_kwargs``)."""
    blocks = [b for b in message.blocks if isinstance(b, ToolCallBlock)]
    if blocks:
        return [(b.tool_call_id, b.tool_name, b.tool_kwargs) for b in blocks]
    if llm is not None:
        try:
            selections = llm.get_tool_calls_from_response(
                ChatResponse(message=message), error_on_no_tool_call=False
            )
        except Exception:  # noqa: S110 - an LLM that cannot read tool calls found none
            selections = []
        if selections:
            return [
                (getattr(s, "tool_id", None), getattr(s, "tool_name", "tool"), getattr(s, "tool_kwargs", {}))
                for s in selections
            ]
    if message.additional_kwargs.get("tool_calls"):  # calls this LLM cannot read: still an action
        return [(None, "tool", {}) for _ in message.additional_kwargs["tool_calls"]]
    return []


def node_documents(nodes: Sequence[NodeWithScore]) -> list[ContextItem]:
    """Retrieved nodes as document items (named by their file name or title when they have one)."""
    items = []
    for item in nodes:
        text = item.node.get_content(metadata_mode=MetadataMode.NONE) or ""
        if text.strip():
            name = next((str(item.node.metadata[k]) for k in NAME_KEYS if item.node.metadata.get(k)), None)
            items.append(ContextItem("document", text, name))
    return items


def document(text: str) -> ContextItem:
    return ContextItem("document", text)


def without(turns: list[dict[str, str]], documents: Sequence[str]) -> list[dict[str, str]]:
    """History turns with the documents' text taken out (a context chat engine puts the retrieved text in its
    system prompt; the Aligner gets it once, as context). Turns left empty are dropped; a very short document is
    left in place (taking it out could cut words out of the conversation)."""
    out = []
    for turn in turns:
        content = turn["content"]
        for text in documents:
            if len(text.strip()) >= MIN_DOCUMENT:
                content = content.replace(text, "")
        if content.strip():
            out.append({**turn, "content": content})
    return out


def content_parts(message: ChatMessage) -> list[Any]:
    """A message's blocks as the core's content parts; text blocks joined with newlines, as ``content`` does."""
    parts: list[Any] = []
    texts = 0
    for block in message.blocks:
        if isinstance(block, TextBlock):
            parts.append({"type": "text", "text": ("\n" if texts else "") + block.text})
            texts += 1
        else:
            kind = getattr(block, "block_type", type(block).__name__)
            parts.append({"type": BLOCK_PARTS.get(kind, kind)})
    return parts
