"""One final answer corrected for an adapter: events, the error policy, and the details dict it returns.

AlignedQueryEngine, AlignedChatEngine and AlignedLLM all correct one answer per call the same way;
this keeps the bookkeeping (``AlignerStartEvent``/``AlignerEndEvent``, LLM events, ``on_error``, the
``metadata["aligner"]`` dict) in one place.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

from aligner_core import Aligner, Correction, GenerationOptionError

from ._common import OnError, check_options, describe
from ._streams import Relay
from .events import AlignerEndEvent, AlignerStartEvent
from .llm_events import LLMCall, dispatcher, start_call

logger = logging.getLogger("llamaindex_aligner")


class Pass:
    """One correction under way: when it started and its open LLM event (if reported)."""

    def __init__(self, start: float, call: LLMCall | None) -> None:
        self.start, self.call = start, call


class AnswerCorrector:
    """Corrects answers for one adapter (``component``) under its ``on_error`` policy.

    ``callback_manager`` is read at each call (a callable returning it), so an adapter whose manager
    is replaced later reports to the new one. ``report_llm=False`` leaves LLM events to the caller
    (AlignedLLM reports itself as the LLM call).
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
    ) -> None:
        if not isinstance(aligner, Aligner):
            raise TypeError(f"aligner must be an aligner_core.Aligner, got {type(aligner).__name__}")
        if on_error not in ("raise", "passthrough"):
            raise ValueError(f"on_error must be 'raise' or 'passthrough', got {on_error!r}")
        self.generation_kwargs = dict(generation_kwargs or {})
        check_options(aligner, self.generation_kwargs)
        self.aligner, self.component, self.on_error = aligner, component, on_error
        self._callback_manager, self.report_llm = callback_manager, report_llm

    # -- whole answers -----------------------------------------------------------------------

    def correct(self, question: str, answer: str) -> dict[str, Any]:
        p = self.begin(question, answer)
        try:
            correction = self.aligner.correct(question, answer, **self.generation_kwargs)
        except Exception as exc:
            return self.error(p, answer, exc)
        return self.done(p, correction)

    async def acorrect(self, question: str, answer: str) -> dict[str, Any]:
        p = self.begin(question, answer)
        try:
            correction = await self.aligner.acorrect(question, answer, **self.generation_kwargs)
        except Exception as exc:
            return self.error(p, answer, exc)
        return self.done(p, correction)

    def open(self, question: str, answer: str, *, asynchronous: bool = False) -> tuple[dict[str, Any], Relay | None]:
        """Start streaming a correction now (so errors surface at the call), or say why there is none.

        The returned dict is filled in place when the stream ends (``"pending": True`` until then).
        """
        if not answer.strip():
            return self.skipped(answer, "empty answer"), None
        info = {**self.base(answer), "text": None, "pending": True}
        p = self.begin(question, answer)
        open_stream = self.aligner.astream if asynchronous else self.aligner.stream
        try:
            stream = open_stream(question, answer, **self.generation_kwargs)
        except Exception as exc:
            return self.error(p, answer, exc), None
        return info, Relay(
            stream,
            answer,
            info,
            done=lambda correction: self.done(p, correction),
            fail=lambda exc, partial: self.error(p, answer, exc, partial=partial),
        )

    # -- steps -------------------------------------------------------------------------------

    def begin(self, question: str, answer: str) -> Pass:
        dispatcher.event(AlignerStartEvent(component=self.component, query=question, num_items=1, num_selected=1))
        call = None
        if self.report_llm:
            call = start_call(self.aligner, self._callback_manager(), question, answer,
                              component=self.component, options=self.generation_kwargs)
        return Pass(time.perf_counter(), call)

    def base(self, answer: str | None) -> dict[str, Any]:
        return {"model": self.aligner.name, "original": answer, "text": answer, "changed": False, "error": None}

    def skipped(self, answer: str | None, reason: str) -> dict[str, Any]:
        return {**self.base(answer), "skipped": reason}

    def done(self, p: Pass, correction: Correction) -> dict[str, Any]:
        """The details of a finished correction; an empty correction is never better, so the original stays."""
        self._end(p, correction, None)
        data = correction.to_dict()
        del data["question"]
        info = {"model": self.aligner.name, **data, "error": None}
        if not correction.text.strip():
            info.update(text=correction.original, changed=False, similarity=1.0, empty_correction=True)
        return info

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
            )
        )
