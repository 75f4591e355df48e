"""AlignedQueryEngine: any query engine, with its final answer corrected by an Aligner."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from aligner_core import Aligner, UnsafeStreamError
from aligner_core.decision import Decision, Reply, decide
from aligner_core.errors import missing
from aligner_core.inspector import Inspector, ScoreFn
from aligner_core.reporting import OnError

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
    from llama_index.core.chat_engine.types import BaseChatEngine
    from llama_index.core.prompts.mixin import PromptMixinType
    from llama_index.core.schema import NodeWithScore, QueryBundle
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    raise missing("llama-index-core", "llamaindex", feature="llamaindex_aligner") from exc

from ._calls import structure_of
from ._correct import Corrector
from ._grounding import node_documents
from ._streams import one

COMPONENT = "query_engine"


class AlignedQueryEngine(BaseQueryEngine):
    """Wraps a query engine and corrects its final answer, the query being the question.

    ``query``/``aquery`` return the inner engine's response type with the corrected text,
    ``source_nodes`` unchanged, and the correction's details (as the LangChain adapter records
    them, plus the final ``text``) in ``metadata[metadata_key]``. The retrieved ``source_nodes`` are the
    correction's context (the Aligner sees what the answer was grounded on). ``streaming=True`` returns a
    streaming response of the correction (its metadata filled in once the stream is consumed); wrap an inner
    engine built *without* streaming. An inner engine that streams is refused (``UnsafeStreamError``): its
    LLM's uncorrected tokens would reach instrumentation as the stream is read; ``stream_uncorrected=True``
    accepts that, reads it to the end and streams the correction. ``on_error="passthrough"`` returns the original answer and
    records the error, so the engine keeps serving when the corrector fails. With an ``inspector``, an
    answer scoring at or above ``threshold`` is served unchanged with no correction generated. A structured
    answer (``PydanticResponse``) passes through; ``correct_structured=True`` corrects its JSON and keeps
    the result only if it validates as the same model. For chat engines use
    :class:`~llamaindex_aligner.AlignedChatEngine`.
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
        inspector: Inspector | ScoreFn | None = None,
        threshold: float | None = None,
        correct_structured: bool = False,
        streaming: bool = False,
        stream_uncorrected: bool = False,
        include_original: bool = False,
    ) -> None:
        if isinstance(query_engine, BaseChatEngine):
            raise TypeError(
                f"{type(query_engine).__name__} is a chat engine: wrap it with AlignedChatEngine(chat_engine, aligner)"
            )
        if not isinstance(query_engine, BaseQueryEngine):
            raise TypeError(
                f"query_engine must be a LlamaIndex BaseQueryEngine, got {type(query_engine).__name__}"
            )
        self._corrector = Corrector(
            aligner,
            component=COMPONENT,
            on_error=on_error,
            generation_kwargs=generation_kwargs,
            inspector=inspector,
            threshold=threshold,
            include_original=include_original,
            callback_manager=lambda: self.callback_manager,
        )
        self.query_engine = query_engine
        self.aligner = aligner
        self.on_error: OnError = on_error
        self.generation_kwargs = self._corrector.generation_kwargs
        self.metadata_key = metadata_key
        self.correct_structured = correct_structured
        self.streaming, self.stream_uncorrected = streaming, stream_uncorrected
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
        if isinstance(response, AsyncStreamingResponse):
            raise TypeError("the inner engine returned an async stream from query(): call aquery() instead")
        streamed = isinstance(response, StreamingResponse)
        if streamed:
            response = self._read_stream(response).get_response()
        decision, context = self._decide(response), node_documents(response.source_nodes)
        if (self.streaming or streamed) and isinstance(response, Response):
            info, relay = self._corrector.open(query_bundle.query_str, decision, None, context)
            gen = relay.deltas() if relay else iter([info["text"]])
            return StreamingResponse(gen, response.source_nodes, self._metadata(response, info))
        return self._replace(
            response, decision, self._corrector.correct(query_bundle.query_str, decision, None, context)
        )

    async def _aquery(self, query_bundle: QueryBundle) -> RESPONSE_TYPE:
        response = await self.query_engine.aquery(query_bundle)
        streamed = isinstance(response, (StreamingResponse, AsyncStreamingResponse))
        if isinstance(response, AsyncStreamingResponse):
            response = await self._read_stream(response).get_response()
        elif isinstance(response, StreamingResponse):
            response = self._read_stream(response).get_response()
        decision, context = self._decide(response), node_documents(response.source_nodes)
        question = query_bundle.query_str
        if (self.streaming or streamed) and isinstance(response, Response):
            info, relay = await self._corrector.aopen(question, decision, None, context)
            agen = relay.adeltas() if relay else one(info["text"])
            return AsyncStreamingResponse(agen, response.source_nodes, self._metadata(response, info))
        return self._replace(
            response, decision, await self._corrector.acorrect(question, decision, None, context)
        )

    # -- shared steps ------------------------------------------------------------------------

    def _read_stream(self, response: Any) -> Any:
        """An inner stream is read to its end (the Aligner needs the whole answer) only when allowed: as it is
        read, its LLM's uncorrected tokens reach instrumentation (``LLM*InProgressEvent``)."""
        if not self.stream_uncorrected:
            raise UnsafeStreamError(
                "the inner query engine streams: reading its stream sends its LLM's uncorrected tokens to "
                "instrumentation (LLMCompletionInProgressEvent, LLMChatInProgressEvent). Build it without streaming "
                "(index.as_query_engine(llm=llm)) and pass streaming=True to AlignedQueryEngine, which streams the "
                "correction; or pass stream_uncorrected=True to accept the uncorrected tokens in those events"
            )
        return response

    def _decide(self, response: RESPONSE_TYPE) -> Decision:
        """The core's decision on a response: its text, or a structured answer's JSON (checked as its model)."""
        if isinstance(response, PydanticResponse):
            model = response.response
            content = model.model_dump_json() if model is not None else ""
            return decide(
                Reply(content=content, structure=structure_of(type(model))),
                correct_structured=self.correct_structured,
            )
        if isinstance(response, Response):
            return decide(Reply(content=response.response or ""))
        raise TypeError(f"cannot correct a {type(response).__name__}: expected a LlamaIndex Response")

    def _replace(self, response: RESPONSE_TYPE, decision: Decision, info: dict[str, Any]) -> RESPONSE_TYPE:
        metadata = self._metadata(response, info)
        if not decision.corrects or not info.get("changed"):
            return dataclasses.replace(response, metadata=metadata)
        if isinstance(response, PydanticResponse):  # settled: the corrected JSON validates as the same model
            model = type(response.response).model_validate_json(info["text"])
            return dataclasses.replace(response, response=model, metadata=metadata)
        return dataclasses.replace(response, response=info["text"], metadata=metadata)

    def _metadata(self, response: RESPONSE_TYPE, info: dict[str, Any]) -> dict[str, Any]:
        return {**(response.metadata or {}), self.metadata_key: info}
