"""Shared by the LangChain tests: a tool-binding fake upstream, a recorder of run trees and custom events."""

from __future__ import annotations

from collections.abc import Callable, Sequence
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
        self.chains.append((kwargs.get("name") or "", kwargs.get("run_type") or "chain", run_id, parent_run_id))


def tree(run: Run) -> tuple[str, str, list[Any]]:
    """A run and its children as nested (name, run_type, children) tuples, children in start order."""
    children = sorted(run.child_runs, key=lambda r: r.start_time)
    return (run.name, run.run_type, [tree(c) for c in children])


def names(node: tuple[str, str, list[Any]]) -> list[str]:
    """Every run name in a tree, depth first."""
    return [node[0], *[n for child in node[2] for n in names(child)]]
