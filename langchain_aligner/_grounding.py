"""Collect what a wrapped chain's answer was grounded on, from the chain's own callbacks.

``with_aligner`` runs the wrapped chain with this handler among its callbacks: every retriever's documents
(``on_retriever_end``) and every tool call with its result (``on_tool_start``/``on_tool_end``) inside the chain
becomes a context item of the correction, in the order they happened. Nothing is asked of the chain: a RAG chain
with a retriever, or an agent executor with tools, is grounded as it runs.
"""

from __future__ import annotations

import json
from typing import Any
from uuid import UUID

from langchain_core.callbacks import BaseCallbackHandler

from ._inputs import document_item


class GroundingCollector(BaseCallbackHandler):
    """Records retrieved documents and tool calls/results of the runs it sees, as core context items."""

    run_inline = True  # in order, in the calling thread: items keep the order the chain produced them

    def __init__(self) -> None:
        self.items: list[dict[str, str]] = []
        self._tools: dict[UUID, str] = {}

    def on_retriever_end(self, documents: Any, *, run_id: UUID, **kwargs: Any) -> None:
        self.items.extend(document_item(d) for d in documents or () if hasattr(d, "page_content"))

    def on_tool_start(
        self,
        serialized: dict[str, Any] | None,
        input_str: str,
        *,
        run_id: UUID,
        inputs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        name = (serialized or {}).get("name") or kwargs.get("name") or "tool"
        self._tools[run_id] = name
        args = json.dumps(inputs, ensure_ascii=False, sort_keys=True, default=str) if inputs else input_str
        self.items.append({"type": "tool_call", "name": name, "content": args})

    def on_tool_end(self, output: Any, *, run_id: UUID, **kwargs: Any) -> None:
        text = getattr(output, "text", None)
        content = text if isinstance(text, str) else str(getattr(output, "content", output))
        self.items.append(
            {"type": "tool_result", "name": self._tools.pop(run_id, "tool"), "content": content}
        )

    def on_tool_error(self, error: BaseException, *, run_id: UUID, **kwargs: Any) -> None:
        name = self._tools.pop(run_id, "tool")
        self.items.append(
            {"type": "tool_result", "name": name, "content": f"error: {type(error).__name__}: {error}"}
        )
