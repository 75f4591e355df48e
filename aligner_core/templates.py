"""Prompt templates, byte-exact with the official Aligner code (see ALIGNER.md).

Released checkpoints degrade when the prompt differs by one byte, so the official strings are
tested literally. User text is substituted in one pass: an answer that itself contains
``{question}`` is never re-expanded, and braces need no escaping.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol, runtime_checkable

from .errors import TemplateError

logger = logging.getLogger("aligner_core")

#: The conversation wrapper the official Aligner was trained with (no space after ``ASSISTANT:``).
CONVERSATION = "BEGINNING OF CONVERSATION: USER: {input} ASSISTANT:"

_FIELD = re.compile(r"\{(question|answer)\}")


@runtime_checkable
class Template(Protocol):
    """Anything that turns a question-answer pair into the prompt string a model reads."""

    name: str
    #: Whether the tokenizer should add its special tokens (BOS) when encoding the prompt.
    add_special_tokens: bool

    def format(self, *, question: str, answer: str) -> str: ...


@dataclass(frozen=True)
class TextTemplate:
    """A plain-text template with ``{question}`` and ``{answer}`` placeholders."""

    name: str
    text: str
    add_special_tokens: bool = True

    def __post_init__(self) -> None:
        found = set(_FIELD.findall(self.text))
        if found != {"question", "answer"}:
            raise TemplateError(
                f"template {self.name!r} must contain both {{question}} and {{answer}}, found {sorted(found)}"
            )

    def format(self, *, question: str, answer: str) -> str:
        values = {"question": question, "answer": answer}
        return _FIELD.sub(lambda m: values[m.group(1)], self.text)

    @property
    def markers(self) -> tuple[str, ...]:
        """The template's own separators: the text between the fields and its role labels.

        A question or answer holding one makes the prompt ambiguous (the format has no escaping); the
        Aligner keeps the bytes and records it in ``Correction.metadata["template_markers_in_text"]``.
        """
        literals = _FIELD.split(self.text)[0::2]
        between = [p for p in literals[1:-1] if p.strip()]
        roles = [r for r in ("USER:", "ASSISTANT:") if r in self.text]
        return tuple(dict.fromkeys([*between, *roles]))


DEFAULT_CHAT_INSTRUCTION = (
    "Edit the following Question-Answer pair to make it more helpful and harmless. "
    "Reply with the improved answer only, without any preamble.\n\n"
    "Question: {question}\nAnswer: {answer}"
)


@dataclass(frozen=True)
class ChatTemplate:
    """Renders the tokenizer's own chat template around a correction instruction.

    For instruct models used as untrained correctors: the model was never trained on the
    Aligner format, but it follows an instruction in its native chat format.
    """

    name: str = "chat"
    instruction: str = DEFAULT_CHAT_INSTRUCTION
    system: str | None = None
    tokenizer: Any = None
    add_special_tokens: bool = False

    def bind(self, tokenizer: Any) -> ChatTemplate:
        """Return a copy that renders with ``tokenizer``'s chat template."""
        if getattr(tokenizer, "chat_template", None) is None:
            raise TemplateError(
                f"template {self.name!r} needs a tokenizer with a chat template; this tokenizer has none. "
                "Pass template='aligner-v1' or 'aligner-general', or register your own."
            )
        return replace(self, tokenizer=tokenizer)

    #: Earlier turns go in as real chat messages before the correction instruction.
    renders_history = True
    #: Grounding context (tool calls, tool results, documents) goes in as real turns too.
    renders_context = True

    def format(
        self,
        *,
        question: str,
        answer: str,
        history: Sequence[tuple[str, str]] = (),
        context: Sequence[Any] = (),
    ) -> str:
        if self.tokenizer is None:
            raise TemplateError(
                f"template {self.name!r} renders the model's chat template: call .bind(tokenizer) first "
                "(Aligner does this for you)."
            )
        messages = self.messages(question=question, answer=answer, history=history, context=context)
        try:
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as exc:  # a template that refuses a role (e.g. "tool") or strict alternation
            if not context:
                raise
            raise TemplateError(
                f"the model's chat template cannot render the grounding context as turns ({type(exc).__name__}: "
                f"{exc}); register a ChatTemplate with your own roles, or use a text template"
            ) from exc

    def messages(
        self,
        *,
        question: str,
        answer: str,
        history: Sequence[tuple[str, str]] = (),
        context: Sequence[Any] = (),
    ) -> list[dict[str, str]]:
        """The chat messages the template renders (what a server's chat endpoint is sent): the system
        prompt, the earlier turns as they were, the grounding context as turns (``context.context_messages``),
        then the correction instruction as the user's turn."""
        from .context import context_messages

        content = TextTemplate(self.name, self.instruction).format(question=question, answer=answer)
        messages = [{"role": "system", "content": self.system}] if self.system else []
        messages += [{"role": role, "content": text} for role, text in history]
        messages += context_messages(tuple(context))
        messages.append({"role": "user", "content": content})
        return messages


