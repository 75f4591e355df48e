"""``LocalChat``: a local model answering conversations through an engine, the library's one local chat helper.

It is the offline *upstream* of the examples, the tests and ``aligner pairs --generate``; in real use any
chat model (an API, a vLLM server) takes its place. LangChain's ``ChatTransformers`` is a thin shell over
it. Built with :meth:`LocalChat.from_aligner` it answers through the Aligner's own engine: one copy of the
weights, and answering and correcting requests share the engine's batches (no second lock, no second
worker). Why not ``ChatHuggingFace(HuggingFacePipeline)``: that pair has no async generation, reports no
token usage and needs the last message to be a human one (see docs/langchain.md).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

from .engines.base import GenerationOutput, GenerationParams, GenerationRequest, TextSink
from .errors import InvalidInputError, TemplateError

if TYPE_CHECKING:
    from .aligner import Aligner
    from .engines.base import Engine

#: A conversation: a plain question, or ``{"role", "content"}`` turns (system, user, assistant, ...).
Conversation = str | Sequence[Mapping[str, Any]]


class LocalChat:
    """Answers conversations with a local model through its tokenizer's chat template (greedy by default).

    ``generation`` options are those of ``aligner_core.GenerationParams`` (``temperature``, ``stop``, ...);
    drafting is off (it pays when an answer is copied, as in a correction, not when one is written).
    A model without a chat template needs ``prompt_format`` (e.g. ``"Question: {question}\\nAnswer:"``).
    """

    def __init__(
        self,
        engine: Engine,
        *,
        model_name: str = "local-transformers",
        max_new_tokens: int = 256,
        system: str | None = None,
        prompt_format: str | None = None,
        **generation: Any,
    ) -> None:
        tokenizer = getattr(engine, "tokenizer", None)
        if tokenizer is None:
            raise TemplateError(f"the {engine.name!r} engine holds no local tokenizer to render a chat with")
        if prompt_format is None and not getattr(tokenizer, "chat_template", None):
            raise TemplateError(
                "the model's tokenizer has no chat template: pass prompt_format='...{question}...'"
            )
        if prompt_format is not None and "{question}" not in prompt_format:
            raise TemplateError(f"prompt_format must contain {{question}}, got {prompt_format!r}")
        self.engine = engine
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.system = system
        self.prompt_format = prompt_format
        self.params = GenerationParams(max_new_tokens=max_new_tokens, speculative=False).updated(generation)

    @classmethod
    def from_model(
        cls, model: Any, tokenizer: Any, *, max_batch_tokens: int | None = None, **kwargs: Any
    ) -> LocalChat:
        """Chat with an already loaded transformers model (its own engine)."""
        from .engines.local import TransformersEngine

        return cls(TransformersEngine(model, tokenizer, max_batch_tokens=max_batch_tokens), **kwargs)

    @classmethod
    def from_pretrained(
        cls, model: str | os.PathLike[str], *, device: str | None = None, dtype: Any = "auto", **kwargs: Any
    ) -> LocalChat:
        """Load a chat model from a hub id, local directory or GGUF file."""
        from .loading import load_model

        loaded, tokenizer, _ = load_model(model, device=device, dtype=dtype)
        kwargs.setdefault("model_name", str(model))
        return cls.from_model(loaded, tokenizer, **kwargs)

    @classmethod
    def from_aligner(cls, aligner: Aligner, **kwargs: Any) -> LocalChat:
        """Answer with the model the Aligner holds, through the Aligner's engine (shared batches and weights)."""
        kwargs.setdefault("model_name", aligner.name or "local-transformers")
        return cls(aligner.engine, **kwargs)

    # -- rendering ---------------------------------------------------------------------------

    def render(self, conversation: Conversation) -> str:
        """The prompt the model completes for a question or a list of turns."""
        if isinstance(conversation, str):
            if self.prompt_format is not None:
                return self.prompt_format.replace("{question}", conversation)
            conversation = [{"role": "user", "content": conversation}]
        elif self.prompt_format is not None:
            raise TemplateError(
                "a model without a chat template (prompt_format=...) answers single questions only"
            )
        turns = [dict(t) for t in conversation]
        if not turns:
            raise InvalidInputError("the conversation is empty: pass at least one message")
        if self.system and turns[0].get("role") != "system":
            turns.insert(0, {"role": "system", "content": self.system})
        return self.tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)

    def options(self, **overrides: Any) -> GenerationParams:
        """This chat's generation options with a call's overrides."""
        return self.params.updated({k: v for k, v in overrides.items() if v is not None})

    def request(self, conversation: Conversation, params: GenerationParams) -> GenerationRequest:
        prompt = self.render(conversation)
        ids = self.engine.encode(prompt, add_special_tokens=self.prompt_format is not None)
        n = params.max_new_tokens
        return GenerationRequest(prompt=prompt, prompt_ids=tuple(ids), max_new_tokens=n, reserve=n)

    # -- answering ---------------------------------------------------------------------------

    def generate(
        self, conversations: Sequence[Conversation], params: GenerationParams | None = None
    ) -> list[GenerationOutput | BaseException]:
        """Answer many conversations in planned batches (an exception in place of one that failed)."""
        params = params or self.params
        slots: list[GenerationRequest | BaseException] = []
        for c in conversations:
            try:
                slots.append(self.request(c, params))
            except Exception as exc:
                slots.append(exc)
        live = [i for i, s in enumerate(slots) if isinstance(s, GenerationRequest)]
        outputs = self.engine.generate([slots[i] for i in live], params, fail_fast=False)  # type: ignore[misc]
        results: list[GenerationOutput | BaseException] = list(slots)  # type: ignore[arg-type]
        for i, out in zip(live, outputs):
            results[i] = out
        return results

    def submit(
        self, conversation: Conversation, params: GenerationParams | None = None
    ) -> Future[GenerationOutput]:
        """Answer one conversation; concurrent submissions share the engine's batches."""
        params = params or self.params
        return self.engine.submit(self.request(conversation, params), params)

    async def agenerate(
        self, conversation: Conversation, params: GenerationParams | None = None
    ) -> GenerationOutput:
        """Async answer of one conversation (the event loop is never blocked)."""
        params = params or self.params
        return await self.engine.agenerate(self.request(conversation, params), params)

    def stream(
        self, conversation: Conversation, on_text: TextSink, params: GenerationParams | None = None
    ) -> Future[GenerationOutput]:
        """Answer one conversation, calling ``on_text(text_so_far)`` as it grows."""
        params = params or self.params
        return self.engine.stream(self.request(conversation, params), params, on_text)

    async def astream(
        self, conversation: Conversation, on_text: TextSink, params: GenerationParams | None = None
    ) -> GenerationOutput:
        """Async :meth:`stream`."""
        params = params or self.params
        return await self.engine.astream(self.request(conversation, params), params, on_text)

    def answer(self, questions: Sequence[str]) -> list[str | BaseException]:
        """Answer each question (an exception in place of an answer that failed), stripped."""
        outputs = self.generate(list(questions))
        return [o if isinstance(o, BaseException) else o.text.strip() for o in outputs]

    def __call__(self, questions: Sequence[str]) -> list[str | BaseException]:
        return self.answer(questions)


__all__ = ["Conversation", "LocalChat"]
