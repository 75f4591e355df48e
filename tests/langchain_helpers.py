"""Shared by the LangChain tests: a tool-binding fake upstream, a recorder of run trees and custom events."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any
from uuid import UUID

from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.language_models import GenericFakeChatModel
from langchain_core.runnables import Runnable
from langchain_core.tools import BaseTool
from langchain_core.tracers.schemas import Run
from langchain_core.utils.function_calling import convert_to_openai_tool

QUESTION = "How many legs does a spider have?"
ANSWER = "Spiders have six legs, like all insects."


class ToolBindingFakeChatModel(GenericFakeChatModel):
    """langchain-core's GenericFakeChatModel plus the usual ``bind_tools`` (tools bound as call kwargs)."""

    def bind_tools(
        self,
        tools: Sequence[dict[str, Any] | type | Callable[..., Any] | BaseTool],
        *,
        tool_choice: str | None = None,
        **kwargs: Any,
    ) -> Runnable[Any, Any]:
        formatted = [convert_to_openai_tool(t) for t in tools]
        if tool_choice is not None:
            kwargs["tool_choice"] = tool_choice
        return self.bind(tools=formatted, **kwargs)


class EventRecorder(BaseCallbackHandler):
    """Records custom events (name, data, run id) and chain runs (name, run type, run id, parent id)."""

    def __init__(self) -> None:
        self.events: list[tuple[str, Any, UUID]] = []
        self.chains: list[tuple[str, str, UUID, UUID | None]] = []

    def on_custom_event(self, name: str, data: Any, *, run_id: UUID, **kwargs: Any) -> None:
        self.events.append((name, data, run_id))

    def on_chain_start(
        self, serialized: Any, inputs: Any, *, run_id: UUID, parent_run_id: UUID | None = None, **kwargs: Any
    ) -> None:
        self.chains.append(
            (kwargs.get("name") or "", kwargs.get("run_type") or "chain", run_id, parent_run_id)
        )


def tree(run: Run) -> tuple[str, str, list[Any]]:
    """A run and its children as nested (name, run_type, children) tuples, children in start order."""
    children = sorted(run.child_runs, key=lambda r: r.start_time)
    return (run.name, run.run_type, [tree(c) for c in children])


def names(node: tuple[str, str, list[Any]]) -> list[str]:
    """Every run name in a tree, depth first."""
    return [node[0], *[n for child in node[2] for n in names(child)]]


class AlignerRuns(BaseCallbackHandler):
    """Counts the corrections generated: each opens a chat-model run named ``Aligner`` (skipped answers do not)."""

    def __init__(self) -> None:
        self.count = 0

    def on_chat_model_start(self, serialized: Any, messages: Any, **kwargs: Any) -> None:
        if kwargs.get("name") == "Aligner":
            self.count += 1


class _RecordingEngine:
    """The Aligner's real engine, recording the prompt (or chat messages) of every request it is given."""

    def __init__(self, engine: Any, prompts: list[str]) -> None:
        self._engine, self.prompts = engine, prompts

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    def _seen(self, request: Any) -> None:
        self.prompts.append(request.prompt or repr(list(request.messages or ())))

    def generate(self, requests: Any, params: Any, **kwargs: Any) -> Any:
        for r in requests:
            self._seen(r)
        return self._engine.generate(requests, params, **kwargs)

    def submit(self, request: Any, params: Any) -> Any:
        self._seen(request)
        return self._engine.submit(request, params)

    async def agenerate(self, request: Any, params: Any) -> Any:
        self._seen(request)
        return await self._engine.agenerate(request, params)

    def stream(self, request: Any, params: Any, on_text: Any) -> Any:
        self._seen(request)
        return self._engine.stream(request, params, on_text)

    async def astream(self, request: Any, params: Any, on_text: Any) -> Any:
        self._seen(request)
        return await self._engine.astream(request, params, on_text)


@contextlib.contextmanager
def record_prompts(aligner: Any) -> Iterator[list[str]]:
    """Record the exact prompt of every correction ``aligner`` generates inside the block (a spy on its real engine)."""
    prompts: list[str] = []
    real = aligner.engine
    aligner.engine = _RecordingEngine(real, prompts)
    try:
        yield prompts
    finally:
        aligner.engine = real
