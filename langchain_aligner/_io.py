"""Find the question and the answer in what a chain hands over, and map a correction back to its type.

The answer decides the output type: a ``str`` answer gives a ``str``, an ``AIMessage`` a copy of it
with corrected content (id, tool calls, usage and response metadata kept, details under
``response_metadata["aligner"]``). Answers without text (a message that only calls tools, an
empty string) pass through untouched: there is nothing to correct.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage, HumanMessage, convert_to_messages
from langchain_core.prompt_values import PromptValue

from aligner_core import AlignerError, Correction

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

    @property
    def skip(self) -> bool:
        """True when there is no text to correct (tool calls only, or empty)."""
        return not self.text.strip()


def last_human_text(messages: Sequence[BaseMessage]) -> str | None:
    """The text of the last human message, or None when there is none."""
    for message in reversed(messages):
        if isinstance(message, HumanMessage):
            return message.text
    return None


def question_text(value: Any) -> str:
    """A question from a ``str``, a prompt value, a message or a message list (its last human message)."""
    if isinstance(value, str):
        return value
    if isinstance(value, PromptValue):
        messages = value.to_messages()
    elif isinstance(value, BaseMessage):
        messages = [value]
    elif isinstance(value, Sequence):
        try:
            messages = convert_to_messages(value)
        except (ValueError, TypeError, NotImplementedError) as exc:
            raise UnsupportedInputError(f"cannot read a question from {type(value).__name__}: {exc}") from exc
    else:
        raise UnsupportedInputError(
            f"the question must be a str, a prompt value or a list of messages, got {type(value).__name__}"
        )
    text = last_human_text(messages)
    if text is None:
        raise MissingQuestionError("the messages hold no human message to take the question from")
    return text


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
) -> Job:
    """Split a stage input into a ``Job``.

    The question comes from the input dict's ``question_key``, else ``configurable[question_key]``,
    else the fixed ``question``.
    """
    found: Any = None
    if isinstance(value, Mapping):
        if answer_key not in value:
            raise UnsupportedInputError(
                f"the input dict has no {answer_key!r} key (keys: {sorted(map(str, value))}); set answer_key="
            )
        found, value = value.get(question_key), value[answer_key]
    if found is None and configurable:
        found = configurable.get(question_key)
    if found is None:
        found = question
    if found is None:
        raise MissingQuestionError(
            f"no question for the Aligner: pass a dict with a {question_key!r} key, set "
            f"AlignerRunnable(question=...), or call with config={{'configurable': {{{question_key!r}: ...}}}}"
        )
    return Job(question=question_text(found), answer=value, text=answer_text(value))


def details(correction: Correction, aligner_name: str) -> dict[str, Any]:
    """What ``response_metadata["aligner"]`` holds for a correction (the text itself is the content)."""
    data = correction.to_dict()
    del data["question"], data["text"]
    return {"model": aligner_name, **data}


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
