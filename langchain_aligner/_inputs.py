"""Find the question, the answer, its history and its grounding in what a chain hands over.

A conversation's earlier messages become the core's ``history`` turns (roles by ``aligner_core.reporting.role_of``:
human -> ``user``, ai -> ``assistant``, system -> ``system``; text parts joined); tool and function messages, and
messages without text (an AI message that only calls tools), are left out: the history is the conversation as the
user saw it. The tool calls and tool results *after* the question (an agent's current turn) are the answer's
grounding, the core's ``context``, with any retrieved documents. What is corrected is the core's decision on the
answer (``aligner_core.decision``), made here once per answer.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, convert_to_messages
from langchain_core.prompt_values import PromptValue
from pydantic import BaseModel

from aligner_core import AlignerError
from aligner_core.decision import Decision, Reply, Structure, decide
from aligner_core.history import HISTORY_KEYS
from aligner_core.reporting import role_of

Turns = tuple[dict[str, str], ...]


class MissingQuestionError(AlignerError, ValueError):
    """No question for the Aligner: the input, the configurable values and the runnable all lack one."""


class UnsupportedInputError(AlignerError, TypeError):
    """The input is not a ``str``, an ``AIMessage``, a structured result or a dict holding one under the answer key."""


@dataclass(frozen=True)
class Pair:
    """One answer to correct: its question, the answer as received, the core's decision on it, history, grounding."""

    question: str
    answer: Any
    decision: Decision
    history: Turns = ()
    context: Turns = ()

    @property
    def text(self) -> str:
        """The answer's text: what is corrected, or what passes through."""
        return self.decision.text

    @property
    def skip(self) -> bool:
        """True when the answer passes through uncorrected (``decision.skip`` says why)."""
        return not self.decision.corrects

    @property
    def streams(self) -> bool:
        """Whether the correction may stream: structured output is kept or rejected whole, never in pieces."""
        return self.decision.corrects and self.decision.structure is None


def to_messages(value: Any, what: str) -> list[BaseMessage]:
    """Messages from a ``str`` (one human message), a prompt value, a message, or a list of messages /
    role-content dicts / tuples."""
    if isinstance(value, str):
        return [HumanMessage(value)]
    if isinstance(value, PromptValue):
        return value.to_messages()
    if isinstance(value, BaseMessage):
        return [value]
    if isinstance(value, Sequence) and not isinstance(value, bytes):
        try:
            return convert_to_messages(value)
        except (ValueError, TypeError, NotImplementedError) as exc:
            raise UnsupportedInputError(f"cannot read {what} from {type(value).__name__}: {exc}") from exc
    raise UnsupportedInputError(
        f"{what} must be a prompt value or a list of messages, got {type(value).__name__}"
    )


def history_turns(messages: Sequence[BaseMessage]) -> Turns:
    """The core's ``history`` turns for LangChain messages (see the module docstring for what is left out)."""
    turns = []
    for message in messages:
        role = role_of(getattr(message, "role", None) if message.type == "chat" else message.type)
        if role is not None and message.text.strip():
            turns.append({"role": role, "content": message.text})
    return tuple(turns)


def tool_context(messages: Sequence[BaseMessage]) -> Turns:
    """The grounding in an agent's turn: each tool call (its arguments as JSON) and each tool result (named by the
    call it answers), in order."""
    names: dict[Any, str] = {}
    items: list[dict[str, str]] = []
    for message in messages:
        if isinstance(message, AIMessage):
            for call in message.tool_calls:
                names[call.get("id")] = call["name"]
                args = json.dumps(call.get("args") or {}, ensure_ascii=False, sort_keys=True)
                items.append({"type": "tool_call", "name": call["name"], "content": args})
        elif message.type in ("tool", "function"):
            name = getattr(message, "name", None) or names.get(getattr(message, "tool_call_id", None))
            item = {"type": "tool_result", "content": message.text}
            items.append({**item, "name": name} if name else item)
    return tuple(i for i in items if i["content"].strip())


def split_question(value: Any) -> tuple[str, Turns, Turns]:
    """The question (a ``str``, or a conversation's last human message), the turns before it (history) and the
    tool calls and results after it (context)."""
    if isinstance(value, str):
        return value, (), ()
    if not isinstance(value, (PromptValue, BaseMessage, Sequence)):
        raise UnsupportedInputError(
            f"the question must be a str, a prompt value or a list of messages, got {type(value).__name__}"
        )
    messages = to_messages(value, "a question")
    for i in range(len(messages) - 1, -1, -1):
        if isinstance(messages[i], HumanMessage):
            return messages[i].text, history_turns(messages[:i]), tool_context(messages[i + 1 :])
    raise MissingQuestionError("the messages hold no human message to take the question from")


def conversation_request(messages: Sequence[BaseMessage]) -> dict[str, Any]:
    """A chat model's messages as the stage's question, history and context (its answer is added by the caller).
    Without a human message the answer is corrected against an empty question."""
    try:
        question, history, context = split_question(list(messages))
    except MissingQuestionError:
        question, history, context = "", (), ()
    return {"question": question, "history": list(history), "context": list(context)}


def history_value(value: Mapping[str, Any], key: str, *, strict: bool) -> Turns | None:
    """The history a dict input holds under ``key`` (else ``chat_history``), or None when it holds none.

    A ``str`` there is a prompt variable (the legacy memories' text buffer), not turns: it raises with ``strict``,
    else it is left alone.
    """
    found = next((value[k] for k in dict.fromkeys((key, *HISTORY_KEYS)) if value.get(k) is not None), None)
    if found is None:
        return None
    if isinstance(found, str):
        if strict:
            raise UnsupportedInputError(
                f"the history under {key!r} must be a list of messages or role/content dicts, got a str"
            )
        return None
    return history_turns(to_messages(found, "a history"))


