"""``ChatTransformers``: a LangChain chat model over ``aligner_core.LocalChat``, the library's one local chat helper.

It is the offline *upstream* of the examples and tests (the packaged SmolLM2 answering questions); in
real use any chat model (``ChatOpenAI``, ``ChatOllama``, ``ChatHuggingFace`` over an endpoint, ...)
takes its place. Why not ``ChatHuggingFace(llm=HuggingFacePipeline(...))`` over the same weights: that
pair has no async generation (``ainvoke`` raises), reports no token usage and needs the last message
to be a human one. ``ChatTransformers.from_aligner`` answers through the Aligner's own engine, so
answers and corrections share batches and one copy of the weights.
"""

from __future__ import annotations

from typing import Any

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel, LangSmithParams
from langchain_core.messages import AIMessage, BaseMessage
from langchain_core.messages.ai import UsageMetadata
from langchain_core.outputs import ChatGeneration, ChatResult
from pydantic import ConfigDict, PrivateAttr

from aligner_core import Aligner, GenerationOutput
from aligner_core.local_chat import LocalChat
from aligner_core.reporting import role_of


class ChatTransformers(BaseChatModel):
    """Chat with a local transformers model through its tokenizer's chat template (greedy by default)."""

    model: Any = None
    """A loaded ``transformers`` causal LM (not needed with ``from_aligner``)."""
    tokenizer: Any = None
    """Its tokenizer (with a chat template)."""
    model_name: str = "local-transformers"
    """The name reported in ``response_metadata`` and traces."""
    max_tokens: int = 256
    """Most new tokens per answer."""
    temperature: float = 0.0
    """Sampling temperature; 0 decodes greedily."""
    stop: list[str] | None = None
    """Stop strings; a call's ``stop`` adds to them."""

    model_config = ConfigDict(arbitrary_types_allowed=True, extra="forbid", protected_namespaces=())
    _chat: LocalChat | None = PrivateAttr(default=None)

    @classmethod
    def from_aligner(cls, aligner: Aligner, **kwargs: Any) -> ChatTransformers:
        """Answer with the model an Aligner holds, through its engine (one copy of the weights, shared batches)."""
        kwargs.setdefault("model_name", aligner.name or "local-transformers")
        chat = cls(**kwargs)
        chat._chat = LocalChat.from_aligner(aligner, model_name=chat.model_name)
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

    def _local(self) -> LocalChat:
        if self._chat is None:
            if self.model is None or self.tokenizer is None:
                raise ValueError(
                    "ChatTransformers needs model= and tokenizer=, or ChatTransformers.from_aligner(aligner)"
                )
            self._chat = LocalChat.from_model(self.model, self.tokenizer, model_name=self.model_name)
        return self._chat

    def _prepare(
        self, messages: list[BaseMessage], stop: list[str] | None, kwargs: dict[str, Any]
    ) -> tuple[Any, Any]:
        if kwargs:
            raise TypeError(f"ChatTransformers takes no call options besides stop, got {sorted(kwargs)}")
        conversation = [{"role": role_of(m.type) or m.type, "content": m.text} for m in messages]
        chat = self._local()
        params = chat.options(
            max_new_tokens=self.max_tokens,
            do_sample=self.temperature > 0,
            temperature=self.temperature or 1.0,
            stop=tuple([*(self.stop or []), *(stop or [])]),
        )
        return conversation, params

    def _result(self, request_ids: int, out: GenerationOutput) -> ChatResult:
        prompt_tokens = out.prompt_tokens if out.prompt_tokens is not None else request_ids
        usage = UsageMetadata(
            input_tokens=prompt_tokens,
            output_tokens=out.completion_tokens,
            total_tokens=prompt_tokens + out.completion_tokens,
        )
        message = AIMessage(
            content=out.text,
            usage_metadata=usage,
            response_metadata={"model_name": self.model_name, "finish_reason": out.finish_reason},
        )
        return ChatResult(generations=[ChatGeneration(message=message)])

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        conversation, params = self._prepare(messages, stop, kwargs)
        chat = self._local()
        request = chat.request(conversation, params)
        out = chat.engine.submit(request, params).result()
        return self._result(len(request.prompt_ids or ()), out)

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        conversation, params = self._prepare(messages, stop, kwargs)
        chat = self._local()
        request = chat.request(conversation, params)
        out = await chat.engine.agenerate(request, params)
        return self._result(len(request.prompt_ids or ()), out)
