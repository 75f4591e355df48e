"""Which LLM calls write the answer the user reads: AlignedLLM's reading of what LlamaIndex says at each call.

LlamaIndex calls one LLM for many jobs in a turn (condense a question, rewrite a query, pick a route, think a
ReAct step, write the answer). The LLM cannot see the job in its messages, but the call site says it: the
LlamaIndex module that called it. So AlignedLLM reads, in this order:

1. the core's explicit marker, ``with aligner_core.step("final" | "intermediate")`` (``decide`` applies it);
2. a structured-output program (``llama_index.core.program``: ``as_structured_llm``, ``structured_predict``,
   ``LLMTextCompletionProgram``, ``FunctionCallingProgram``): structured output, with the program's schema;
3. the ReAct agent (``llama_index.core.agent.workflow.react_agent``): its output is parsed, see ``_react``;
4. the modules whose calls write the user's answer (:data:`FINAL_CALLERS`: response synthesizers, the simple
   chat engine, the function-calling agents): final;
5. any other LlamaIndex module (condense and condense-plus-context chat engines' condensing, query transforms
   such as HyDE and decompose, selectors and routers, question generators, rerankers, evaluators, memory
   summaries): intermediate, unless the prompt it hands ``predict`` is one of :data:`ANSWER_PROMPTS`;
6. anything else (your code, your workflow steps, a custom query engine, and a call scheduled as its own task or
   thread, whose call site is lost): final.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator, Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

from aligner_core.decision import Step, Structure

#: Modules between AlignedLLM and the code that called it (LLM plumbing, wrappers, instrumentation, job runners).
PLUMBING = (
    "llamaindex_aligner",
    "llama_index.core.llms",
    "llama_index.core.base.llms",
    "llama_index.llms.",
    "llama_index_instrumentation",
    "llama_index.core.instrumentation",
    "llama_index.core.async_utils",
    "wrapt",
    "functools",
    "contextlib",
)
#: Where a call site is lost: the call was scheduled as its own task or thread (read as your code: final).
BOUNDARIES = ("asyncio", "concurrent.futures", "threading")
#: LlamaIndex modules whose LLM calls write the answer the user reads.
FINAL_CALLERS = (
    "llama_index.core.response_synthesizers",  # every query engine's and context chat engine's answer
    "llama_index.core.chat_engine.simple",  # SimpleChatEngine answers with the LLM itself
    "llama_index.core.agent.workflow.function_agent",  # tool calls pass (tool_calls), the answer is corrected
)
#: The ReAct agent: its calls are thoughts and actions, or a final step whose ``Answer:`` part is the answer.
REACT_CALLERS = ("llama_index.core.agent.workflow.react_agent", "llama_index.core.agent.react")
#: Structured-output programs: what they get back is parsed as the program's pydantic model.
PROGRAM_CALLERS = ("llama_index.core.program",)
#: ``PromptType`` values (``prompt.metadata["prompt_type"]``) that write an answer wherever they are used.
ANSWER_PROMPTS = frozenset({"sql_response_synthesis", "sql_response_synthesis_v2"})
#: Prompt variables that hold what the answer is grounded on (retrieved text, an SQL result, a new chunk).
GROUNDING_VARS = ("context_str", "context_msg")


@dataclass(frozen=True)
class PromptCall:
    """What ``predict``/``stream`` was handed: the prompt's type and variables (the question, the context)."""

    prompt_type: str | None = None
    variables: Mapping[str, Any] = field(default_factory=dict)
    #: The prompt as chat messages (a completion model gets them rendered as one string: its history is here).
    messages: list[Any] | None = None

    @property
    def question(self) -> str | None:
        value = self.variables.get("query_str")
        return value if isinstance(value, str) and value.strip() else None

    @property
    def documents(self) -> list[str]:
        return [v for k in GROUNDING_VARS if isinstance(v := self.variables.get(k), str) and v.strip()]


#: Set by AlignedLLM's ``predict``/``stream`` (and async) for the ``chat``/``complete`` call they make.
PROMPT: ContextVar[PromptCall | None] = ContextVar("llamaindex_aligner_prompt", default=None)


@contextlib.contextmanager
def given(prompt: Any, variables: Mapping[str, Any], llm: Any = None) -> Iterator[None]:
    """Tell the ``chat``/``complete`` call made in the block which prompt (type, variables, messages) it renders."""
    kind = getattr(prompt, "metadata", {}).get("prompt_type")
    partial = getattr(prompt, "kwargs", None) or {}  # a synthesizer fills query_str in with partial_format
    try:
        messages = list(prompt.format_messages(llm=llm, **variables))
    except Exception:  # a prompt that cannot be read as messages: the call still has its variables
        messages = None
    token = PROMPT.set(PromptCall(getattr(kind, "value", kind), {**partial, **variables}, messages))
    try:
        yield
    finally:
        PROMPT.reset(token)


@dataclass(frozen=True)
class Call:
    """One call to AlignedLLM as read from its call site: the step, whether it is a ReAct step, the structure."""

    site: str
    step: Step | None = None
    react: bool = False
    structure: Structure | None = None
    prompt: PromptCall | None = None


def read_call() -> Call:
    """Read the current call (from inside an AlignedLLM method, before the wrapped LLM is called)."""
    site, owner = call_site()
    prompt = PROMPT.get()
    if site.startswith(PROGRAM_CALLERS):
        return Call(site, structure=structure_of(getattr(owner, "output_cls", None)), prompt=prompt)
    if site.startswith(REACT_CALLERS):
        return Call(site, react=True, prompt=prompt)
    final = (
        site.startswith(FINAL_CALLERS)
        or not site.startswith("llama_index")
        or (prompt is not None and prompt.prompt_type in ANSWER_PROMPTS)
    )
    return Call(site, step=None if final else "intermediate", prompt=prompt)


def call_site() -> tuple[str, Any]:
    """The module of the first frame outside the LLM plumbing, and that frame's ``self`` (or None); ``""`` when
    the call came across a task or thread boundary."""
    frame = sys._getframe(1)
    while frame is not None:
        module = frame.f_globals.get("__name__", "")
        if module.startswith(BOUNDARIES):
            return "", None
        if not module.startswith(PLUMBING):
            return module, frame.f_locals.get("self") if module.startswith(PROGRAM_CALLERS) else None
        frame = frame.f_back
    return "", None


def structure_of(output_cls: Any) -> Structure:
    """The structure a program asks for: its pydantic model's JSON schema, validated by the model itself."""
    schema = getattr(output_cls, "model_json_schema", None)
    validate = getattr(output_cls, "model_validate", None)
    if schema is None or validate is None:
        return Structure("json", parser=read_json)
    return Structure(
        "json_schema", schema=schema(), validator=validate, name=output_cls.__name__, parser=read_json
    )


def read_json(text: str) -> Any:
    """JSON as LlamaIndex's programs find it: inside prose or a fenced block (``extract_json_str``)."""
    import json

    from llama_index.core.output_parsers.utils import extract_json_str

    return json.loads(extract_json_str(text))
