"""What a serialized adapter records of the live objects it holds, and how ``from_dict`` gets them back.

An Aligner is a loaded model, not a setting: it is recorded by name (model, template, engine) and reloaded with
``Aligner.from_pretrained`` when that can work. A wrapped LLM is rebuilt the way LlamaIndex itself does, by its
``class_name``: ``llama_index.core.llms.loading.load_llm`` knows a few LLMs by name (MockLLM, OpenAI, ...), and any
other imported LLM class answers to the same key and rebuilds itself with its own ``from_dict``. What cannot be
rebuilt (an Aligner built from objects or a server, a local model object, a name more than one class answers to)
raises a ``ValueError`` that says to pass it back.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from llama_index.core.llms.llm import LLM
from llama_index.core.llms.loading import load_llm

from aligner_core import Aligner


def aligner_spec(aligner: Aligner) -> dict[str, str]:
    """What a serialized component records of its Aligner: enough to reload a hub model, not the weights."""
    return {"model": aligner.name, "template": aligner.template.name, "engine": aligner.engine.name}


def load_aligner(spec: Mapping[str, Any] | None, owner: str) -> Aligner:
    """Reload the Aligner a dict recorded (``from_dict`` without ``aligner=``), or say how to pass one."""
    hint = f"pass the Aligner back: {owner}.from_dict(data, aligner=aligner)"
    if not spec or not spec.get("model"):
        raise ValueError(f"the dict records no Aligner model to load; {hint}")
    engine = spec.get("engine", "transformers")
    if engine not in ("transformers", "vllm"):
        raise ValueError(f"an Aligner on the {engine!r} engine cannot be reloaded from its name; {hint}")
    try:
        return Aligner.from_pretrained(spec["model"], template=spec.get("template"), engine=engine)
    except (OSError, ValueError) as exc:
        raise ValueError(f"could not reload the Aligner {spec['model']!r} ({exc}); {hint}") from exc


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
