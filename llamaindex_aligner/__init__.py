"""LlamaIndex integration for llm-aligner (AlignerNodePostprocessor, AlignedQueryEngine): see docs/llamaindex.md.

``import llamaindex_aligner`` is cheap: llama-index-core loads when a name below is first used, and torch
only when a model runs. Needs ``pip install "llm-aligner[llamaindex]"``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .events import AlignerEndEvent, AlignerStartEvent
    from .local import MINILM, SentenceTransformerEmbedding, TransformersLLM, minilm_path
    from .postprocessor import ORIGINAL_TEXT_KEY, AlignerNodePostprocessor
    from .query_engine import AlignedQueryEngine

_EXPORTS = {
    "AlignerNodePostprocessor": "postprocessor",
    "ORIGINAL_TEXT_KEY": "postprocessor",
    "AlignedQueryEngine": "query_engine",
    "AlignerStartEvent": "events",
    "AlignerEndEvent": "events",
    "TransformersLLM": "local",
    "SentenceTransformerEmbedding": "local",
    "MINILM": "local",
    "minilm_path": "local",
}

__all__ = [
    "MINILM",
    "ORIGINAL_TEXT_KEY",
    "AlignedQueryEngine",
    "AlignerEndEvent",
    "AlignerNodePostprocessor",
    "AlignerStartEvent",
    "SentenceTransformerEmbedding",
    "TransformersLLM",
    "minilm_path",
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
