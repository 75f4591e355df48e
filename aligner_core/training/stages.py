"""The two stages as one ordered stream, and a learning-rate schedule that restarts at the boundary.

The identity warm-up (Q-A-A) and the Q-A-C stage run in one ``Trainer`` run over a stream laid out
in advance: every epoch of the identity stage (each shuffled with the seed), then every epoch of
the Q-A-C stage. The stream is read in order, so no batch mixes the stages; the identity part is
rounded up to whole optimizer steps (``global_batch`` examples) by repeating a few of its own
records. Each stage gets its own warm-up and decay, as two separate runs would, while resuming,
checkpoints, multi-GPU and DeepSpeed/FSDP stay the ``Trainer``'s own.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Stage:
    """One stage of the stream: its name, examples per epoch, epochs, and length in stream items/steps."""

    name: str
    records: int
    epochs: float
    items: int
    steps: int


def epoch_order(n: int, epochs: float, seed: int) -> list[int]:
    """Indices into ``n`` examples for ``epochs`` passes, each pass freshly shuffled (a fraction: a partial pass)."""
    total = round(n * epochs)
    order: list[int] = []
    pass_no = 0
    while len(order) < total:
        perm = list(range(n))
        random.Random(seed * 1_000_003 + pass_no).shuffle(perm)
        order.extend(perm[: total - len(order)])
        pass_no += 1
    return order


def build_stream(
    sizes: Sequence[tuple[str, int, float]], *, global_batch: int, seed: int
) -> tuple[list[tuple[int, int]], list[Stage]]:
    """Lay the stages out one after the other: ``(stage index, example index)`` items and the stages.

    Every stage but the last is padded to a multiple of ``global_batch`` with more of its own
    (shuffled) examples, so each optimizer step belongs to exactly one stage.
    """
    stream: list[tuple[int, int]] = []
    stages: list[Stage] = []
    live = [(i, s) for i, s in enumerate(sizes) if s[1] > 0 and round(s[1] * s[2]) > 0]
    for pos, (index, (name, n, epochs)) in enumerate(live):
        order = epoch_order(n, epochs, seed + index)
        if pos < len(live) - 1 and len(order) % global_batch:
            extra = epoch_order(n, math.ceil(global_batch / n) + 1, seed + 7919 + index)
            order.extend(extra[: global_batch - len(order) % global_batch])
        stream.extend((index, i) for i in order)
        stages.append(Stage(name, n, epochs, len(order), math.ceil(len(order) / global_batch)))
    return stream, stages


class StagedDataset:
    """A map-style dataset over the laid-out stream (what the ``Trainer`` reads, in order)."""

    def __init__(self, examples: Sequence[Sequence[Any]], stream: Sequence[tuple[int, int]]) -> None:
        self.examples = examples
        self.stream = stream

    def __len__(self) -> int:
        return len(self.stream)

    def __getitem__(self, i: int) -> Any:
        stage, index = self.stream[i]
        return self.examples[stage][index].as_features()


def stage_boundaries(stages: Sequence[Stage], total_steps: int) -> list[tuple[str, int, int]]:
    """``(name, first step, steps)`` of each stage, clipped to ``total_steps`` (``max_steps`` may cut it short)."""
    out = []
    start = 0
    for i, stage in enumerate(stages):
        steps = stage.steps if i < len(stages) - 1 else max(total_steps - start, 0)
        steps = min(steps, max(total_steps - start, 0))
        out.append((stage.name, start, steps))
        start += steps
    return out


def staged_lr_lambda(
    boundaries: Sequence[tuple[str, int, int]], *, warmup_ratio: float, kind: str
) -> Callable[[int], float]:
    """The multiplier of the peak learning rate at each step: warm-up then decay, restarted per stage."""

    def phase(step: int, length: int) -> float:
        warmup = math.ceil(warmup_ratio * length)
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if kind == "constant":
            return 1.0
        progress = (step - warmup) / max(1, length - warmup)
        if kind == "linear":
            return max(0.0, 1.0 - progress)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0))))

    def lr_lambda(step: int) -> float:
        for _, start, length in reversed(boundaries):
            if length and step >= start:
                return phase(step - start, length)
        return phase(step, max(1, boundaries[0][2] if boundaries else 1))

    return lr_lambda


__all__ = ["Stage", "StagedDataset", "build_stream", "epoch_order", "stage_boundaries", "staged_lr_lambda"]
