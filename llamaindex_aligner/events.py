"""Instrumentation events, so LlamaIndex observability (``get_dispatcher`` handlers) sees each correction pass."""

from __future__ import annotations

from aligner_core.errors import missing

try:
    from llama_index.core.bridge.pydantic import Field
    from llama_index.core.instrumentation.events.base import BaseEvent
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    raise missing("llama-index-core", "llamaindex", feature="llamaindex_aligner") from exc


class AlignerStartEvent(BaseEvent):
    """A correction pass starts: how many items came in and how many go to the Aligner."""

    component: str = Field(
        description="Which adapter ran: 'node_postprocessor', 'query_engine', 'chat_engine' or 'llm'."
    )
    query: str = Field(description="The question the Aligner sees (the query string).")
    num_items: int = Field(description="Nodes (or answers) received.")
    num_selected: int = Field(description="Of those, how many are sent to the Aligner.")

    @classmethod
    def class_name(cls) -> str:
        return "AlignerStartEvent"


class AlignerEndEvent(BaseEvent):
    """A correction pass ended: counts, tokens and the wall-clock latency it added."""

    component: str = Field(
        description="Which adapter ran: 'node_postprocessor', 'query_engine', 'chat_engine' or 'llm'."
    )
    num_items: int = Field(description="Nodes (or answers) received.")
    num_corrected: int = Field(description="Items whose text was replaced by a correction.")
    num_changed: int = Field(description="Corrections that differ from their original text.")
    num_errors: int = Field(
        description="Items the Aligner failed on (passed through with on_error='passthrough')."
    )
    prompt_tokens: int = Field(description="Prompt tokens over all corrections.")
    completion_tokens: int = Field(description="Generated tokens over all corrections.")
    latency_s: float = Field(description="Seconds spent in the Aligner for this pass.")
    error: str | None = Field(default=None, description="The first error, as 'Type: message', if any.")
    num_inspected: int = Field(default=0, description="Items an inspector scored before correcting.")
    num_inspector_passed: int = Field(
        default=0,
        description="Of those, items scoring at or above the threshold: returned unchanged, no generation.",
    )
    inspector_scores: list[float] = Field(
        default_factory=list, description="The inspector's scores, in item order."
    )

    @classmethod
    def class_name(cls) -> str:
        return "AlignerEndEvent"
