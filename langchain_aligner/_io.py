"""Find the question, the answer and its grounding in what a chain hands over, and map a correction back.

The answer decides the output type: a ``str`` answer gives a ``str``, an ``AIMessage`` a copy of it with
corrected content (id, tool calls, usage and response metadata kept, details under
``response_metadata["aligner"]``), a structured result (a pydantic object) an object of its type. What is
corrected is the core's decision (``aligner_core.decision``): an answer that calls tools, a refusal, structured
output (unless ``correct_structured``), an empty answer or an intermediate step passes through unchanged with
``skipped`` in the details; content the Aligner cannot read raises ``UnreadableContentError``.

A conversation's earlier messages become the core's ``history`` turns: human -> ``user``, ai -> ``assistant``,
system -> ``system`` (text parts joined); tool and function messages, and messages without text (an AI message
that only calls tools), are skipped there. The tool calls and tool results *after* the question (the current
turn of an agent) are the answer's grounding, the core's ``context``, with any retrieved documents.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from langchain_core.messages import (
    AIMessage,
    AIMessageChunk,
    BaseMessage,
    HumanMessage,
    SystemMessage,
    convert_to_messages,
)
from langchain_core.prompt_values import PromptValue
from pydantic import BaseModel

from aligner_core import AlignerError, Correction
from aligner_core.context import CONTEXT_HEADER, context_lines, normalize_context
from aligner_core.decision import Decision, Reply, Structure, decide
from aligner_core.history import HISTORY_KEYS

logger = logging.getLogger("langchain_aligner")

#: Key of the correction details in ``AIMessage.response_metadata``.
METADATA_KEY = "aligner"

Turns = tuple[dict[str, str], ...]


class MissingQuestionError(AlignerError, ValueError):
    """No question for the Aligner: the input, the configurable values and the runnable all lack one."""


class UnsupportedInputError(AlignerError, TypeError):
    """The input is not a ``str``, an ``AIMessage``, a structured result or a dict holding one under the answer key."""


@dataclass(frozen=True)
class Job:
    """One answer: its question, the answer as received, the core's decision on it, its history and grounding."""

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
    def turns(self) -> list[dict[str, str]] | None:
        """The ``history=`` for the core: the earlier turns, or None when there are none."""
        return [dict(t) for t in self.history] or None

    @property
    def grounding(self) -> list[dict[str, str]] | None:
        """The ``context=`` for the core: tool calls, tool results and documents, or None."""
        return [dict(c) for c in self.context] or None

    def pair(self) -> dict[str, Any]:
        """The batch item for ``correct_batch``."""
        return {"question": self.question, "answer": self.text, "history": self.turns, "context": self.grounding}


#: LangChain message types and the core's history roles; other messages (tool, function) are skipped.
ROLES = {"human": "user", "user": "user", "ai": "assistant", "assistant": "assistant", "system": "system"}


def to_messages(value: Any, what: str) -> list[BaseMessage]:
    """Messages from a prompt value, a message, or a list of messages / role-content dicts / tuples."""
    if isinstance(value, PromptValue):
        return value.to_messages()
    if isinstance(value, BaseMessage):
        return [value]
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        try:
            return convert_to_messages(value)
        except (ValueError, TypeError, NotImplementedError) as exc:
            raise UnsupportedInputError(f"cannot read {what} from {type(value).__name__}: {exc}") from exc
    raise UnsupportedInputError(f"{what} must be a prompt value or a list of messages, got {type(value).__name__}")


def history_turns(messages: Sequence[BaseMessage]) -> Turns:
    """The core's ``history`` turns for LangChain messages (see the module docstring for what is skipped)."""
    turns = []
    for message in messages:
        role = ROLES.get(getattr(message, "role", None) if message.type == "chat" else message.type)
        text = message.text
        if role is not None and text.strip():
            turns.append({"role": role, "content": text})
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
            return messages[i].text, history_turns(messages[:i]), tool_context(messages[i + 1:])
    raise MissingQuestionError("the messages hold no human message to take the question from")


