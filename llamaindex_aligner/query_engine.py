"""AlignedQueryEngine: any query engine, with its final answer corrected by an Aligner."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from aligner_core import Aligner
from aligner_core.errors import missing
from aligner_core.inspector import Inspector, ScoreFn

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

from ._common import OnError
from ._correct import AnswerCorrector
from ._streams import one

COMPONENT = "query_engine"


class AlignedQueryEngine(BaseQueryEngine):
    """Wraps a query engine and corrects its final answer, the query being the question.

    ``query``/``aquery`` return the inner engine's response type with the corrected text,
    ``source_nodes`` unchanged, and the correction's details (as the LangChain adapter records
    them, plus the final ``text``) in ``metadata[metadata_key]``. A streaming answer is read to the
    end, corrected, and returned as a streaming response of the correction (its metadata is filled
    in once the stream is consumed). ``on_error="passthrough"`` returns the original answer and
    records the error, so the engine keeps serving when the corrector fails. With an ``inspector``, an
    answer scoring at or above ``threshold`` is served unchanged with no correction generated. For chat
    engines use :class:`~llamaindex_aligner.AlignedChatEngine`.
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
    ) -> None:
        if isinstance(query_engine, BaseChatEngine):
            raise TypeError(
                f"{type(query_engine).__name__} is a chat engine: wrap it with AlignedChatEngine(chat_engine, aligner)"
            )
        if not isinstance(query_engine, BaseQueryEngine):
            raise TypeError(f"query_engine must be a LlamaIndex BaseQueryEngine, got {type(query_engine).__name__}")
        self._corrector = AnswerCorrector(
            aligner, component=COMPONENT, on_error=on_error, generation_kwargs=generation_kwargs,
            callback_manager=lambda: self.callback_manager, inspector=inspector, threshold=threshold,
        )
        self.query_engine = query_engine
        self.aligner = aligner
        self.on_error: OnError = on_error
        self.generation_kwargs = self._corrector.generation_kwargs
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
        return self._replace(response, self._corrector.correct(question, answer))

    async def _aquery(self, query_bundle: QueryBundle) -> RESPONSE_TYPE:
        response = await self.query_engine.aquery(query_bundle)
        question = query_bundle.query_str
        if isinstance(response, AsyncStreamingResponse):
            answer = (await response.get_response()).response or ""
            info, relay = self._corrector.open(question, answer, asynchronous=True)
            agen = relay.adeltas() if relay else one(answer)
            return AsyncStreamingResponse(agen, response.source_nodes, self._metadata(response, info))
        if isinstance(response, StreamingResponse):
            return self._sync_stream(question, response)
        answer = self._answer(response)
        if answer is None:
            return self._skipped(response)
        return self._replace(response, await self._corrector.acorrect(question, answer))

    # -- shared steps ------------------------------------------------------------------------

    def _sync_stream(self, question: str, response: StreamingResponse) -> StreamingResponse:
        """Buffer the inner stream, start correcting the whole answer, and stream the correction."""
        answer = response.get_response().response or ""
        info, relay = self._corrector.open(question, answer)
        gen = relay.deltas() if relay else iter([answer])
        return StreamingResponse(gen, response.source_nodes, self._metadata(response, info))

    @staticmethod
    def _answer(response: RESPONSE_TYPE) -> str | None:
        """The text to correct, or None when there is none (empty or structured answer)."""
        if isinstance(response, Response) and (response.response or "").strip():
            return response.response
        if isinstance(response, (Response, PydanticResponse)):
            return None
        raise TypeError(f"cannot correct a {type(response).__name__}: expected a LlamaIndex Response")

    def _skipped(self, response: RESPONSE_TYPE) -> RESPONSE_TYPE:
        reason = "structured response" if isinstance(response, PydanticResponse) else "empty answer"
        text = response.response if isinstance(response, Response) else None
        info = self._corrector.skipped(text, reason)
        return dataclasses.replace(response, metadata=self._metadata(response, info))

    def _replace(self, response: Response, info: dict[str, Any]) -> Response:
        return dataclasses.replace(response, response=info["text"], metadata=self._metadata(response, info))

    def _metadata(self, response: RESPONSE_TYPE, info: dict[str, Any]) -> dict[str, Any]:
        return {**(response.metadata or {}), self.metadata_key: info}
