"""AlignedQueryEngine: any query engine, with its final answer corrected by an Aligner."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Mapping
from typing import Any

from aligner_core import Aligner, Correction, GenerationOptionError
from aligner_core.errors import missing

try:
    from llama_index.core.base.base_query_engine import BaseQueryEngine
    from llama_index.core.base.response.schema import (
        RESPONSE_TYPE,
        AsyncStreamingResponse,
        PydanticResponse,
        Response,
        StreamingResponse,
    )
    from llama_index.core.callbacks import CallbackManager
    from llama_index.core.instrumentation import get_dispatcher
    from llama_index.core.prompts.mixin import PromptMixinType
    from llama_index.core.schema import NodeWithScore, QueryBundle
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    raise missing("llama-index-core", "llamaindex", feature="llamaindex_aligner") from exc

from ._common import OnError, check_options, describe
from ._streams import Relay, one
from .events import AlignerEndEvent, AlignerStartEvent

dispatcher = get_dispatcher(__name__)
logger = logging.getLogger("llamaindex_aligner")

COMPONENT = "query_engine"


class AlignedQueryEngine(BaseQueryEngine):
    """Wraps a query engine and corrects its final answer, the query being the question.

    ``query``/``aquery`` return the inner engine's response type with the corrected text,
    ``source_nodes`` unchanged, and the correction's details (as the LangChain adapter records
    them, plus the final ``text``) in ``metadata[metadata_key]``. A streaming answer is read to the
    end, corrected, and returned as a streaming response of the correction (its metadata is filled
    in once the stream is consumed). ``on_error="passthrough"`` returns the original answer and
    records the error, so the engine keeps serving when the corrector fails.
    """

    def __init__(
        self,
        query_engine: BaseQueryEngine,
        aligner: Aligner,
        *,
        on_error: OnError = "raise",
        generation_kwargs: Mapping[str, Any] | None = None,
        metadata_key: str = "aligner",
        callback_manager: CallbackManager | None = None,
    ) -> None:
        if not isinstance(query_engine, BaseQueryEngine):
            raise TypeError(f"query_engine must be a LlamaIndex BaseQueryEngine, got {type(query_engine).__name__}")
        if not isinstance(aligner, Aligner):
            raise TypeError(f"aligner must be an aligner_core.Aligner, got {type(aligner).__name__}")
        if on_error not in ("raise", "passthrough"):
            raise ValueError(f"on_error must be 'raise' or 'passthrough', got {on_error!r}")
        self.generation_kwargs = dict(generation_kwargs or {})
        check_options(aligner, self.generation_kwargs)
        self.query_engine = query_engine
        self.aligner = aligner
        self.on_error: OnError = on_error
        self.metadata_key = metadata_key
        super().__init__(callback_manager=callback_manager or query_engine.callback_manager)

    @classmethod
    def class_name(cls) -> str:
        return "AlignedQueryEngine"

    def _get_prompt_modules(self) -> PromptMixinType:
        return {"query_engine": self.query_engine}

    def retrieve(self, query_bundle: QueryBundle) -> list[NodeWithScore]:
        return self.query_engine.retrieve(query_bundle)

    # -- the LlamaIndex hooks ----------------------------------------------------------------

    def _query(self, query_bundle: QueryBundle) -> RESPONSE_TYPE:
        response = self.query_engine.query(query_bundle)
        question = query_bundle.query_str
        if isinstance(response, StreamingResponse):
            return self._sync_stream(question, response)
        if isinstance(response, AsyncStreamingResponse):
            raise TypeError("the inner engine returned an async stream from query(): call aquery() instead")
        answer = self._answer(response)
        if answer is None:
            return self._skipped(response)
        start = self._start(question)
        try:
            correction = self.aligner.correct(question, answer, **self.generation_kwargs)
        except Exception as exc:
            return self._replace(response, self._error(answer, exc, start))
        return self._replace(response, self._done(correction, start))

    async def _aquery(self, query_bundle: QueryBundle) -> RESPONSE_TYPE:
        response = await self.query_engine.aquery(query_bundle)
        question = query_bundle.query_str
        if isinstance(response, AsyncStreamingResponse):
            answer = (await response.get_response()).response or ""
            info, relay = self._open(question, answer, self.aligner.astream)
            agen = relay.adeltas() if relay else one(answer)
            return AsyncStreamingResponse(agen, response.source_nodes, self._metadata(response, info))
        if isinstance(response, StreamingResponse):
            return self._sync_stream(question, response)
        answer = self._answer(response)
        if answer is None:
            return self._skipped(response)
        start = self._start(question)
        try:
            correction = await self.aligner.acorrect(question, answer, **self.generation_kwargs)
        except Exception as exc:
            return self._replace(response, self._error(answer, exc, start))
        return self._replace(response, self._done(correction, start))

    # -- streams -----------------------------------------------------------------------------

    def _sync_stream(self, question: str, response: StreamingResponse) -> StreamingResponse:
        """Buffer the inner stream, start correcting the whole answer, and stream the correction."""
        answer = response.get_response().response or ""
        info, relay = self._open(question, answer, self.aligner.stream)
        gen = relay.deltas() if relay else iter([answer])
        return StreamingResponse(gen, response.source_nodes, self._metadata(response, info))

    def _open(self, question: str, answer: str, open_stream: Any) -> tuple[dict[str, Any], Relay | None]:
        """Start the correction now (so errors surface in query()), or say why there is none."""
        if not answer.strip():
            return {**self._base(answer), "skipped": "empty answer"}, None
        info = {**self._base(answer), "text": None, "pending": True}
        start = self._start(question)
        try:
            stream = open_stream(question, answer, **self.generation_kwargs)
        except Exception as exc:
            return self._error(answer, exc, start), None
        return info, Relay(
            stream,
            answer,
            info,
            done=lambda correction: self._done(correction, start),
            fail=lambda exc, partial: self._error(answer, exc, start, partial=partial),
        )

    # -- shared steps ------------------------------------------------------------------------

    @staticmethod
    def _answer(response: RESPONSE_TYPE) -> str | None:
        """The text to correct, or None when there is none (empty or structured answer)."""
        if isinstance(response, Response) and (response.response or "").strip():
            return response.response
        if isinstance(response, (Response, PydanticResponse)):
            return None
        raise TypeError(f"cannot correct a {type(response).__name__}: expected a LlamaIndex Response")

    def _start(self, question: str) -> float:
        dispatcher.event(AlignerStartEvent(component=COMPONENT, query=question, num_items=1, num_selected=1))
        return time.perf_counter()

    def _end(self, start: float, correction: Correction | None, error: BaseException | None) -> None:
        used = correction is not None and bool(correction.text.strip())
        dispatcher.event(
            AlignerEndEvent(
                component=COMPONENT,
                num_items=1,
                num_corrected=int(used),
                num_changed=int(used and correction is not None and correction.changed),
                num_errors=int(error is not None),
                prompt_tokens=correction.prompt_tokens if correction else 0,
                completion_tokens=correction.completion_tokens if correction else 0,
                latency_s=time.perf_counter() - start,
                error=describe(error) if error is not None else None,
            )
        )

    def _base(self, answer: str | None) -> dict[str, Any]:
        return {"model": self.aligner.name, "original": answer, "text": answer, "changed": False, "error": None}

    def _done(self, correction: Correction, start: float) -> dict[str, Any]:
        """The details of a finished correction; an empty correction is never better, so the original stays."""
        self._end(start, correction, None)
        data = correction.to_dict()
        del data["question"]
        info = {"model": self.aligner.name, **data, "error": None}
        if not correction.text.strip():
            info.update(text=correction.original, changed=False, similarity=1.0, empty_correction=True)
        return info

    def _error(self, answer: str, exc: Exception, start: float, *, partial: bool = False) -> dict[str, Any]:
        """Raise ``exc`` (on_error='raise', or a misspelled option) or describe the passthrough."""
        self._end(start, None, exc)
        if self.on_error == "raise" or isinstance(exc, GenerationOptionError):
            raise exc
        logger.warning("the Aligner failed, passing the answer through: %s", describe(exc))
        info = {**self._base(answer), "error": describe(exc), "error_type": type(exc).__name__}
        if partial:
            info["partial"] = True  # the stream failed after some of the correction was sent
        return info

    def _skipped(self, response: RESPONSE_TYPE) -> RESPONSE_TYPE:
        reason = "structured response" if isinstance(response, PydanticResponse) else "empty answer"
        text = response.response if isinstance(response, Response) else None
        info = {**self._base(text), "skipped": reason}
        return dataclasses.replace(response, metadata=self._metadata(response, info))

    def _replace(self, response: Response, info: dict[str, Any]) -> Response:
        return dataclasses.replace(response, response=info["text"], metadata=self._metadata(response, info))

    def _metadata(self, response: RESPONSE_TYPE, info: dict[str, Any]) -> dict[str, Any]:
        return {**(response.metadata or {}), self.metadata_key: info}
