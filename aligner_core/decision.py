"""What gets corrected: one decision per answer, the same in every adapter and in ``aligner serve``.

A corrector that damages the app is worse than none. A final natural-language answer is corrected; anything
else passes through unchanged as a ``Correction`` whose ``metadata["skipped"]`` says why (:class:`Skip`):
structured output (JSON mode, a JSON schema, function calling asked for structure), tool calls, a refusal,
an empty answer, content without text, an intermediate step (a condensed question, a query rewrite, an
agent's thought), or an answer the inspector passed. Content the Aligner cannot read is an error
(``UnreadableContentError``), never passed on as if it had been handled.

Adapters describe an answer as a :class:`Reply` (its content as the framework holds it, whether it calls
tools, a refusal, the structure the request asked for, the step) and call :func:`decide`. Structured output
can be corrected on request (``correct_structured=True``): the correction is kept only if it parses and
validates against the requested schema (:meth:`Decision.settle`), else the original comes back with
``skipped: "structured_output_invalid"``.

Where an adapter cannot tell a final answer from an intermediate step, the caller says so with
:func:`step`: ``with step("intermediate"): ...`` (or ``"final"``), which every aligned component inside the
block obeys, sync or async.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, replace
from enum import Enum
from typing import Any, Literal

from .correction import Correction
from .errors import UnreadableContentError

Step = Literal["final", "intermediate"]


class Skip(str, Enum):
    """Why an answer passed through uncorrected (the value is what ``metadata["skipped"]`` holds)."""

    STRUCTURED_OUTPUT = "structured_output"
    STRUCTURED_OUTPUT_INVALID = "structured_output_invalid"
    TOOL_CALLS = "tool_calls"
    REFUSAL = "refusal"
    EMPTY_ANSWER = "empty_answer"
    NON_TEXT_CONTENT = "non_text_content"
    INTERMEDIATE_STEP = "intermediate_step"
    INSPECTOR_PASSED = "inspector_passed"
    INSPECT_ONLY = "inspect_only"
    DISABLED = "disabled"

    def __str__(self) -> str:
        return self.value


#: What each reason means, in words (recorded as ``metadata["skipped_detail"]``).
DETAILS: dict[Skip, str] = {
    Skip.STRUCTURED_OUTPUT: "structured output (JSON, a schema or a structured tool call) passes through unchanged",
    Skip.STRUCTURED_OUTPUT_INVALID: "the correction did not parse or validate against the requested schema: the "
    "original structured answer is kept",
    Skip.TOOL_CALLS: "an answer that calls tools is an action, not a final answer",
    Skip.REFUSAL: "the upstream refused; its refusal passes through unchanged",
    Skip.EMPTY_ANSWER: "the answer has no text to correct",
    Skip.NON_TEXT_CONTENT: "the answer holds no text, only other content (images, audio, reasoning)",
    Skip.INTERMEDIATE_STEP: "an intermediate step the user does not read (a condensed question, a rewrite, a thought)",
    Skip.INSPECTOR_PASSED: "the inspector scored the answer at or above its threshold",
    Skip.INSPECT_ONLY: "this caller's policy only scores answers with the inspector; they are never rewritten",
    Skip.DISABLED: "correction is off for this caller or request",
}

# -- reading content ---------------------------------------------------------------------------------

#: Part types whose ``text`` is the answer (OpenAI chat ``text``, Responses ``output_text``).
TEXT_PARTS = frozenset({"text", "output_text"})
#: Part types that are not text the user reads as the answer: kept as they are, never corrected.
OTHER_PARTS = frozenset(
    {
        "image",
        "image_url",
        "input_image",
        "audio",
        "input_audio",
        "file",
        "input_file",
        "video",
        "reasoning",
        "thinking",
        "redacted_thinking",
        "tool_use",
        "tool_call",
        "tool_call_chunk",
        "function_call",
        "server_tool_call",
        "server_tool_result",
        "non_standard",
    }
)


@dataclass(frozen=True)
class Content:
    """The readable text of an answer's content, and what else it held."""

    text: str
    other_parts: int = 0
    refusal: str | None = None


