"""The Aligner's own generation as a chat-model run.

Tracers, token/cost views and ``astream_events`` learn about LLM work from chat-model runs, so each
correction opens one, nested in the ``AlignerRunnable`` chain run: its input is the conversation's
earlier turns (if any), then the question and the answer as a human and an AI message, its tokens
stream as ``on_chat_model_stream`` (the corrected text only), and its usage is the Aligner's own
tokens. Its output message's ``response_metadata`` carries the core's correction metadata
(template, history turns, the inspector's verdict, ...).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from langchain_core.callbacks import (
    AsyncCallbackManager,
    AsyncCallbackManagerForLLMRun,
    CallbackManager,
    CallbackManagerForLLMRun,
)
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage, HumanMessage
from langchain_core.messages.ai import UsageMetadata
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, LLMResult

from aligner_core import Aligner, Correction

from ._io import Job, turn_messages

#: The run's name in traces and ``astream_events``.
RUN_NAME = "Aligner"
_SERIALIZED = {"lc": 1, "type": "not_implemented", "id": ["aligner_core", "aligner", "Aligner"], "name": RUN_NAME}


def _messages(job: Job) -> list[list[BaseMessage]]:
    return [[*turn_messages(job.history, job.context), HumanMessage(job.question), AIMessage(job.text)]]


def _prepare(manager: CallbackManager | AsyncCallbackManager, aligner: Aligner, options: Mapping[str, Any]) -> dict[str, Any]:
    params: dict[str, Any] = {"ls_provider": "aligner", "ls_model_name": aligner.name, "ls_model_type": "chat"}
    if options.get("temperature") is not None and options.get("do_sample"):
        params["ls_temperature"] = options["temperature"]
    if options.get("max_new_tokens") is not None:
        params["ls_max_tokens"] = options["max_new_tokens"]
    if options.get("stop"):
        params["ls_stop"] = list(options["stop"])
    manager.add_metadata(params, inherit=False)
    invocation = {k: (list(v) if isinstance(v, tuple) else v) for k, v in options.items()}
    return {"invocation_params": {"model": aligner.name, "engine": aligner.engine.name, **invocation}, "name": RUN_NAME}


def start(manager: CallbackManager, aligner: Aligner, job: Job, options: Mapping[str, Any]) -> CallbackManagerForLLMRun:
    """Open the chat-model run of one correction under ``manager`` (a chain run's child manager)."""
    (run,) = manager.on_chat_model_start(_SERIALIZED, _messages(job), **_prepare(manager, aligner, options))
    return run


async def astart(
    manager: AsyncCallbackManager, aligner: Aligner, job: Job, options: Mapping[str, Any]
) -> AsyncCallbackManagerForLLMRun:
    """Async :func:`start`."""
    (run,) = await manager.on_chat_model_start(_SERIALIZED, _messages(job), **_prepare(manager, aligner, options))
    return run


def message_id(job: Job, run: Any) -> str:
    """The id the correction's chunks and final message share (the answer's own id when it is a message), so
    LangGraph's ``stream_mode="messages"`` streams the corrected text once and dedupes the whole message."""
    own = getattr(job.answer, "id", None)
    return own if isinstance(own, str) and own else f"aligner-{run.run_id}"


def chunk(delta: str, id: str | None = None) -> ChatGenerationChunk:
    """One streamed piece of the correction, as chat-model callbacks carry it."""
    return ChatGenerationChunk(message=AIMessageChunk(content=delta, id=id))


def result(correction: Correction, aligner: Aligner, id: str | None = None) -> LLMResult:
    """The run's output: the corrected text with the Aligner's own token usage."""
    usage = UsageMetadata(
        input_tokens=correction.prompt_tokens,
        output_tokens=correction.completion_tokens,
        total_tokens=correction.prompt_tokens + correction.completion_tokens,
    )
    message = AIMessage(
        id=id,
        content=correction.text,
        usage_metadata=usage,
        response_metadata={
            "model_name": aligner.name, "finish_reason": correction.finish_reason, "aligner": dict(correction.metadata),
        },
    )
    return LLMResult(
        generations=[[ChatGeneration(message=message, generation_info={"finish_reason": correction.finish_reason})]],
        llm_output={"model_name": aligner.name},
    )
