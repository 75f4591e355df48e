"""ReAct steps, read with LlamaIndex's own ``ReActOutputParser``: only the ``Answer:`` of a final step is an answer.

A ReAct agent's LLM writes ``Thought: ... Action: ... Action Input: {...}`` (a step the user does not read: the
agent calls the tool) or ``Thought: ... Answer: ...`` (the agent is done; ``ReActAgent.finalize`` shows the text
after ``Answer:``). The reasoning so far comes back to the LLM as assistant messages (thoughts and actions) and
``Observation: ...`` messages (tool results): the grounding of the final answer.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from llama_index.core.agent.react.output_parser import ReActOutputParser
from llama_index.core.agent.react.types import ActionReasoningStep, ResponseReasoningStep

from aligner_core.context import ContextItem

OBSERVATION = "Observation:"
_ANSWER = re.compile(r"Answer:[ \t]*", re.MULTILINE)


@dataclass(frozen=True)
class ReActStep:
    """A parsed step: ``answer`` is None for an action (or text the parser rejects: the agent retries)."""

    prefix: str = ""
    answer: str | None = None


def read_step(text: str) -> ReActStep:
    """Split a step into the part kept as written (``Thought: ... Answer: ``) and the answer to correct."""
    try:
        step = ReActOutputParser().parse(text, is_streaming=False)
    except (ValueError, TypeError):
        return ReActStep()
    if not isinstance(step, ResponseReasoningStep):
        return ReActStep()
    match = _ANSWER.search(text)
    if match is None:  # no markers: the parser reads the whole text as the answer
        return ReActStep("", text)
    return ReActStep(text[: match.end()], text[match.end() :])


def reasoning_context(role: str, text: str, last_action: str | None) -> tuple[ContextItem | None, str | None]:
    """A reasoning message as a context item (an action as a tool call, an observation as its result), and the
    action's name (kept so the next observation can be named)."""
    if text.startswith(OBSERVATION):
        result = text[len(OBSERVATION) :].strip()
        return ContextItem("tool_result", result, last_action), last_action
    if role != "assistant":
        return None, last_action
    try:
        step = ReActOutputParser().parse(text, is_streaming=False)
    except (ValueError, TypeError):
        return None, last_action
    if isinstance(step, ActionReasoningStep):
        return ContextItem(
            "tool_call", json.dumps(step.action_input, ensure_ascii=False, default=str), step.action
        ), step.action
    return None, last_action


def is_observation(message: Any) -> bool:
    return (message.content or "").startswith(OBSERVATION)