def document_item(document: Any) -> dict[str, str]:
    """A LangChain ``Document`` as a context item (named by its ``source`` or ``title`` metadata)."""
    meta = getattr(document, "metadata", None) or {}
    name = meta.get("source") or meta.get("title")
    item = {"type": "document", "content": str(document.page_content)}
    return {**item, "name": str(name)} if name else item


def context_value(value: Any) -> Turns:
    """Grounding given with the input: retrieved ``Document``s, strings, or ``{"type", "content"}`` items."""
    if value is None or value == "":
        return ()
    if isinstance(value, str) or hasattr(value, "page_content"):
        value = [value]
    if isinstance(value, Mapping) or not isinstance(value, Sequence):
        raise UnsupportedInputError(
            f"the context must be a list of documents, strings or {{'type', 'content'}} items, got {type(value).__name__}"
        )
    items: list[dict[str, str]] = []
    for item in value:
        if hasattr(item, "page_content"):
            items.append(document_item(item))
        elif isinstance(item, str):
            items.append({"type": "document", "content": item})
        elif isinstance(item, Mapping):
            items.append(dict(item))
        else:
            raise UnsupportedInputError(
                f"a context item must be a document, a str or a dict, got {type(item).__name__}"
            )
    return tuple(items)


def reply_of(answer: Any, structure: Structure | None = None) -> Reply:
    """The core's view of an answer: a ``str``, an ``AIMessage`` (tool calls, refusal, content parts) or a
    structured result (a pydantic object, validated against its own class when corrected)."""
    if isinstance(answer, str):
        return Reply(content=answer, structure=structure)
    if isinstance(answer, AIMessage):
        if structure is not None and structure.kind == "tool_call" and len(answer.tool_calls) == 1:
            args = json.dumps(answer.tool_calls[0].get("args") or {}, ensure_ascii=False)
            return Reply(
                content=args, structure=structure
            )  # the call is the structured answer, not an action
        if structure is None and answer.additional_kwargs.get("parsed") is not None:
            structure = Structure("json")  # an OpenAI ``.parse()``-style structured answer
        calls = bool(answer.tool_calls or answer.invalid_tool_calls)
        return Reply(
            content=answer.content,
            tool_calls=calls,
            refusal=answer.additional_kwargs.get("refusal"),
            structure=structure,
        )
    if isinstance(answer, BaseModel):
        model = type(answer)
        own = Structure("json_schema", model.model_json_schema(), model.model_validate, model.__name__)
        return Reply(content=answer.model_dump_json(), structure=structure or own)
    raise UnsupportedInputError(
        f"the answer must be a str, an AIMessage or a structured result, got {type(answer).__name__}: put "
        "AlignerRunnable after the chat model (or a StrOutputParser), or pass a dict with the answer under answer_key"
    )


def resolve(
    value: Any,
    *,
    question_key: str,
    answer_key: str,
    question: str | None,
    configurable: Mapping[str, Any] | None,
    history_key: str = "history",
    context_key: str = "context",
    structure: Structure | None = None,
    correct_structured: bool = False,
) -> Pair:
    """Split a stage input into a :class:`Pair`.

    The question comes from the input dict's ``question_key``, else ``configurable[question_key]``, else the fixed
    ``question``. The history comes from the input dict's ``history_key`` (or ``chat_history``), else
    ``configurable[history_key]``; a question given as messages adds the messages before its last human one, and
    the tool turns after it to the context. The context also comes from the input dict's ``context_key``.
    """
    found: Any = None
    history: Turns | None = None
    given: Turns = ()
    if isinstance(value, Mapping):
        if answer_key not in value:
            raise UnsupportedInputError(
                f"the input dict has no {answer_key!r} key (keys: {sorted(map(str, value))}); set answer_key="
            )
        history = history_value(value, history_key, strict=True)
        given = context_value(value.get(context_key))
        found, value = value.get(question_key), value[answer_key]
    if history is None and configurable and configurable.get(history_key) is not None:
        history = history_value({history_key: configurable[history_key]}, history_key, strict=True)
    if found is None and configurable:
        found = configurable.get(question_key)
    if found is None:
        found = question
    if found is None:
        raise MissingQuestionError(
            f"no question for the Aligner: pass a dict with a {question_key!r} key, set "
            f"AlignerRunnable(question=...), or call with config={{'configurable': {{{question_key!r}: ...}}}}"
        )
    asked, earlier, tools = split_question(found)
    decision = decide(reply_of(value, structure), correct_structured=correct_structured)
    return Pair(
        question=asked,
        answer=value,
        decision=decision,
        history=(*(history or ()), *earlier),
        context=(*tools, *given),
    )


def merge(acc: Any, chunk: Any) -> Any:
    """Add up streamed input chunks: strings and message chunks add, dicts merge key by key."""
    if acc is None:
        return chunk
    if isinstance(acc, Mapping) and isinstance(chunk, Mapping):
        merged = dict(acc)
        for key, value in chunk.items():
            merged[key] = merged[key] + value if merged.get(key) is not None else value
        return merged
    return acc + chunk


__all__ = [
    "MissingQuestionError",
    "Pair",
    "Turns",
    "UnsupportedInputError",
    "context_value",
    "conversation_request",
    "document_item",
    "history_turns",
    "history_value",
    "merge",
    "reply_of",
    "resolve",
    "split_question",
    "to_messages",
]
