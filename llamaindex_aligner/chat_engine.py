"""AlignedChatEngine: any chat engine, with each answer corrected by an Aligner and the conversation kept corrected."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from aligner_core import Aligner
from aligner_core.decision import Reply, decide
from aligner_core.errors import missing
from aligner_core.inspector import Inspector, ScoreFn
from aligner_core.reporting import OnError

try:
    from llama_index.core.base.llms.types import ChatMessage, ChatResponse, MessageRole
    from llama_index.core.callbacks import CallbackManager
    from llama_index.core.chat_engine.types import (
        AgentChatResponse,
        BaseChatEngine,
        StreamingAgentChatResponse,
    )
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    raise missing("llama-index-core", "llamaindex", feature="llamaindex_aligner") from exc

from ._correct import Corrector
from ._grounding import history_turns, node_documents

COMPONENT = "chat_engine"


@dataclasses.dataclass
class AlignedStreamingChatResponse(StreamingAgentChatResponse):
    """A streaming chat response of the correction, with the correction's details in ``metadata``."""

    metadata: dict[str, Any] = dataclasses.field(default_factory=dict)


class AlignedChatEngine(BaseChatEngine):
    """Wraps a chat engine (``index.as_chat_engine(...)``, ``SimpleChatEngine``, ...) and corrects each answer.

    The user's message is the question and the conversation before it (the history this engine holds,
    or the ``chat_history`` passed to the call) is the correction's history, and the nodes the answer was
    grounded on (``source_nodes``) its context. ``chat``/``achat`` return the inner response with the corrected
    text and the details in ``metadata[metadata_key]`` (as ``AlignedQueryEngine``). ``stream_chat`` /
    ``astream_chat`` stream **only the correction**: the inner engine is called without streaming, so its
    uncorrected tokens never reach a stream or a stream event. The conversation keeps the corrected
    answers: this engine holds the history and hands it to the inner engine on every turn, so the next
    turn builds on what the user was shown. With an ``inspector``, an answer scoring at or above
    ``threshold`` is served unchanged with no correction generated (the verdict is in the metadata).
    """

    def __init__(
        self,
        chat_engine: BaseChatEngine,
        aligner: Aligner,
        *,
        on_error: OnError = "raise",
        generation_kwargs: Mapping[str, Any] | None = None,
        metadata_key: str = "aligner",
        callback_manager: CallbackManager | None = None,
        inspector: Inspector | ScoreFn | None = None,
        threshold: float | None = None,
        include_original: bool = False,
    ) -> None:
        if not isinstance(chat_engine, BaseChatEngine):
            raise TypeError(
                f"chat_engine must be a LlamaIndex BaseChatEngine, got {type(chat_engine).__name__}"
            )
        if callback_manager is None:
            from llama_index.core import Settings

            callback_manager = getattr(chat_engine, "callback_manager", None) or Settings.callback_manager
        self.callback_manager = callback_manager
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
        self.chat_engine = chat_engine
        self.aligner = aligner
        self.metadata_key = metadata_key
        self._history: list[ChatMessage] = list(chat_engine.chat_history)

    @property
    def chat_history(self) -> list[ChatMessage]:
        """The conversation as the user saw it (corrected answers)."""
        return list(self._history)

    def reset(self) -> None:
        self._history = []
        self.chat_engine.reset()

    # -- whole answers -----------------------------------------------------------------------

    def chat(self, message: str, chat_history: list[ChatMessage] | None = None) -> AgentChatResponse:
        history = self._turn_history(chat_history)
        response = self.chat_engine.chat(message, chat_history=history)
        info = self._corrector.correct(message, *self._read(response, history))
        return self._finish(response, history, message, info)

    async def achat(self, message: str, chat_history: list[ChatMessage] | None = None) -> AgentChatResponse:
        history = self._turn_history(chat_history)
        response = await self.chat_engine.achat(message, chat_history=history)
        info = await self._corrector.acorrect(message, *self._read(response, history))
        return self._finish(response, history, message, info)

    # -- streams -----------------------------------------------------------------------------

    def stream_chat(
        self, message: str, chat_history: list[ChatMessage] | None = None
    ) -> StreamingAgentChatResponse:
        history = self._turn_history(chat_history)
        response = self.chat_engine.chat(
            message, chat_history=history
        )  # not stream_chat: nothing raw is streamed
        info, relay = self._corrector.open(message, *self._read(response, history))

        def gen() -> Any:
            text = ""
            for delta in relay.deltas() if relay else [info["text"]]:
                text += delta
                yield ChatResponse(message=ChatMessage(role=MessageRole.ASSISTANT, content=text), delta=delta)
            self._remember(history, message, info["text"] or text)

        return self._streaming(response, info, chat_stream=gen())

    async def astream_chat(
        self, message: str, chat_history: list[ChatMessage] | None = None
    ) -> StreamingAgentChatResponse:
        history = self._turn_history(chat_history)
        response = await self.chat_engine.achat(message, chat_history=history)
        info, relay = await self._corrector.aopen(message, *self._read(response, history))

        async def agen() -> Any:
            text = ""
            if relay is None:
                text = info["text"]
                yield ChatResponse(message=ChatMessage(role=MessageRole.ASSISTANT, content=text), delta=text)
            else:
                async for delta in relay.adeltas():
                    text += delta
                    yield ChatResponse(
                        message=ChatMessage(role=MessageRole.ASSISTANT, content=text), delta=delta
                    )
            self._remember(history, message, info["text"] or text)

        return self._streaming(response, info, achat_stream=agen())

    # -- helpers -----------------------------------------------------------------------------

    @staticmethod
    def _read(response: AgentChatResponse, history: list[ChatMessage]) -> tuple[Any, ...]:
        """The core's decision on the answer, the history and the context (the retrieved nodes) it is corrected with."""
        decision = decide(Reply(content=str(response.response or "")))
        return decision, history_turns(history), node_documents(response.source_nodes)

    def _turn_history(self, chat_history: list[ChatMessage] | None) -> list[ChatMessage]:
        return list(self._history if chat_history is None else chat_history)

    def _remember(self, history: list[ChatMessage], message: str, answer: str) -> None:
        self._history = [
            *history,
            ChatMessage(role=MessageRole.USER, content=message),
            ChatMessage(role=MessageRole.ASSISTANT, content=answer),
        ]

    def _finish(
        self, response: AgentChatResponse, history: list[ChatMessage], message: str, info: dict[str, Any]
    ) -> AgentChatResponse:
        self._remember(history, message, info["text"])
        metadata = {**(response.metadata or {}), self.metadata_key: info}
        return dataclasses.replace(response, response=info["text"], metadata=metadata)

    def _streaming(
        self, response: AgentChatResponse, info: dict[str, Any], **stream: Any
    ) -> AlignedStreamingChatResponse:
        return AlignedStreamingChatResponse(
            sources=list(response.sources),
            source_nodes=list(response.source_nodes),
            is_writing_to_memory=False,
            metadata={**(response.metadata or {}), self.metadata_key: info},
            **stream,
        )