def history_value(value: Mapping[str, Any], key: str, *, strict: bool) -> Turns | None:
    """The history a dict input holds under ``key`` (else ``chat_history``), or None when it holds none.

    A ``str`` there is a prompt variable (the legacy memories' text buffer), not turns: it raises with
    ``strict``, else it is left alone.
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
            raise UnsupportedInputError(f"a context item must be a document, a str or a dict, got {type(item).__name__}")
    return tuple(items)


def turn_messages(turns: Sequence[Mapping[str, str]], context: Sequence[Mapping[str, str]] = ()) -> list[BaseMessage]:
    """History turns back as LangChain messages, and the context as one system message (for traces)."""
    kinds = {"user": HumanMessage, "assistant": AIMessage, "system": SystemMessage}
    messages: list[BaseMessage] = [kinds[t["role"]](t["content"]) for t in turns]
    if context:
        messages.append(SystemMessage(CONTEXT_HEADER + context_lines(normalize_context(list(context)))))
    return messages


def reply_of(answer: Any, structure: Structure | None = None) -> Reply:
    """The core's view of an answer: a ``str``, an ``AIMessage`` (tool calls, refusal, content parts) or a
    structured result (a pydantic object, validated against its own class when corrected)."""
    if isinstance(answer, str):
        return Reply(content=answer, structure=structure)
    if isinstance(answer, AIMessage):
        if structure is not None and structure.kind == "tool_call" and len(answer.tool_calls) == 1:
            args = json.dumps(answer.tool_calls[0].get("args") or {}, ensure_ascii=False)
            return Reply(content=args, structure=structure)  # the call is the structured answer, not an action
        if structure is None and answer.additional_kwargs.get("parsed") is not None:
            structure = Structure("json")  # an OpenAI ``.parse()``-style structured answer
        calls = bool(answer.tool_calls or answer.invalid_tool_calls)
        return Reply(content=answer.content, tool_calls=calls, refusal=answer.additional_kwargs.get("refusal"),
                     structure=structure)
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
    context: Turns = (),
) -> Job:
    """Split a stage input into a ``Job``.

    The question comes from the input dict's ``question_key``, else ``configurable[question_key]``,
    else the fixed ``question``. The history comes from the input dict's ``history_key`` (or
    ``chat_history``), else ``configurable[history_key]``; a question given as messages adds the
    messages before its last human one, and the tool turns after it to the context. The context also
    comes from the input dict's ``context_key`` (documents, strings or items) and from ``context``.
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
    return Job(question=asked, answer=value, decision=decision, history=(*(history or ()), *earlier),
               context=(*context, *tools, *given))


#: The inspector's verdict in a correction's metadata, repeated at the top of the details when present; so is
#: the core's reason for passing an answer through.
TOP_KEYS = ("inspector_score", "inspector_threshold", "inspector_passed", "skipped", "skipped_detail")


def details(correction: Correction, aligner_name: str, *, include_original: bool = False) -> dict[str, Any]:
    """What ``response_metadata["aligner"]`` holds for a correction (the text itself is the content).

    An inspected answer also has ``inspector_score``, ``inspector_threshold`` and ``inspector_passed`` at the
    top, and an answer passed through has ``skipped`` (the core's reason) and ``skipped_detail`` there: it came
    back unchanged, with no tokens generated. The uncorrected answer (``original``) is left out unless
    ``include_original``: the message flows on to users (LangGraph state and stream modes carry it whole), and
    the answer the Aligner replaced must not travel with it.
    """
    data = correction.to_dict()
    del data["question"], data["text"]
    if not include_original and correction.changed:
        del data["original"]
    top = {k: correction.metadata[k] for k in TOP_KEYS if k in correction.metadata}
    return {"model": aligner_name, **data, **top}


