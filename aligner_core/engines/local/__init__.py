"""The library's transformers engine: a model in this process, batched by a scheduler, planned by length, decoded
with answer-anchored drafting (``engine``; its helpers beside it: ``scheduler``, ``planner``, ``speculative``,
``memory_budget``, ``threads``)."""

from .engine import TransformersEngine

__all__ = ["TransformersEngine"]
