"""What structure a chat request asks for. Its answer is then data the client parses, not prose, and a
rewrite would break the client (the openai SDK's ``.parse()``, LangChain's ``with_structured_output``).

Read from OpenAI's ``response_format`` (``json_object``: JSON mode; ``json_schema``: a schema) and from the
structured-output fields of OpenAI-compatible servers: vLLM's ``structured_outputs`` (and the older
``guided_json``/``guided_regex``/``guided_choice``/``guided_grammar``), SGLang's ``regex``/``ebnf``. Only JSON
and JSON-schema requests can be corrected on request (the correction is kept when it parses and validates);
a regex, a choice or a grammar cannot be checked here, so those answers always pass through.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from aligner_core.decision import Structure

from .bad_request import RequestShapeError

#: Body fields of OpenAI-compatible servers that constrain the answer to something other than JSON.
_UNCHECKABLE_FIELDS = {
    "guided_regex": "regex",
    "guided_choice": "choice",
    "guided_grammar": "grammar",
    "regex": "regex",
    "ebnf": "grammar",
}
_UNCHECKABLE_KEYS = ("regex", "choice", "grammar", "structural_tag")


@dataclass(frozen=True)
class RequestedStructure:
    """The structure a request asks for. ``kind`` is what the ``aligner`` field reports (``json``,
    ``json_schema``, ``regex``, ``choice``, ``grammar``, ``structural_tag``); ``checkable``: whether a
    correction can be checked against it (JSON and JSON schema only)."""

    structure: Structure
    kind: str
    checkable: bool = True


def requested_structure(body: Mapping[str, Any]) -> RequestedStructure | None:
    """The structure ``body`` asks for, or None for prose (``response_format`` ``text`` or absent)."""
    if body.get("response_format") is not None:
        return _response_format(body["response_format"])
    outputs = body.get("structured_outputs")
    if isinstance(outputs, Mapping):
        if outputs.get("json") is not None:
            return _schema(outputs["json"])
        if outputs.get("json_object"):
            return RequestedStructure(Structure("json"), "json")
        for key in _UNCHECKABLE_KEYS:
            if outputs.get(key) is not None:
                return RequestedStructure(Structure("json"), key, checkable=False)
    if body.get("guided_json") is not None:
        return _schema(body["guided_json"])
    for field, kind in _UNCHECKABLE_FIELDS.items():
        if body.get(field) is not None:
            return RequestedStructure(Structure("json"), kind, checkable=False)
    return None


def _response_format(value: Any) -> RequestedStructure | None:
    if not isinstance(value, Mapping) or not isinstance(value.get("type"), str):
        raise RequestShapeError(
            "'response_format' must be an object with a 'type' (text, json_object or json_schema)",
            param="response_format",
        )
    kind = value["type"]
    if kind == "text":
        return None
    if kind == "json_object":
        return RequestedStructure(Structure("json"), "json")
    if kind == "json_schema":
        spec = value.get("json_schema")
        if not isinstance(spec, Mapping):
            raise RequestShapeError(
                "'response_format.json_schema' must be an object with a 'schema'",
                param="response_format.json_schema",
            )
        schema = spec.get("schema")
        if schema is not None and not isinstance(schema, Mapping):
            raise RequestShapeError(
                "'response_format.json_schema.schema' must be a JSON schema object",
                param="response_format.json_schema.schema",
            )
        name = spec.get("name") if isinstance(spec.get("name"), str) else None
        return RequestedStructure(Structure("json_schema", schema=schema, name=name), "json_schema")
    # A format this proxy does not know (a server's extension): its answer is structured, but not checkable here.
    return RequestedStructure(Structure("json"), kind, checkable=False)


def _schema(value: Any) -> RequestedStructure:
    """A schema given as an object or as JSON text (vLLM takes both); text that is not JSON cannot be checked."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            return RequestedStructure(Structure("json_schema"), "json_schema", checkable=False)
    if not isinstance(value, Mapping):
        return RequestedStructure(Structure("json_schema"), "json_schema", checkable=False)
    return RequestedStructure(Structure("json_schema", schema=value), "json_schema")


__all__ = ["RequestedStructure", "requested_structure"]
