"""Report each Aligner generation as a LlamaIndex LLM call, so token and cost views count the corrector too.

Two channels, as LlamaIndex's own LLMs report: instrumentation ``LLMCompletionStartEvent`` /
``LLMCompletionEndEvent`` (root dispatcher handlers: Phoenix, Langfuse, OpenTelemetry) and legacy
``CallbackManager`` ``CBEventType.LLM`` events carrying ``EventPayload.PROMPT`` / ``COMPLETION``
(``TokenCountingHandler``, ``LlamaDebugHandler``). The completion's ``raw["usage"]`` holds the
Correction's exact token counts, which ``TokenCountingHandler`` reads before estimating. An answer an
inspector passed was not generated: its call ends with zero completion tokens and the verdict
(``inspector_score``, ``inspector_passed``, ...) in the completion's ``additional_kwargs``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from aligner_core import Aligner, Correction
from aligner_core.context import normalize_context
from aligner_core.errors import missing
from aligner_core.history import normalize_history
from aligner_core.history import render_prompt as core_render

from ._common import verdict

try:
    from llama_index.core.base.llms.types import CompletionResponse
    from llama_index.core.callbacks import CallbackManager, CBEventType, EventPayload
    from llama_index.core.instrumentation import get_dispatcher
    from llama_index.core.instrumentation.events.llm import LLMCompletionEndEvent, LLMCompletionStartEvent
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    raise missing("llama-index-core", "llamaindex", feature="llamaindex_aligner") from exc

dispatcher = get_dispatcher(__name__)


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    """The OpenAI-style usage dict LlamaIndex token counters read from a response's ``raw``."""
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def aligner_payload(aligner: Aligner, component: str) -> dict[str, Any]:
    """What the events record as the "model" (``model_dict`` / ``EventPayload.SERIALIZED``)."""
    return {
        "class_name": "Aligner",
        "model": aligner.name,
        "template": aligner.template.name,
        "engine": aligner.engine.name,
        "component": component,
    }


def render_prompt(
    aligner: Aligner,
    question: str,
    answer: str,
    history: list[dict[str, str]] | None = None,
    context: list[dict[str, str]] | None = None,
) -> str:
    """The Aligner's prompt for a pair (with its history and context, before any trimming for length); a chat
    template left to a server is shown as its messages."""
    try:
        turns, grounding = normalize_history(history), normalize_context(context)
    except Exception:  # the Aligner reports a bad history or context itself; the event shows the pair
        turns, grounding = (), ()
    try:
        return core_render(aligner.template, question, answer, turns, grounding)
    except Exception:  # e.g. a chat template without a local tokenizer: the server renders it
        messages = getattr(aligner.template, "messages", None)
        if messages is None:
            return f"{question}\n\n{answer}"
        return str(messages(question=question, answer=answer, history=turns, context=grounding))


@dataclass
class LLMCall:
    """One reported generation: end it with :meth:`done` or :meth:`failed`."""

    prompt: str
    event_id: str
    callback_manager: CallbackManager

    def done(self, correction: Correction) -> None:
        response = CompletionResponse(
            text=correction.text,
            raw={"usage": usage(correction.prompt_tokens, correction.completion_tokens)},
            additional_kwargs={"finish_reason": correction.finish_reason, **verdict(correction)},
        )
        self.callback_manager.on_event_end(
            CBEventType.LLM,
            payload={EventPayload.PROMPT: self.prompt, EventPayload.COMPLETION: response},
            event_id=self.event_id,
        )
        dispatcher.event(LLMCompletionEndEvent(prompt=self.prompt, response=response))

    def failed(self, exc: BaseException) -> None:
        self.callback_manager.on_event_end(CBEventType.LLM, payload={EventPayload.EXCEPTION: exc}, event_id=self.event_id)


def start_call(
    aligner: Aligner,
    callback_manager: CallbackManager | None,
    question: str,
    answer: str,
    *,
    component: str,
    options: dict[str, Any] | None = None,
    history: list[dict[str, str]] | None = None,
    context: list[dict[str, str]] | None = None,
) -> LLMCall:
    """Report that the Aligner starts generating a correction of ``answer``."""
    manager = callback_manager if isinstance(callback_manager, CallbackManager) else CallbackManager([])
    prompt = render_prompt(aligner, question, answer, history, context)
    model = aligner_payload(aligner, component)
    dispatcher.event(LLMCompletionStartEvent(prompt=prompt, additional_kwargs=dict(options or {}), model_dict=model))
    event_id = manager.on_event_start(
        CBEventType.LLM,
        payload={EventPayload.PROMPT: prompt, EventPayload.SERIALIZED: model,
                 EventPayload.ADDITIONAL_KWARGS: dict(options or {})},
    )
    return LLMCall(prompt=prompt, event_id=event_id, callback_manager=manager)
