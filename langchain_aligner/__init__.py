"""LangChain integration for llm-aligner: see docs/langchain.md.

- ``AlignerRunnable``: an LCEL stage that corrects a chain's answer (``str`` or ``AIMessage``).
- ``with_aligner``: wrap any chain whose input holds the question (an ``AlignedChain``).
- ``AlignedChatModel``: a drop-in chat model whose answers are corrected.
- ``ChatTransformers``: a small local chat model, the offline upstream of the examples.

``import langchain_aligner`` does not import torch; models load only when they run.
"""

from __future__ import annotations

try:
    import langchain_core  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        'langchain_aligner needs langchain-core: install it with pip install "llm-aligner[langchain]"'
    ) from exc

from ._inputs import MissingQuestionError, UnsupportedInputError
from ._outputs import METADATA_KEY
from ._quiet import UNCORRECTED_TAG
from ._streaming import EVENT
from .chain import AlignedChain, with_aligner
from .chat_model import AlignedChatModel
from .local_chat import ChatTransformers
from .runnable import AlignerRunnable

__all__ = [
    "EVENT",
    "UNCORRECTED_TAG",
    "AlignedChain",
    "METADATA_KEY",
    "AlignedChatModel",
    "AlignerRunnable",
    "ChatTransformers",
    "MissingQuestionError",
    "UnsupportedInputError",
    "with_aligner",
]
