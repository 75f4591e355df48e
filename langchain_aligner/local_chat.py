"""``ChatTransformers``: a small local chat model over a loaded transformers causal LM.

It is the offline *upstream* of the examples and tests (the packaged SmolLM2 answering questions);
any LangChain chat model (``ChatOpenAI``, ``ChatOllama``, ...) takes its place in real use. It
runs through the same engine as the Aligner (``aligner_core.engines.local.TransformersEngine``).
"""

from __future__ import annotations

import threading
from typing import Any

from langchain_core.callbacks import CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel, LangSmithParams
from langchain_core.messages import AIMessage, BaseMessage
from langchain_core.messages.ai import UsageMetadata
from langchain_core.outputs import ChatGeneration, ChatResult
from pydantic import ConfigDict, PrivateAttr

from aligner_core import Aligner

_ROLES = {"human": "user", "ai": "assistant", "system": "system", "tool": "tool"}


class ChatTransformers(BaseChatModel):
    """Chat with a local transformers model through its tokenizer's chat template (greedy by default)."""

    model: Any
    """A loaded ``transformers`` causal LM."""
    tokenizer: Any
    """Its tokenizer (with a chat template)."""
    model_name: str = "local-transformers"
    """The name reported in ``response_metadata`` and traces."""
    max_tokens: int = 256
    """Most new tokens per answer."""
    temperature: float = 0.0
    """Sampling temperature; 0 decodes greedily."""
    stop: list[str] | None = None
    """Stop strings; a call's ``stop`` adds to them."""

    model_config = ConfigDict(arbitrary_types_allowed=True, extra="forbid")
    _backend: Any = PrivateAttr(default=None)
    _lock: threading.Lock = PrivateAttr(default_factory=threading.Lock)

    @classmethod
    def from_aligner(cls, aligner: Aligner, **kwargs: Any) -> ChatTransformers:
        """Share the model an Aligner already loaded (one copy in memory for upstream and corrector)."""
        backend = aligner.backend
        if not (hasattr(backend, "model") and hasattr(backend, "tokenizer")):
            raise TypeError(f"{type(backend).__name__} holds no local transformers model to chat with")
        kwargs.setdefault("model_name", aligner.name or "local-transformers")
        chat = cls(model=backend.model, tokenizer=backend.tokenizer, **kwargs)
        chat._lock = aligner.model_lock  # one user of the shared model at a time
        return chat

    @property
    def _llm_type(self) -> str:
        return "transformers-local"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {"model_name": self.model_name, "max_tokens": self.max_tokens, "temperature": self.temperature}

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        model = kwargs.get("model")
        return LangSmithParams(
            ls_provider="transformers",
            ls_model_name=model if isinstance(model, str) else self.model_name,
            ls_model_type="chat",
            ls_temperature=self.temperature,
            ls_max_tokens=self.max_tokens,
        )

    def _engine(self) -> Any:
        if self._backend is None:
            from aligner_core.engines.local import TransformersEngine  # imports torch: only when a model runs

            self._backend = TransformersEngine(self.model, self.tokenizer)
        return self._backend

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        from aligner_core import GenerationParams, GenerationRequest

        if kwargs:
            raise TypeError(f"ChatTransformers takes no call options besides stop, got {sorted(kwargs)}")
        conversation = [{"role": _ROLES.get(m.type, m.type), "content": m.text} for m in messages]
        prompt = self.tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
        engine = self._engine()
        ids = engine.encode(prompt, add_special_tokens=False)
        params = GenerationParams(
            max_new_tokens=self.max_tokens,
            do_sample=self.temperature > 0,
            temperature=self.temperature or 1.0,
            stop=tuple([*(self.stop or []), *(stop or [])]),
            speculative=False,
        )
        request = GenerationRequest(prompt=prompt, prompt_ids=tuple(ids), max_new_tokens=self.max_tokens, reserve=self.max_tokens)
        with self._lock:
            (out,) = engine.generate([request], params, fail_fast=True)
        usage = UsageMetadata(
            input_tokens=len(ids), output_tokens=out.completion_tokens, total_tokens=len(ids) + out.completion_tokens
        )
        message = AIMessage(
            content=out.text,
            usage_metadata=usage,
            response_metadata={"model_name": self.model_name, "finish_reason": out.finish_reason},
        )
        return ChatResult(generations=[ChatGeneration(message=message)])
