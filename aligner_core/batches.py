"""Many answers on one engine: prepare the pairs, run the live requests, build ``Correction``s in input order.

``Aligner.correct_batch`` and ``acorrect_batch`` hand their (inspector-filtered) pairs here through the gate
(``gating.batch`` / ``gating.abatch``). A pair refused before any compute keeps its exception in its place; the
sync path reports progress while the engine decodes, the async path sends every request at once so concurrent
callers share the engine's batches.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping, Sequence
from typing import Any

from . import requests
from .correction import Correction
from .progress import generate_tracked
from .requests import PreparedRequest


def run(
    aligner: Any,
    subset: Sequence[Any],
    limits: Any,
    *,
    passed: int,
    tracker: Any,
    return_exceptions: bool,
    generation: Mapping[str, Any],
) -> list[Any]:
    """Correct ``subset`` in planned batches; ``passed`` answers the inspector let through count as done."""
    if tracker is not None and passed:
        tracker.update(rows=passed)  # answers the inspector passed are done: no generation
    slots, params = requests.prepare_all(aligner, subset, return_exceptions, limits, dict(generation))
    live = [i for i, s in enumerate(slots) if isinstance(s, PreparedRequest)]
    if tracker is not None:
        tracker.update(rows=len(subset) - len(live))  # pairs refused before any compute
    outputs = generate_tracked(
        aligner.engine,
        [slots[i].request for i in live],  # type: ignore[union-attr]
        params,
        fail_fast=not return_exceptions,
        progress=tracker,
    )
    results: list[Any] = list(slots)
    for i, out in zip(live, outputs):
        results[i] = out if isinstance(out, BaseException) else requests.build(slots[i], out)  # type: ignore[arg-type]
    return results


async def arun(
    aligner: Any,
    subset: Sequence[Any],
    limits: Any,
    *,
    return_exceptions: bool,
    generation: Mapping[str, Any],
) -> list[Any]:
    """Async :func:`run`: every request goes to the engine at once; latency counts from the call."""
    slots, params = requests.prepare_all(aligner, subset, return_exceptions, limits, dict(generation))
    start = time.perf_counter()

    async def one(slot: PreparedRequest | Exception) -> Correction:
        if isinstance(slot, Exception):
            raise slot
        out = await aligner.engine.agenerate(slot.request, params)
        return requests.build(slot, out, latency=time.perf_counter() - start)

    return list(await asyncio.gather(*(one(s) for s in slots), return_exceptions=return_exceptions))


__all__ = ["arun", "run"]
