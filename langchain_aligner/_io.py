"""Find the question and the answer in what a chain hands over, and map a correction back to its type.

The answer decides the output type: a ``str`` answer gives a ``str``, an ``AIMessage`` a copy of it
with corrected content (id, tool calls, usage and response metadata kept, details under
``response_metadata["aligner"]``). Answers without text (a message that only calls tools, an
empty string) pass through untouched: there is nothing to correct.

A conversation's earlier messages become the core's ``history`` turns: human -> ``user``, ai ->
``assistant``, system -> ``system`` (text parts joined); tool and function messages, and messages
without text (an AI message that only calls tools), are skipped.
"""

from __future__ import annotations

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

from aligner_core import AlignerError, Correction
from aligner_core.history import HISTORY_KEYS

logger = logging.getLogger("langchain_aligner")

#: Key of the correction details in ``AIMessage.response_metadata``.
METADATA_KEY = "aligner"


class MissingQuestionError(AlignerError, ValueError):
    """No question for the Aligner: the input, the configurable values and the runnable all lack one."""


class UnsupportedInputError(AlignerError, TypeError):
    """The input is not a ``str``, an ``AIMessage`` or a dict holding one under the answer key."""


@dataclass(frozen=True)
class Job:
    """One answer to correct: its question, the answer as received, and the answer's text."""

    question: str
    answer: str | AIMessage
    text: str
    history: tuple[dict[str, str], ...] = ()

    @property
    def skip(self) -> bool:
        """True when there is no text to correct (tool calls only, or empty)."""
        return not self.text.strip()

    @property
    def turns(self) -> list[dict[str, str]] | None:
        """The ``history=`` for the core: the earlier turns, or None when there are none."""
        return [dict(t) for t in self.history] or None

    def pair(self) -> tuple[str, str] | tuple[str, str, list[dict[str, str]]]:
        """The batch item for ``correct_batch``: ``(question, answer)``, plus the history when there is one."""
        return (self.question, self.text, self.turns) if self.history else (self.question, self.text)


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


def history_turns(messages: Sequence[BaseMessage]) -> tuple[dict[str, str], ...]:
    """The core's ``history`` turns for LangChain messages (see the module docstring for what is skipped)."""
    turns = []
    for message in messages:
        role = ROLES.get(getattr(message, "role", None) if message.type == "chat" else message.type)
        text = message.text
        if role is not None and text.strip():
            turns.append({"role": role, "content": text})
    return tuple(turns)


def split_question(value: Any) -> tuple[str, tuple[dict[str, str], ...]]:
    """The question (a ``str``, or a conversation's last human message) and the turns before it."""
    if isinstance(value, str):
        return value, ()
    if not isinstance(value, (PromptValue, BaseMessage, Sequence)):
        raise UnsupportedInputError(
            f"the question must be a str, a prompt value or a list of messages, got {type(value).__name__}"
        )
    messages = to_messages(value, "a question")
    for i in range(len(messages) - 1, -1, -1):
        if isinstance(messages[i], HumanMessage):
            return messages[i].text, history_turns(messages[:i])
    raise MissingQuestionError("the messages hold no human message to take the question from")


def history_value(value: Mapping[str, Any], key: str, *, strict: bool) -> tuple[dict[str, str], ...] | None:
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


def turn_messages(turns: Sequence[Mapping[str, str]]) -> list[BaseMessage]:
    """History turns back as LangChain messages (for traces)."""
    kinds = {"user": HumanMessage, "assistant": AIMessage, "system": SystemMessage}
    return [kinds[t["role"]](t["content"]) for t in turns]


def answer_text(answer: Any) -> str:
    """The text to correct: the ``str`` itself or the message's text blocks."""
    if isinstance(answer, str):
        return answer
    if isinstance(answer, AIMessage):
        return answer.text
    raise UnsupportedInputError(
        f"the answer must be a str or an AIMessage, got {type(answer).__name__}: put AlignerRunnable after "
        "the chat model (or a StrOutputParser), or pass a dict with the answer under answer_key"
    )


def resolve(
    value: Any,
    *,
    question_key: str,
    answer_key: str,
    question: str | None,
    configurable: Mapping[str, Any] | None,
    history_key: str = "history",
) -> Job:
    """Split a stage input into a ``Job``.

    The question comes from the input dict's ``question_key``, else ``configurable[question_key]``,
    else the fixed ``question``. The history comes from the input dict's ``history_key`` (or
    ``chat_history``), else ``configurable[history_key]``; a question given as messages adds the
    messages before its last human one.
    """
    found: Any = None
    history: tuple[dict[str, str], ...] | None = None
    if isinstance(value, Mapping):
        if answer_key not in value:
            raise UnsupportedInputError(
                f"the input dict has no {answer_key!r} key (keys: {sorted(map(str, value))}); set answer_key="
            )
        history = history_value(value, history_key, strict=True)
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
    question, earlier = split_question(found)
    return Job(question=question, answer=value, text=answer_text(value), history=(*(history or ()), *earlier))


#: The inspector's verdict in a correction's metadata, repeated at the top of the details when present.
VERDICT_KEYS = ("inspector_score", "inspector_threshold", "inspector_passed")


def details(correction: Correction, aligner_name: str) -> dict[str, Any]:
    """What ``response_metadata["aligner"]`` holds for a correction (the text itself is the content).

    An inspected answer also has ``inspector_score``, ``inspector_threshold`` and ``inspector_passed``
    at the top: a passed one came back unchanged, with no tokens generated.
    """
    data = correction.to_dict()
    del data["question"], data["text"]
    verdict = {k: correction.metadata[k] for k in VERDICT_KEYS if k in correction.metadata}
    return {"model": aligner_name, **data, **verdict}


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
        is_text = isinstance(block, str) or (isinstance(block, dict) and block.get("type") == "text")
        if not is_text:
            out.append(block)
        elif not placed:
            base = {k: v for k, v in block.items() if k != "annotations"} if isinstance(block, dict) else {}
            out.append({**base, "type": "text", "text": text})
            placed = True
    return out if placed else [*out, {"type": "text", "text": text}]


def message_with(answer: AIMessage, text: str, meta: dict[str, Any]) -> AIMessage:
    """A copy of ``answer`` with ``text`` as its content and ``meta`` under ``response_metadata["aligner"]``."""
    return answer.model_copy(
        update={
            "content": _with_text(answer.content, text),
            "response_metadata": {**answer.response_metadata, METADATA_KEY: meta},
        }
    )


def output(job: Job, correction: Correction, aligner_name: str) -> tuple[str | AIMessage, dict[str, Any]]:
    """Map a correction back to the answer's type, with its details.

    An empty correction is never a better answer: the original is kept and the details say so.
    """
    meta = details(correction, aligner_name)
    text = correction.text
    if not text.strip():
        text = job.text
        meta.update(changed=False, similarity=1.0, empty_correction=True)
    if isinstance(job.answer, str):
        return text, meta
    return message_with(job.answer, text, meta), meta


def passthrough(job: Job, exc: BaseException, aligner_name: str) -> str | AIMessage:
    """The original answer after a corrector failure, with the error recorded (metadata and log)."""
    logger.warning("the Aligner failed, passing the answer through: %s: %s", type(exc).__name__, exc)
    if isinstance(job.answer, str):
        return job.answer
    return message_with(job.answer, job.text, failure(job, exc, aligner_name))


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
