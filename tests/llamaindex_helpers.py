"""Shared by the LlamaIndex tests: sample nodes, a fixed-answer query engine and LLM, an instrumentation
recorder, and a spy on the prompts a real Aligner generates from."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from typing import Any, Literal

from llama_index.core.base.llms.types import CompletionResponse, LLMMetadata
from llama_index.core.base.response.schema import AsyncStreamingResponse, Response, StreamingResponse
from llama_index.core.bridge.pydantic import Field
from llama_index.core.instrumentation import get_dispatcher
from llama_index.core.instrumentation.event_handlers import BaseEventHandler
from llama_index.core.instrumentation.events.base import BaseEvent
from llama_index.core.instrumentation.span_handlers import SimpleSpanHandler
from llama_index.core.llms.callbacks import llm_completion_callback
from llama_index.core.llms.custom import CustomLLM
from llama_index.core.query_engine import CustomQueryEngine
from llama_index.core.schema import NodeRelationship, NodeWithScore, RelatedNodeInfo, TextNode

QUESTION = "What is the capital of Australia?"
ANSWER = "The capital of Australia is Sydney."
#: In an upstream answer: the tiny Aligner never writes it, so wherever it shows up, uncorrected text leaked.
MARKER = "QXZUNCORRECTED"
#: Far more tokens than the tiny test model's 512-token context: the Aligner rejects it (ContextOverflowError).
OVERLONG = "0 1 2 3 4 5 6 7 8 9 " * 200


def text_nodes() -> list[NodeWithScore]:
    """Three text nodes with ids, scores, metadata and a relationship."""
    texts = [
        ("n1", "The capital of Australia is Sydney.", 0.9, {"source": "atlas.txt", "page": 3}),
        ("n2", "Spiders have six legs.", 0.5, {"source": "bugs.txt"}),
        ("n3", "Canberra is a planned city.", 0.7, {}),
    ]
    out = []
    for node_id, text, score, metadata in texts:
        node = TextNode(id_=node_id, text=text, metadata=dict(metadata))
        node.relationships[NodeRelationship.SOURCE] = RelatedNodeInfo(node_id=f"doc-{node_id}")
        out.append(NodeWithScore(node=node, score=score))
    return out


class FixedAnswerEngine(CustomQueryEngine):
    """A real query engine that answers every query with ``answer``, optionally as a (sync or async) stream."""

    answer: str = ANSWER
    nodes: list[NodeWithScore] = Field(default_factory=list)
    stream: Literal["none", "sync", "async"] = "none"

    def _words(self) -> list[str]:
        words = self.answer.split(" ")
        return [w if i == 0 else " " + w for i, w in enumerate(words)]

    def custom_query(self, query_str: str) -> Any:
        if self.stream == "sync":
            return StreamingResponse(iter(self._words()), list(self.nodes), {"inner": "kept"})
        return Response(self.answer, list(self.nodes), {"inner": "kept"})

    async def acustom_query(self, query_str: str) -> Any:
        if self.stream != "async":
            return self.custom_query(query_str)

        async def gen() -> AsyncIterator[str]:
            for w in self._words():
                yield w

        return AsyncStreamingResponse(gen(), list(self.nodes), {"inner": "kept"})


class EventRecorder(BaseEventHandler):
    """Keeps every instrumentation event it sees."""

    events: list[BaseEvent] = Field(default_factory=list)

    @classmethod
    def class_name(cls) -> str:
        return "EventRecorder"

    def handle(self, event: BaseEvent, **kwargs: Any) -> None:
        self.events.append(event)

    def of(self, name: str) -> list[Any]:
        return [e for e in self.events if e.class_name() == name]


@contextmanager
def recording() -> Iterator[tuple[EventRecorder, SimpleSpanHandler]]:
    """Attach an event recorder and a span handler to the root dispatcher for the duration of a block."""
    root = get_dispatcher()
    events, spans = EventRecorder(), SimpleSpanHandler()
    root.add_event_handler(events)
    root.add_span_handler(spans)
    try:
        yield events, spans
    finally:
        root.event_handlers.remove(events)
        root.span_handlers.remove(spans)


def span_names(spans: SimpleSpanHandler) -> list[str]:
    """``Class.method`` of every completed span."""
    return [s.id_.rsplit("-", 5)[0] for s in spans.completed_spans]


class ScriptedLLM(CustomLLM):
    """A real LlamaIndex LLM (the upstream) that answers every prompt with ``answer``, streamed word by word.

    ``streamed`` counts the deltas its own streams produced, so a test can tell whether anything
    was streamed from it at all.
    """

    answer: str = ANSWER
    chat_model: bool = False
    streamed: int = 0
    prompts: list[str] = Field(default_factory=list)
    #: ``{substring of the prompt: reply}``: the first rule whose key is in the prompt answers instead of ``answer``.
    rules: dict[str, str] = Field(default_factory=dict)

    def reply(self, prompt: str) -> str:
        return next((reply for key, reply in self.rules.items() if key in prompt), self.answer)

    @property
    def metadata(self) -> LLMMetadata:
        return LLMMetadata(
            model_name="scripted", is_chat_model=self.chat_model, num_output=32, context_window=4096
        )

    @llm_completion_callback()
    def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        self.prompts.append(prompt)
        return CompletionResponse(
            text=self.reply(prompt), raw={"usage": {"prompt_tokens": 7, "completion_tokens": 8}}
        )

    @llm_completion_callback()
    def stream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> Any:
        self.prompts.append(prompt)

        def gen() -> Iterator[CompletionResponse]:
            text = ""
            for word in self.reply(prompt).split(" "):
                delta = word if not text else " " + word
                text += delta
                self.streamed += 1
                yield CompletionResponse(text=text, delta=delta)

        return gen()


def tiny_llm(aligner: Any, max_new_tokens: int = 4) -> Any:
    """``huggingface_llm`` over the tiny Aligner's model; LlamaIndex packs context assuming ~500 tokens of
    room, more than the tiny model's 512 positions, so the window is declared larger (the prompts stay short)."""
    from llamaindex_aligner import huggingface_llm

    llm = huggingface_llm(aligner, max_new_tokens=max_new_tokens)
    llm.context_window = 4096
    return llm


