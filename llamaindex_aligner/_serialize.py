"""Rebuild a wrapped LlamaIndex LLM from its ``to_dict()``, the way LlamaIndex itself does: by its ``class_name``.

``llama_index.core.llms.loading.load_llm`` knows a few LLMs by name (MockLLM, OpenAI, ...); any other LLM class
that is imported is found by the same key, its ``class_name()``, and rebuilt with its own ``from_dict``. A name
no imported class (or more than one) answers to, or an LLM that cannot rebuild itself from settings (a local
model object), raises a ``ValueError`` that says to pass the LLM back.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from llama_index.core.llms.llm import LLM
from llama_index.core.llms.loading import load_llm


def rebuild_llm(data: Any, owner: str) -> LLM:
    """The LLM ``data`` (a ``to_dict()``) records, or a ``ValueError`` saying how to pass it instead."""
    hint = f"pass it back: {owner}.from_dict(data, aligner=aligner, llm=llm)"
    if isinstance(data, LLM):
        return data
    name = data.get("class_name") if isinstance(data, Mapping) else None
    if not name:
        raise ValueError(f"the dict records no wrapped LLM (no 'llm' with a 'class_name'); {hint}")
    classes = {cls for cls in _subclasses(LLM) if _name(cls) == name}
    try:
        try:
            return load_llm(dict(data))
        except ValueError as exc:
            if not str(exc).startswith("Invalid LLM name") or len(classes) != 1:
                raise
        return classes.pop().from_dict(dict(data))
    except Exception as exc:
        found = "" if len(classes) == 1 else f" ({len(classes)} imported LLM classes are named {name!r})"
        raise ValueError(f"could not rebuild the wrapped LLM {name!r}{found}: {exc}; {hint}") from exc


def _subclasses(cls: type) -> Iterator[type]:
    for sub in cls.__subclasses__():
        yield sub
        yield from _subclasses(sub)


def _name(cls: type) -> str | None:
    try:
        return cls.class_name()
    except Exception:  # an abstract class without a name of its own
        return None