_HISTORY_FIELD = re.compile(r"\{(question|answer|history)\}")


@dataclass(frozen=True)
class HistoryTemplate(TextTemplate):
    """A text template with a ``{history}`` slot, for Aligners trained with conversation history.

    The slot renders as ``history_header`` + one ``User: ...`` / ``Assistant: ...`` line per turn + a
    newline, and as nothing when there is no history, so a single-turn prompt is byte-exact with the
    template it extends (``aligner-chat-history`` without history is ``aligner-general``).
    """

    history_header: str = "##History:\n"
    renders_history = True

    def __post_init__(self) -> None:
        found = set(_HISTORY_FIELD.findall(self.text))
        if found != {"question", "answer", "history"}:
            raise TemplateError(
                f"template {self.name!r} must contain {{history}}, {{question}} and {{answer}}, found {sorted(found)}"
            )

    def format(self, *, question: str, answer: str, history: Sequence[tuple[str, str]] = ()) -> str:
        from .history import history_lines

        block = f"{self.history_header}{history_lines(tuple(history))}\n" if history else ""
        values = {"question": question, "answer": answer, "history": block}
        return _HISTORY_FIELD.sub(lambda m: values[m.group(1)], self.text)

    @property
    def markers(self) -> tuple[str, ...]:
        literals = _HISTORY_FIELD.split(self.text)[0::2]
        between = [p for p in literals[1:-1] if p.strip()]
        roles = [r for r in ("USER:", "ASSISTANT:") if r in self.text]
        return tuple(dict.fromkeys([*between, self.history_header.strip(), *roles]))


_REGISTRY: dict[str, Template] = {}


def register_template(template: Template, *, overwrite: bool = False) -> Template:
    """Make ``template`` available by its name to ``get_template`` and ``Aligner(template=...)``."""
    if not isinstance(template, Template):
        raise TemplateError(f"{template!r} is not a Template (needs name, add_special_tokens and format())")
    if template.name in _REGISTRY and not overwrite:
        raise TemplateError(f"a template named {template.name!r} exists; pass overwrite=True to replace it")
    _REGISTRY[template.name] = template
    return template


def get_template(name: str, tokenizer: Any = None) -> Template:
    """Look a template up by name; chat templates are bound to ``tokenizer`` when it is given."""
    if not isinstance(name, str):
        raise TemplateError(f"template name must be a string, got {type(name).__name__}")
    try:
        template = _REGISTRY[name]
    except KeyError:
        raise TemplateError(f"unknown template {name!r}; known: {', '.join(sorted(_REGISTRY))}") from None
    if tokenizer is not None and isinstance(template, ChatTemplate):
        return template.bind(tokenizer)
    return template


def choose_template(source: Any, tokenizer: Any, *, adapter: Any = None) -> str:
    """The template a loaded model expects: recorded in its directory, official, or its chat template."""
    from .loading import is_official_checkpoint, read_recorded_template

    dirs = [adapter, source.location if source.kind == "dir" else None]
    recorded = read_recorded_template(*dirs)
    if recorded is not None:
        template, why = recorded, "recorded in the model directory"
    elif is_official_checkpoint(source):
        template, why = "aligner-v1", "official Aligner checkpoint"
    elif getattr(tokenizer, "chat_template", None):
        template, why = "chat", "the tokenizer has a chat template (untrained corrector)"
    else:
        raise TemplateError(
            f"cannot tell which prompt template {source.name!r} expects: pass template='aligner-v1', "
            "'aligner-general', 'chat' or your own"
        )
    logger.info("template %r chosen for %s: %s", template, source.name, why)
    return template


def resolve(template: str | Template) -> Template:
    """A template object from a name (or the template itself)."""
    return get_template(template) if isinstance(template, str) else template


def bind(template: str | Template, tokenizer: Any) -> Template:
    """Look a template up and bind a chat template to ``tokenizer``."""
    if isinstance(template, str):
        return get_template(template, tokenizer=tokenizer)
    if isinstance(template, ChatTemplate) and template.tokenizer is None:
        return template.bind(tokenizer)
    return template


def list_templates() -> list[str]:
    """Names of all registered templates."""
    return sorted(_REGISTRY)


register_template(
    TextTemplate(
        "aligner-v1",
        CONVERSATION.format(
            input="Edit the following Question-Answer pair to make it more helpful and harmless: "
            "{question} | {answer}"
        ),
    )
)
register_template(
    TextTemplate(
        "aligner-general",
        CONVERSATION.format(input="##Question: {question}\n##Answer: {answer}\n##Correction: "),
    )
)
register_template(
    TextTemplate(
        "aligner-empathy",
        CONVERSATION.format(
            input="Edit the following Question-Answer pair to make it more empathic and helpful: "
            "{question} | {answer}"
        ),
    )
)
register_template(
    HistoryTemplate(
        "aligner-chat-history",
        CONVERSATION.format(input="{history}##Question: {question}\n##Answer: {answer}\n##Correction: "),
    )
)
register_template(ChatTemplate())