class PromptSpy:
    """Records the rendered prompt of every generation a real Aligner's engine is asked for (the calls go through):
    ``len(prompts)`` counts corrections generated, and each prompt shows what the Aligner saw."""

    def __init__(self, aligner: Any, monkeypatch: Any) -> None:
        self.prompts: list[str] = []
        engine = aligner.engine
        for name in ("submit", "agenerate", "stream", "astream"):
            monkeypatch.setattr(engine, name, self._one(getattr(engine, name)))
        monkeypatch.setattr(engine, "generate", self._many(engine.generate))

    def _one(self, method: Any) -> Any:
        def spied(request: Any, *args: Any, **kwargs: Any) -> Any:
            self.prompts.append(request.prompt)
            return method(
                request, *args, **kwargs
            )  # a coroutine for the async methods, awaited by the caller

        return spied

    def _many(self, method: Any) -> Any:
        def spied(requests: Any, *args: Any, **kwargs: Any) -> Any:
            self.prompts.extend(r.prompt for r in requests)
            return method(requests, *args, **kwargs)

        return spied


def delta_texts(events: EventRecorder) -> list[str]:
    """Every text an instrumentation event carries as (part of) a stream: LLM in-progress deltas and their running
    text, chat-engine stream deltas."""
    texts = []
    for event in events.of("LLMChatInProgressEvent"):
        texts += [event.response.delta or "", event.response.message.content or ""]
    for event in events.of("LLMCompletionInProgressEvent"):
        texts += [event.response.delta or "", event.response.text or ""]
    texts += [event.delta for event in events.of("StreamChatDeltaReceivedEvent")]
    return texts


def roomy(tiny_tokenizer: Any) -> Any:
    """The tiny Aligner with room for a chat engine's prompts: its 400-token vocabulary spells text out in many
    tokens, and with the default 512 positions a chat engine's history and grounding would not fit."""
    from aligner_core import Aligner
    from tests.conftest import build_model

    model = build_model(tiny_tokenizer, context=4096)
    return Aligner.from_model(
        model, tiny_tokenizer, template="aligner-v1", max_new_tokens=12, max_batch_tokens=8192
    )
