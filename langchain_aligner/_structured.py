"""``AlignedChatModel.with_structured_output``: the wrapped model's own structured output, passed through by default.

A structured answer is data the caller parses, not prose. The wrapped model produces it its own way (function
calling, JSON schema or JSON mode: ``llm.with_structured_output(..., include_raw=True)``), off every user stream;
the core's decision then passes it through (``skipped: "structured_output"`` in the raw message's
``response_metadata["aligner"]``), or, with ``correct_structured=True``, corrects it and keeps the correction only
if it still parses and validates against the schema (else the original, ``skipped: "structured_output_invalid"``).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from langchain_core.messages import AIMessage
from langchain_core.runnables import Runnable, RunnableConfig, RunnableLambda
from langchain_core.runnables.config import (
    get_async_callback_manager_for_config,
    get_callback_manager_for_config,
)
from langchain_core.utils.function_calling import convert_to_json_schema
from pydantic import BaseModel

from aligner_core.decision import Structure

from ._inputs import conversation_request, to_messages
from ._outputs import METADATA_KEY
from ._quiet import UNCORRECTED_TAG, ainvoke_in, child_config, invoke_in

METHODS = {"function_calling": "tool_call", "json_schema": "json_schema", "json_mode": "json"}


def structure_of(schema: Any, method: str) -> Structure:
    """The core's description of what the caller will parse."""
    json_schema = None
    if schema is not None:
        try:
            json_schema = convert_to_json_schema(schema)
        except (TypeError, ValueError):  # a schema LangChain cannot describe: parse-only checks
            json_schema = None
    validator = schema.model_validate if isinstance(schema, type) and issubclass(schema, BaseModel) else None
    return Structure(METHODS[method], json_schema, validator, getattr(schema, "__name__", None))  # type: ignore[arg-type]


def parse(schema: Any, message: AIMessage, structure: Structure) -> Any:
    """The caller's value from a corrected message: a pydantic object for a pydantic schema, else the JSON."""
    value = message.tool_calls[0]["args"] if structure.kind == "tool_call" else json.loads(message.text)
    if isinstance(schema, type) and issubclass(schema, BaseModel):
        return schema.model_validate(value)
    return value


def structured_output(
    llm: Runnable[Any, Any],
    schema: Any,
    *,
    method: str,
    include_raw: bool,
    stage: Callable[..., Runnable[Any, Any]],
    hide_upstream: bool,
    **kwargs: Any,
) -> Runnable[Any, Any]:
    """The runnable ``AlignedChatModel.with_structured_output`` returns: ``llm``'s structured output (its raw
    message hidden from user streams when ``hide_upstream``), then ``stage(structure=...)`` on the raw message."""
    if method not in METHODS:
        raise ValueError(f"method must be 'function_calling', 'json_schema' or 'json_mode', got {method!r}")
    make = getattr(llm, "with_structured_output", None)
    if make is None:
        raise NotImplementedError(f"the wrapped {type(llm).__name__} has no with_structured_output")
    inner = make(schema, include_raw=True, method=method, **kwargs)
    structure = structure_of(schema, method)
    corrector = stage(structure=structure)

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
        messages = to_messages(value, "the input")
        up = child_config(
            config, get_callback_manager_for_config(config), quiet=hide_upstream, tag=UNCORRECTED_TAG
        )
        out = invoke_in(inner, messages, up)
        down = child_config(config, get_callback_manager_for_config(config), quiet=True)
        return finish(out, corrector.invoke({**conversation_request(messages), "answer": out["raw"]}, down))

    async def arun(value: Any, config: RunnableConfig) -> Any:
        messages = to_messages(value, "the input")
        manager = get_async_callback_manager_for_config
        up = child_config(config, manager(config), quiet=hide_upstream, tag=UNCORRECTED_TAG)
        out = await ainvoke_in(inner, messages, up)
        down = child_config(config, manager(config), quiet=True)
        return finish(
            out, await corrector.ainvoke({**conversation_request(messages), "answer": out["raw"]}, down)
        )

    return RunnableLambda(run, afunc=arun, name="AlignedChatModel.with_structured_output")