def read_content(content: Any) -> Content:
    """The text of a message's content: a ``str``, or a list of parts whose text parts are joined (as a UI shows
    them, one after the other). Known non-text parts (images, audio, reasoning, tool-use blocks) are counted and
    left alone; a ``refusal`` part is the refusal. Anything else raises ``UnreadableContentError``."""
    if content is None:
        return Content("")
    if isinstance(content, str):
        return Content(content)
    if isinstance(content, (bytes, Mapping)) or not isinstance(content, Sequence):
        raise UnreadableContentError(
            f"the answer's content is a {type(content).__name__}, not text or a list of content parts: the Aligner "
            "cannot read it"
        )
    texts: list[str] = []
    other, refusal = 0, None
    for i, part in enumerate(content):
        if isinstance(part, str):
            texts.append(part)
            continue
        kind = part.get("type") if isinstance(part, Mapping) else None
        if kind in TEXT_PARTS:
            text = part.get("text")
            if not isinstance(text, str):
                raise UnreadableContentError(
                    f"content part {i} is of type {kind!r} but its text is a "
                    f"{type(text).__name__}: the Aligner cannot read it"
                )
            texts.append(text)
        elif kind == "refusal":
            refusal = str(part.get("refusal") or part.get("text") or "")
        elif kind in OTHER_PARTS:
            other += 1
        else:
            described = f"of type {kind!r}" if isinstance(kind, str) else f"a {type(part).__name__}"
            raise UnreadableContentError(f"content part {i} is {described}: the Aligner cannot read it")
    return Content("".join(texts), other, refusal)


# -- structured output ---------------------------------------------------------------------------------


class StructuredOutputInvalid(ValueError):
    """A (corrected) structured answer does not parse or validate."""


@dataclass(frozen=True)
class Structure:
    """A request for structured output: the answer is data the caller parses, not prose.

    ``kind`` is ``"json"`` (JSON mode), ``"json_schema"`` or ``"tool_call"`` (structure asked through a forced
    tool call). ``schema`` (a JSON schema) and ``validator`` (e.g. a pydantic model's ``model_validate``) check
    a corrected answer before it is kept. ``parser`` reads the text as the caller will (default: strict
    ``json.loads``, what an API client does; a framework that finds JSON inside prose or a fenced block passes
    its own reader, so a correction it would accept is not refused).
    """

    kind: Literal["json", "json_schema", "tool_call"] = "json"
    schema: Mapping[str, Any] | None = None
    validator: Callable[[Any], Any] | None = None
    name: str | None = None
    parser: Callable[[str], Any] | None = None

    def check(self, text: str) -> Any:
        """The parsed value of ``text``, or ``StructuredOutputInvalid`` saying why it is not acceptable."""
        try:
            value = (self.parser or json.loads)(text)
        except (TypeError, ValueError) as exc:
            raise StructuredOutputInvalid(f"not JSON: {exc}") from None
        if self.schema is not None:
            import jsonschema

            try:
                jsonschema.validate(value, dict(self.schema))
            except jsonschema.ValidationError as exc:
                raise StructuredOutputInvalid(f"does not match the schema: {exc.message}") from None
            except jsonschema.SchemaError as exc:
                raise StructuredOutputInvalid(
                    f"the requested schema is not a valid JSON schema: {exc.message}"
                ) from None
        if self.validator is not None:
            try:
                self.validator(value)
            except Exception as exc:
                raise StructuredOutputInvalid(f"does not validate: {exc}") from None
        return value


# -- the step marker ---------------------------------------------------------------------------------

_STEP: ContextVar[Step | None] = ContextVar("aligner_step", default=None)


@contextlib.contextmanager
def step(kind: Step) -> Iterator[None]:
    """Mark every call made in the block as a ``"final"`` answer (corrected) or an ``"intermediate"`` step
    (passed through, ``skipped: "intermediate_step"``), overriding what an adapter would decide.

    ``with step("intermediate"): rewritten = llm.invoke(...)``. Works across threads started with the
    context copied (LangChain, LlamaIndex and asyncio do) and in async code.
    """
    if kind not in ("final", "intermediate"):
        raise ValueError(f"step must be 'final' or 'intermediate', got {kind!r}")
    token = _STEP.set(kind)
    try:
        yield
    finally:
        _STEP.reset(token)


def current_step() -> Step | None:
    """The step set by an enclosing :func:`step` block, or None."""
    return _STEP.get()


