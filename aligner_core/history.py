"""Conversation history for multi-turn correction: validated turns and how a template renders them.

A history is a list of ``{"role", "content"}`` turns (roles ``system``, ``user``, ``assistant``) that
came before the question being answered. The released Aligner checkpoints were trained single-turn,
so for their templates the earlier turns are folded into the question part in one fixed, documented
form (``fold_history``); an empty history leaves every prompt byte-exact. Templates that know history
(``aligner-chat-history``, the ``chat`` template) render it themselves.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from .errors import InvalidInputError

#: Roles a turn may have, and the label each gets when the history is written out as text.
ROLE_LABELS = {"system": "System", "user": "User", "assistant": "Assistant"}
#: Keys under which records, dict pairs and request bodies carry a history (the official data uses ``chat_history``).
HISTORY_KEYS = ("history", "chat_history")

Turn = tuple[str, str]  # (role, content)
History = tuple[Turn, ...]


def normalize_history(history: Any, where: str = "") -> History:
    """Validate ``history`` and return it as ``((role, content), ...)``; ``None`` is no history.

    Accepts ``{"role", "content"}`` mappings (OpenAI style) and ``(role, content)`` pairs.
    """
    if history is None:
        return ()
    if isinstance(history, (str, bytes, Mapping)) or not isinstance(history, Sequence):
        raise InvalidInputError(
            f"{where}history must be a list of {{'role', 'content'}} turns, got {type(history).__name__}"
        )
    turns: list[Turn] = []
    for i, turn in enumerate(history):
        if isinstance(turn, Mapping):
            if "role" not in turn or "content" not in turn:
                raise InvalidInputError(
                    f"{where}history turn {i} needs 'role' and 'content' keys, got {sorted(turn)}"
                )
            role, content = turn["role"], turn["content"]
        elif isinstance(turn, (tuple, list)) and len(turn) == 2:
            role, content = turn
        else:
            raise InvalidInputError(
                f"{where}history turn {i} must be a {{'role', 'content'}} dict, got {turn!r:.80}"
            )
        if role not in ROLE_LABELS:
            raise InvalidInputError(
                f"{where}history turn {i} has role {role!r}; use one of {', '.join(ROLE_LABELS)}"
            )
        if not isinstance(content, str):
            raise InvalidInputError(
                f"{where}history turn {i} content must be a str, got {type(content).__name__}"
            )
        try:
            content.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise InvalidInputError(
                f"{where}history turn {i} holds a lone surrogate at character {exc.start}: not valid Unicode text"
            ) from None
        turns.append((role, content))
    return tuple(turns)


def history_of(record: Mapping[str, Any]) -> Any:
    """The raw history of a record (``history`` or ``chat_history``), or None. A string is read as JSON, which is
    how CSV/TSV files carry a list of turns."""
    value = next((record[k] for k in HISTORY_KEYS if record.get(k) not in (None, "")), None)
    if isinstance(value, str):
        import json

        try:
            return json.loads(value)
        except json.JSONDecodeError as exc:
            raise InvalidInputError(
                f"history is a string that is not a JSON list of turns ({exc.msg})"
            ) from None
    return value


def history_lines(history: History) -> str:
    """The turns as text, one per paragraph: ``User: ...`` / ``Assistant: ...`` / ``System: ...``."""
    return "\n".join(f"{ROLE_LABELS[role]}: {content}" for role, content in history)


#: How an official single-turn template sees a history: it opens the question part.
FOLD_HEADER = "Earlier in this conversation:\n"
FOLD_QUESTION = "\n\nQuestion: "


def fold_history(question: str, history: History, context: Any = ()) -> str:
    """The question part of a single-turn prompt with the earlier turns (and the grounding context) before it.

    ``Earlier in this conversation:\nUser: ...\nAssistant: ...\n\nQuestion: {question}``; a context adds
    ``The answer may rely on:\nTool result (name): ...`` between the turns and the question
    (``aligner_core.context``). Without turns and context the question is returned unchanged, so single-turn
    prompts stay byte-exact.
    """
    blocks = []
    if history:
        blocks.append(f"{FOLD_HEADER}{history_lines(history)}")
    if context:
        from .context import CONTEXT_HEADER, context_lines

        blocks.append(f"{CONTEXT_HEADER}{context_lines(tuple(context))}")
    if not blocks:
        return question
    return "\n\n".join(blocks) + f"{FOLD_QUESTION}{question}"


def render_prompt(template: Any, question: str, answer: str, history: History = (), context: Any = ()) -> str:
    """The prompt string of ``template`` for a pair, its history and its grounding context (the one rendering
    path for inference and training). Templates with ``renders_history`` get the turns; others get them folded
    into the question. Templates with ``renders_context`` (the chat template) get the context as turns; others
    get it folded into the question after the history."""
    if not history and not context:
        return template.format(question=question, answer=answer)
    renders_history = getattr(template, "renders_history", False)
    if getattr(template, "renders_context", False):
        return template.format(question=question, answer=answer, history=history, context=tuple(context))
    if renders_history:
        folded = fold_history(question, (), context)
        return (
            template.format(question=folded, answer=answer, history=history)
            if history
            else template.format(question=folded, answer=answer)
        )
    return template.format(question=fold_history(question, history, context), answer=answer)


def history_texts(history: History) -> tuple[str, ...]:
    """The user-written pieces of a history (kept as plain text when they hold special-token strings)."""
    return tuple(content for _, content in history)


def as_messages(history: History) -> list[dict[str, str]]:
    """The turns as OpenAI-style messages."""
    return [{"role": role, "content": content} for role, content in history]


__all__ = [
    "HISTORY_KEYS",
    "History",
    "ROLE_LABELS",
    "as_messages",
    "history_of",
    "fold_history",
    "history_lines",
    "history_texts",
    "normalize_history",
    "render_prompt",
]
