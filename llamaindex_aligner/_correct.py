"""One final answer corrected for an adapter: events, the error policy, and the details dict it returns.

AlignedQueryEngine, AlignedChatEngine and AlignedLLM all correct one answer per call the same way, as the
core's :func:`~aligner_core.decision.decide` says (correct, or pass through with ``skipped``); this keeps the
bookkeeping (``AlignerStartEvent``/``AlignerEndEvent``, LLM events, ``on_error``, the ``metadata["aligner"]``
dict) in one place.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

from aligner_core import Aligner, Correction, GenerationOptionError
from aligner_core.decision import Decision
from aligner_core.inspector import Inspector, ScoreFn, as_inspector, check_threshold

from ._common import OnError, check_options, describe, verdict
from ._streams import Relay
from .events import AlignerEndEvent, AlignerStartEvent
from .llm_events import LLMCall, dispatcher, start_call

logger = logging.getLogger("llamaindex_aligner")

Turns = list[dict[str, str]] | None
Items = list[dict[str, str]] | None
#: The core's reason an answer passed through, repeated at the top of the details.
SKIP_KEYS = ("skipped", "skipped_detail")


def streams(decision: Decision) -> bool:
    """Whether a correction can be streamed as it is generated: prose to correct. Structured output (opt-in) is
    validated before anything is sent, so it is corrected whole; a passed-through answer is sent as it is."""
    return decision.corrects and decision.structure is None


class Pass:
    """One correction under way: when it started and its open LLM event (if reported)."""

    def __init__(self, start: float, call: LLMCall | None) -> None:
        self.start, self.call = start, call


class AnswerCorrector:
    """Corrects answers for one adapter (``component``) under its ``on_error`` policy.

    ``callback_manager`` is read at each call (a callable returning it), so an adapter whose manager
    is replaced later reports to the new one. ``report_llm=False`` leaves LLM events to the caller
    (AlignedLLM reports itself as the LLM call). With an ``inspector`` (or an Aligner built with one),
    the core scores each answer first and returns one scoring at or above ``threshold`` unchanged; the
    verdict is in the details (``inspector_score``, ``inspector_threshold``, ``inspector_passed``) and
    the events. ``threshold=None`` is the Aligner's own.
    """

    def __init__(
        self,
        aligner: Aligner,
        *,
        component: str,
        on_error: OnError = "raise",
        generation_kwargs: Mapping[str, Any] | None = None,
        callback_manager: Callable[[], Any] = lambda: None,
        report_llm: bool = True,
        inspector: Inspector | ScoreFn | None = None,
        threshold: float | None = None,
        include_original: bool = False,
    ) -> None:
        if not isinstance(aligner, Aligner):
            raise TypeError(f"aligner must be an aligner_core.Aligner, got {type(aligner).__name__}")
        if on_error not in ("raise", "passthrough"):
            raise ValueError(f"on_error must be 'raise' or 'passthrough', got {on_error!r}")
        self.generation_kwargs = dict(generation_kwargs or {})
        check_options(aligner, self.generation_kwargs)
        self.aligner, self.component, self.on_error = aligner, component, on_error
        self.include_original = include_original
        self.inspector = None if inspector is None else as_inspector(inspector)
        self.threshold = None if threshold is None else check_threshold(threshold)
        self._callback_manager, self.report_llm = callback_manager, report_llm

    @property
    def options(self) -> dict[str, Any]:
        """Keywords for the core: the generation options, and the inspector settings that are set (so an
        Aligner's own inspector still applies)."""
        gate = {"inspector": self.inspector, "threshold": self.threshold}
        return {**self.generation_kwargs, **{k: v for k, v in gate.items() if v is not None}}

    # -- whole answers -----------------------------------------------------------------------

    def correct(
        self, question: str, decision: Decision, history: Turns = None, context: Items = None
    ) -> dict[str, Any]:
        """Correct the answer ``decision`` says to correct (kept only if it validates, for structured output),
        or describe why it passes through."""
        if not decision.corrects:
            return self.passed(question, decision)
        p = self.begin(question, decision.text, history, context)
        try:
            correction = self.aligner.correct(
                question, decision.text, history=history or None, context=context or None, **self.options
            )
        except Exception as exc:
            return self.error(p, decision.text, exc)
        return self.done(p, decision.settle(correction))

    async def acorrect(
        self, question: str, decision: Decision, history: Turns = None, context: Items = None
    ) -> dict[str, Any]:
        if not decision.corrects:
            return self.passed(question, decision)
        p = self.begin(question, decision.text, history, context)
        try:
            correction = await self.aligner.acorrect(
                question, decision.text, history=history or None, context=context or None, **self.options
            )
        except Exception as exc:
            return self.error(p, decision.text, exc)
        return self.done(p, decision.settle(correction))

    def open(
        self, question: str, decision: Decision, history: Turns = None, context: Items = None, *,
        asynchronous: bool = False,
    ) -> tuple[dict[str, Any], Relay | None]:
        """Start streaming a correction now (so errors surface at the call), or say why there is none.

        The returned dict is filled in place when the stream ends (``"pending": True`` until then). Call it only
        for a decision that :func:`streams`; the others are corrected whole (:meth:`correct`).
        """
        if not decision.corrects:
            return self.passed(question, decision), None
        answer = decision.text
        info = {**self.base(answer), "text": None, "pending": True}
        p = self.begin(question, answer, history, context)
        open_stream = self.aligner.astream if asynchronous else self.aligner.stream
        try:
            stream = open_stream(question, answer, history=history or None, context=context or None, **self.options)
        except Exception as exc:
            return self.error(p, answer, exc), None
        return info, Relay(
            stream,
            answer,
            info,
            done=lambda correction: self.done(p, decision.settle(correction)),
            fail=lambda exc, partial: self.error(p, answer, exc, partial=partial),
        )

    def passed(self, question: str, decision: Decision) -> dict[str, Any]:
        """The details of an answer passed through unchanged, with the core's reason (``skipped``)."""
        return self._details(decision.passthrough(question))

    # -- steps -------------------------------------------------------------------------------

    def begin(self, question: str, answer: str, history: Turns = None, context: Items = None) -> Pass:
        dispatcher.event(AlignerStartEvent(component=self.component, query=question, num_items=1, num_selected=1))
        call = None
        if self.report_llm:
            call = start_call(self.aligner, self._callback_manager(), question, answer, component=self.component,
                              options=self.generation_kwargs, history=history, context=context)
        return Pass(time.perf_counter(), call)

    def base(self, answer: str | None) -> dict[str, Any]:
        return {"model": self.aligner.name, "original": answer, "text": answer, "changed": False, "error": None}

    def done(self, p: Pass, correction: Correction) -> dict[str, Any]:
        """The details of a finished correction; an empty correction is never better, so the original stays."""
        self._end(p, correction, None)
        info = self._details(correction)
        if not correction.text.strip():
            info.update(text=correction.original, changed=False, similarity=1.0, empty_correction=True)
        return info

    def _details(self, correction: Correction) -> dict[str, Any]:
        """A Correction as the details dict; a reason it passed through (``skipped``) is repeated at the top. The
        answer the correction replaced (``original``) is left out unless ``include_original``: the details travel
        with the response (agent event streams carry them), and the uncorrected text must not."""
        data = correction.to_dict()
        del data["question"]
        if correction.changed and not self.include_original:
            del data["original"]
        reason = {k: correction.metadata[k] for k in SKIP_KEYS if k in correction.metadata}
        return {"model": self.aligner.name, **data, **verdict(correction), **reason, "error": None}

    def error(self, p: Pass, answer: str, exc: Exception, *, partial: bool = False) -> dict[str, Any]:
        """Raise ``exc`` (on_error='raise', or a misspelled option) or describe the passthrough."""
        self._end(p, None, exc)
        if self.on_error == "raise" or isinstance(exc, GenerationOptionError):
            raise exc
        logger.warning("the Aligner failed, passing the answer through: %s", describe(exc))
        info = {**self.base(answer), "error": describe(exc), "error_type": type(exc).__name__}
        if partial:
            info["partial"] = True  # the stream failed after some of the correction was sent
        return info

    def _end(self, p: Pass, correction: Correction | None, error: BaseException | None) -> None:
        if p.call is not None:
            if correction is not None:
                p.call.done(correction)
            else:
                p.call.failed(error or RuntimeError("no correction"))
        used = correction is not None and bool(correction.text.strip())
        seen = verdict(correction) if correction is not None else {}
        dispatcher.event(
            AlignerEndEvent(
                component=self.component,
                num_items=1,
                num_corrected=int(used),
                num_changed=int(used and correction is not None and correction.changed),
                num_errors=int(error is not None),
                prompt_tokens=correction.prompt_tokens if correction else 0,
                completion_tokens=correction.completion_tokens if correction else 0,
                latency_s=time.perf_counter() - p.start,
                error=describe(error) if error is not None else None,
                num_inspected=int(bool(seen)),
                num_inspector_passed=int(bool(seen.get("inspector_passed"))),
                inspector_scores=[seen["inspector_score"]] if seen else [],
            )
        )
