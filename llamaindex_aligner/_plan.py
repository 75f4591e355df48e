"""What AlignedLLM does with one upstream response: the question, history and context the Aligner sees, the
core's decision, and how the corrected text goes back into a LlamaIndex response."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from llama_index.core.base.llms.types import ChatMessage, ChatResponse, TextBlock

from aligner_core.decision import Decision, Reply, decide

from . import _react
from ._calls import Call
from ._grounding import Turn, content_parts, document, read_chat

ToolCalls = Callable[[ChatMessage], list[tuple[str | None, str, Any]]]


@dataclass(frozen=True)
class Plan:
    """One response to correct or pass: ``prefix`` is kept before the corrected text (a ReAct step's
    ``Thought: ... Answer: ``)."""

    turn: Turn
    decision: Decision
    prefix: str = ""
    site: str = ""

    def text(self, corrected: str) -> str:
        return self.prefix + corrected


def plan_chat(
    call: Call,
    messages: Sequence[ChatMessage],
    response: ChatResponse,
    tool_calls: ToolCalls,
    correct_structured: bool,
) -> Plan:
    """The plan for a chat response: grounded on the prompt's context and the tool turns after the question."""
    prompt = call.prompt
    turn = read_chat(
        messages,
        question=prompt.question if prompt else None,
        documents=prompt.documents if prompt else (),
        react=call.react,
        tool_calls=tool_calls,
    )
    message = response.message
    calls = bool(tool_calls(message))
    return _plan(call, turn, content_parts(message), message.content or "", calls, correct_structured)


def plan_completion(call: Call, prompt_text: str, text: str, correct_structured: bool) -> Plan:
    """The plan for a completion: the prompt's ``query_str`` (or the prompt itself) is the question; a chat prompt
    rendered for a completion model is read as the messages it was rendered from (its history, its context)."""
    prompt = call.prompt
    if prompt is not None and prompt.messages:
        turn = read_chat(
            prompt.messages, question=prompt.question, documents=prompt.documents, react=call.react
        )
    else:
        question = (prompt.question if prompt else None) or prompt_text
        turn = Turn(question, [], [document(d) for d in (prompt.documents if prompt else ())])
    return _plan(call, turn, text, text, False, correct_structured)


def _plan(call: Call, turn: Turn, content: Any, text: str, calls: bool, correct_structured: bool) -> Plan:
    if call.react and not calls:
        step = _react.read_step(text)
        if step.answer is not None:
            return Plan(
                turn,
                decide(Reply(content=step.answer), correct_structured=correct_structured),
                step.prefix,
                call.site,
            )
        reply = Reply(content=content, step="intermediate")  # an action, or text the agent will ask again for
    else:
        reply = Reply(content=content, tool_calls=calls, structure=call.structure, step=call.step)
    return Plan(turn, decide(reply, correct_structured=correct_structured), "", call.site)


def with_text(message: ChatMessage, text: str) -> ChatMessage:
    """A copy of ``message`` whose text is ``text``: the first text block replaced, other text blocks dropped,
    non-text blocks (tool calls, images, thinking) kept in place."""
    blocks: list[Any] = []
    for block in message.blocks:
        if not isinstance(block, TextBlock):
            blocks.append(block)
        elif not any(isinstance(b, TextBlock) for b in blocks):
            blocks.append(TextBlock(text=text))
    if not any(isinstance(b, TextBlock) for b in blocks):
        blocks.append(TextBlock(text=text))
    return message.model_copy(update={"blocks": blocks})