def failure(job: Job, exc: BaseException, aligner_name: str) -> dict[str, Any]:
    """What ``response_metadata["aligner"]`` holds when the corrector failed and the answer passed through."""
    return {
        "model": aligner_name,
        "original": job.text,
        "changed": False,
        "error": f"{type(exc).__name__}: {exc}",
        "error_type": type(exc).__name__,
    }


def _with_text(content: str | list[Any], text: str) -> str | list[Any]:
    if isinstance(content, str):
        return text
    out: list[Any] = []
    placed = False
    for block in content:
        is_text = isinstance(block, str) or (isinstance(block, dict) and block.get("type") in ("text", "output_text"))
        if not is_text:
            out.append(block)
        elif not placed:
            base = {k: v for k, v in block.items() if k != "annotations"} if isinstance(block, dict) else {}
            out.append({**base, "type": "text", "text": text})
            placed = True
    return out if placed else [*out, {"type": "text", "text": text}]


def with_details(answer: AIMessage, meta: dict[str, Any], **update: Any) -> AIMessage:
    """A copy of ``answer`` with ``meta`` under ``response_metadata["aligner"]`` (and ``update`` applied)."""
    return answer.model_copy(update={**update, "response_metadata": {**answer.response_metadata, METADATA_KEY: meta}})


def message_with(answer: AIMessage, text: str, meta: dict[str, Any]) -> AIMessage:
    """A copy of ``answer`` with ``text`` as its content and ``meta`` under ``response_metadata["aligner"]``."""
    return with_details(answer, meta, content=_with_text(answer.content, text))


def output(
    job: Job, correction: Correction, aligner_name: str, *, include_original: bool = False
) -> tuple[Any, dict[str, Any]]:
    """Map a correction back to the answer's type, with its details.

    A passed-through answer comes back as it was (a message gets the details). An empty correction is never a
    better answer: the original is kept and the details say so. A corrected structured answer is kept only when it
    validates (``Decision.settle``) and is parsed back into its type (a pydantic object, a tool call's arguments).
    """
    if job.decision.corrects:
        correction = job.decision.settle(correction)
    meta = details(correction, aligner_name, include_original=include_original)
    text = correction.text
    if job.decision.corrects and not text.strip():
        text = job.text
        meta.update(changed=False, similarity=1.0, empty_correction=True)
    if isinstance(job.answer, str):
        return text, meta
    unchanged = not job.decision.corrects or text == job.text
    if not isinstance(job.answer, AIMessage):  # a structured result (a pydantic object)
        return (job.answer if unchanged else type(job.answer).model_validate_json(text)), meta
    if unchanged:
        return with_details(job.answer, meta), meta
    structure = job.decision.structure
    if structure is not None and structure.kind == "tool_call" and job.answer.tool_calls:
        call = {**job.answer.tool_calls[0], "args": json.loads(text)}
        return with_details(job.answer, meta, tool_calls=[call, *job.answer.tool_calls[1:]]), meta
    return message_with(job.answer, text, meta), meta


def skipped(job: Job, metadata: Mapping[str, Any]) -> Correction:
    """The Correction of an answer the core passes through (no generation)."""
    return job.decision.passthrough(job.question, metadata)


def passthrough(job: Job, exc: BaseException, aligner_name: str) -> Any:
    """The original answer after a corrector failure, with the error recorded (metadata and log)."""
    logger.warning("the Aligner failed, passing the answer through: %s: %s", type(exc).__name__, exc)
    if isinstance(job.answer, AIMessage):
        return message_with(job.answer, job.text, failure(job, exc, aligner_name))
    return job.answer


def to_chunk(message: AIMessage) -> AIMessageChunk:
    """The message as one chunk (tool calls become tool call chunks)."""
    if isinstance(message, AIMessageChunk):
        return message
    return AIMessageChunk(**message.model_dump(exclude={"type"}))


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
