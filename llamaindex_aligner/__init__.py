"""LlamaIndex integration for llm-aligner (postprocessor, query and chat engines, an aligned LLM): see docs/llamaindex.md.

``import llamaindex_aligner`` is cheap: llama-index-core loads when a name below is first used, and torch
only when a model runs. Needs ``pip install "llm-aligner[llamaindex]"``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .chat_engine import AlignedChatEngine, AlignedStreamingChatResponse
    from .events import AlignerEndEvent, AlignerStartEvent
    from .llm import AlignedLLM
    from .local import SentenceTransformerEmbedding, huggingface_llm
    from .postprocessor import ORIGINAL_TEXT_KEY, AlignerNodePostprocessor
    from .query_engine import AlignedQueryEngine

_EXPORTS = {
    "AlignerNodePostprocessor": "postprocessor",
    "ORIGINAL_TEXT_KEY": "postprocessor",
    "AlignedQueryEngine": "query_engine",
    "AlignedChatEngine": "chat_engine",
    "AlignedStreamingChatResponse": "chat_engine",
    "AlignedLLM": "llm",
    "AlignerStartEvent": "events",
    "AlignerEndEvent": "events",
    "huggingface_llm": "local",
    "SentenceTransformerEmbedding": "local",
}

__all__ = [
    "ORIGINAL_TEXT_KEY",
    "AlignedChatEngine",
    "AlignedLLM",
    "AlignedQueryEngine",
    "AlignedStreamingChatResponse",
    "AlignerEndEvent",
    "AlignerNodePostprocessor",
    "AlignerStartEvent",
    "SentenceTransformerEmbedding",
    "huggingface_llm",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'llamaindex_aligner' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
