"""``AlignedChatModel.with_structured_output``: the wrapped model's own structured output, passed through by default.

A structured answer is data the caller parses, not prose. The wrapped model produces it its own way (function
calling, JSON schema or JSON mode: ``llm.with_structured_output(..., include_raw=True)``), off every user stream;
the core's decision then passes it through (``skipped: "structured_output"`` in the raw message's
``response_metadata["aligner"]``), or, with ``correct_structured=True``, corrects it and keeps the correction only
if it still parses and validates against the schema (else the original, ``skipped: "structured_output_invalid"``).
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from langchain_core.messages import AIMessage
from langchain_core.runnables import Runnable, RunnableConfig, RunnableLambda
from langchain_core.runnables.config import (
    get_async_callback_manager_for_config,
    get_callback_manager_for_config,
)
from langchain_core.utils.function_calling import convert_to_json_schema
from pydantic import BaseModel

from aligner_core.decision import Structure

from ._io import METADATA_KEY, MissingQuestionError, split_question
from ._quiet import UNCORRECTED_TAG, ainvoke_in, child_config, invoke_in

if TYPE_CHECKING:
    from .chat_model import AlignedChatModel


def structure_of(schema: Any, method: str) -> Structure:
    """The core's description of what the caller will parse."""
    kind = {"function_calling": "tool_call", "json_schema": "json_schema", "json_mode": "json"}[method]
    json_schema = None
    if schema is not None:
        try:
            json_schema = convert_to_json_schema(schema)
        except (TypeError, ValueError):  # a schema LangChain cannot describe: parse-only checks
            json_schema = None
    validator = schema.model_validate if isinstance(schema, type) and issubclass(schema, BaseModel) else None
    return Structure(kind, json_schema, validator, getattr(schema, "__name__", None))  # type: ignore[arg-type]


def parse(schema: Any, message: AIMessage, structure: Structure) -> Any:
    """The caller's value from a corrected message: a pydantic object for a pydantic schema, else the JSON."""
    value = message.tool_calls[0]["args"] if structure.kind == "tool_call" else json.loads(message.text)
    if isinstance(schema, type) and issubclass(schema, BaseModel):
        return schema.model_validate(value)
    return value


def structured_output(
    model: AlignedChatModel, schema: Any, *, method: str, include_raw: bool, **kwargs: Any
) -> Runnable[Any, Any]:
    """The runnable ``AlignedChatModel.with_structured_output`` returns (see the module docstring)."""
    if method not in ("function_calling", "json_schema", "json_mode"):
        raise ValueError(f"method must be 'function_calling', 'json_schema' or 'json_mode', got {method!r}")
    make = getattr(model.llm, "with_structured_output", None)
    if make is None:
        raise NotImplementedError(f"the wrapped {type(model.llm).__name__} has no with_structured_output")
    inner = make(schema, include_raw=True, method=method, **kwargs)
    structure = structure_of(schema, method)

    def pieces(value: Any, config: RunnableConfig, manager: Any) -> tuple[Any, RunnableConfig, dict[str, Any]]:
        messages = model._convert_input(value).to_messages()
        try:
            question, history, context = split_question(messages)
        except MissingQuestionError:
            question, history, context = "", (), ()
        upstream = child_config(config, manager(config), quiet=not model.stream_uncorrected, tag=UNCORRECTED_TAG)
        request = {"question": question, "history": list(history), "context": list(context)}
        return messages, upstream, request

    def finish(out: dict[str, Any], fixed: AIMessage) -> Any:
        meta = fixed.response_metadata.get(METADATA_KEY, {})
        if meta.get("skipped") is None and meta.get("changed"):
            out = {"raw": fixed, "parsed": parse(schema, fixed, structure), "parsing_error": None}
        else:
            out = {**out, "raw": fixed}
        if include_raw:
            return out
        if out.get("parsing_error") is not None:
            raise out["parsing_error"]
        return out["parsed"]

    def run(value: Any, config: RunnableConfig) -> Any:
        messages, upstream, request = pieces(value, config, get_callback_manager_for_config)
        out = invoke_in(inner, messages, upstream)
        stage = model._stage(messages, None, structure=structure)
        down = child_config(config, get_callback_manager_for_config(config), quiet=True)
        return finish(out, stage.invoke({**request, "answer": out["raw"]}, down))

    async def arun(value: Any, config: RunnableConfig) -> Any:
        messages, upstream, request = pieces(value, config, get_async_callback_manager_for_config)
        out = await ainvoke_in(inner, messages, upstream)
        stage = model._stage(messages, None, structure=structure)
        down = child_config(config, get_async_callback_manager_for_config(config), quiet=True)
        return finish(out, await stage.ainvoke({**request, "answer": out["raw"]}, down))

    return RunnableLambda(run, afunc=arun, name="AlignedChatModel.with_structured_output")