# -- the decision ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Reply:
    """An upstream answer as an adapter sees it.

    ``step`` is the adapter's own reading (``None``: a final answer); an enclosing :func:`step` block wins.
    """

    content: Any = None
    tool_calls: bool = False
    refusal: str | None = None
    structure: Structure | None = None
    step: Step | None = None


@dataclass(frozen=True)
class Decision:
    """Correct ``text``, or pass the answer through because of ``skip``."""

    text: str
    skip: Skip | None = None
    structure: Structure | None = None
    other_parts: int = 0

    @property
    def corrects(self) -> bool:
        return self.skip is None

    def metadata(self) -> dict[str, Any]:
        """What the Correction records about the decision (empty for a plain corrected answer)."""
        meta: dict[str, Any] = {}
        if self.skip is not None:
            meta.update(skipped=self.skip.value, skipped_detail=DETAILS[self.skip])
        if self.structure is not None:
            meta["structured"] = self.structure.kind
        if self.other_parts:
            meta["non_text_parts"] = self.other_parts
        return meta

    def passthrough(self, question: str, metadata: Mapping[str, Any] | None = None) -> Correction:
        """The answer unchanged, as a Correction that says why."""
        return passed(question, self.text, {**(metadata or {}), **self.metadata()})

    def settle(self, correction: Correction) -> Correction:
        """A finished correction of this answer: as it is for prose; for structured output, kept only when it
        parses and validates, else the original with ``skipped: "structured_output_invalid"`` and the reason."""
        extra = self.metadata()
        if self.structure is None:
            return replace(correction, metadata={**correction.metadata, **extra}) if extra else correction
        try:
            self.structure.check(correction.text.strip())
        except StructuredOutputInvalid as exc:
            meta = {
                **correction.metadata,
                **extra,
                "skipped": Skip.STRUCTURED_OUTPUT_INVALID.value,
                "skipped_detail": DETAILS[Skip.STRUCTURED_OUTPUT_INVALID],
                "invalid_correction": correction.text,
                "invalid_reason": str(exc),
            }
            return replace(
                correction,
                text=correction.original,
                changed=False,
                similarity=1.0,
                finish_reason="stop",
                metadata=meta,
            )
        return replace(correction, text=correction.text.strip(), metadata={**correction.metadata, **extra})


def decide(reply: Reply, *, correct_structured: bool = False) -> Decision:
    """Correct or pass through, and why. The order: an intermediate step, tool calls, a refusal, structure
    (unless ``correct_structured``), then the content (unreadable content raises ``UnreadableContentError``)."""
    chosen = current_step() or reply.step or "final"
    if chosen == "intermediate":
        return Decision(_loose_text(reply.content), Skip.INTERMEDIATE_STEP)
    if reply.tool_calls:
        return Decision(_loose_text(reply.content), Skip.TOOL_CALLS)
    content = read_content(reply.content)
    refusal = reply.refusal or content.refusal
    if refusal:
        return Decision(content.text or refusal, Skip.REFUSAL)
    if reply.structure is not None and not correct_structured:
        return Decision(content.text, Skip.STRUCTURED_OUTPUT, reply.structure, content.other_parts)
    if not content.text.strip():
        reason = Skip.NON_TEXT_CONTENT if content.other_parts else Skip.EMPTY_ANSWER
        return Decision(content.text, reason, reply.structure, content.other_parts)
    return Decision(content.text, None, reply.structure, content.other_parts)


def _loose_text(content: Any) -> str:
    """The text of content that passes through without being read closely (an intermediate step, a tool call)."""
    try:
        return read_content(content).text
    except UnreadableContentError:
        return ""


def passed(question: str, text: str, metadata: Mapping[str, Any] | None = None) -> Correction:
    """An answer returned unchanged: no tokens generated, ``metadata`` as given (with the ``skipped`` reason)."""
    return Correction(
        question=question,
        original=text,
        text=text,
        changed=False,
        similarity=1.0,
        prompt_tokens=0,
        completion_tokens=0,
        finish_reason="stop",
        latency_s=0.0,
        metadata=dict(metadata or {}),
    )


__all__ = [
    "DETAILS",
    "Content",
    "Decision",
    "Reply",
    "Skip",
    "Step",
    "Structure",
    "StructuredOutputInvalid",
    "current_step",
    "decide",
    "passed",
    "read_content",
    "step",
]
