"""One batch item, read the same way everywhere: the facade, the inspector gate, file and cluster jobs, the
adapters and ``aligner serve`` all take a pair as a dict (``question``, ``answer``, optionally ``history`` /
``chat_history`` and ``context``) or a ``(question, answer)`` / ``(question, answer, history)`` tuple."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .context import context_of
from .errors import InvalidInputError
from .history import history_of


@dataclass(frozen=True)
class Item:
    """A batch item's parts, as given (checked when the facade prepares it)."""

    question: Any
    answer: Any
    history: Any = None
    context: Any = None


def unpack(pair: Any, index: int = 0) -> Item:
    """The parts of a batch item; a malformed one raises ``InvalidInputError`` naming it (``pair {index}``)."""
    if isinstance(pair, Mapping):
        if "question" not in pair or "answer" not in pair:
            raise InvalidInputError(
                f"pair {index}: a dict pair needs 'question' and 'answer' keys, got {sorted(pair)}"
            )
        return Item(pair["question"], pair["answer"], history_of(pair), context_of(pair))
    if isinstance(pair, (tuple, list)) and len(pair) in (2, 3):
        return Item(pair[0], pair[1], history_of({"history": pair[2]}) if len(pair) == 3 else None)
    raise InvalidInputError(
        f"pair {index}: expected a (question, answer) tuple or a dict, got {type(pair).__name__}"
    )


def question_answer(pair: Any, index: int = 0) -> tuple[str, str]:
    """``(question, answer)`` of a batch item, both strings (its history and context are not read)."""
    if isinstance(pair, Mapping):
        if "question" not in pair or "answer" not in pair:
            raise InvalidInputError(
                f"pair {index}: a dict pair needs 'question' and 'answer' keys, got {sorted(pair)}"
            )
        q, a = pair["question"], pair["answer"]
    elif isinstance(pair, (tuple, list)) and len(pair) in (2, 3):
        q, a = pair[0], pair[1]
    else:
        raise InvalidInputError(
            f"pair {index}: expected a (question, answer) tuple or a dict, got {type(pair).__name__}"
        )
    for name, value in (("question", q), ("answer", a)):
        if not isinstance(value, str):
            raise InvalidInputError(f"pair {index}: {name} must be a str, got {type(value).__name__}")
    return q, a


def as_sequence(pairs: Any) -> Sequence[Any]:
    """``pairs`` when it is a sequence of items (a string is not), else ``InvalidInputError``."""
    if isinstance(pairs, (str, bytes)) or not isinstance(pairs, Sequence):
        raise InvalidInputError(
            f"pairs must be a sequence of (question, answer) pairs, got {type(pairs).__name__}"
        )
    return pairs


__all__ = ["Item", "as_sequence", "question_answer", "unpack"]
