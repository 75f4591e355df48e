"""The transformers pieces: a ``Trainer`` that reads the staged stream in order with a per-stage
schedule, and callbacks for the metrics JSONL and the stage boundary.

This module imports torch and transformers at the top: ``trainer.py`` imports it only inside
``train_aligner``.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import SequentialSampler
from transformers import Trainer, TrainerCallback

from .stages import Stage, stage_boundaries, staged_lr_lambda

logger = logging.getLogger("aligner_core.training")


class StagedTrainer(Trainer):
    """A ``Trainer`` that never shuffles (the stream is laid out per stage in advance) and restarts the
    warm-up and decay of the learning rate at each stage."""

    def __init__(
        self, *args: Any, stages: Sequence[Stage], warmup_ratio: float, lr_kind: str, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self.stages = list(stages)
        self.warmup_ratio = warmup_ratio
        self.lr_kind = lr_kind

    def _get_train_sampler(self, *args: Any, **kwargs: Any) -> Any:
        return SequentialSampler(self.train_dataset)

    def create_scheduler(
        self, num_training_steps: int, optimizer: torch.optim.Optimizer | None = None
    ) -> Any:
        if self.lr_scheduler is None:
            optimizer = optimizer if optimizer is not None else self.optimizer
            boundaries = stage_boundaries(self.stages, num_training_steps)
            lr_lambda = staged_lr_lambda(boundaries, warmup_ratio=self.warmup_ratio, kind=self.lr_kind)
            self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)
            self._created_lr_scheduler = True
        return self.lr_scheduler


def stage_at(boundaries: Sequence[tuple[str, int, int]], step: int) -> str:
    """Name of the stage that optimizer step ``step`` (0-based) belongs to."""
    name = boundaries[0][0] if boundaries else ""
    for stage, start, length in boundaries:
        if length and step >= start:
            name = stage
    return name


class MetricsJsonl(TrainerCallback):
    """Appends every log (loss, learning rate, eval loss, runtime) as one JSON line, with its stage."""

    def __init__(self, path: Path, stages: Sequence[Stage]) -> None:
        self.path = Path(path)
        self.stages = list(stages)
        self.boundaries: list[tuple[str, int, int]] = []

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.boundaries = stage_boundaries(self.stages, state.max_steps)

    def on_log(
        self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any
    ) -> None:
        if not state.is_world_process_zero or not logs:
            return
        record = {
            "step": state.global_step,
            "epoch": state.epoch,
            "stage": stage_at(self.boundaries, max(state.global_step - 1, 0)),
            **logs,
            "time": time.time(),
        }
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, default=float) + "\n")


class StageBoundary(TrainerCallback):
    """At the end of each stage but the last: checkpoint, evaluate, and hand the stage to ``on_stage_end``."""

    def __init__(
        self,
        stages: Sequence[Stage],
        *,
        evaluate: bool,
        on_stage_end: Callable[[str, int], None] | None = None,
    ) -> None:
        self.stages = list(stages)
        self.evaluate = evaluate
        self.on_stage_end = on_stage_end
        self.boundaries: list[tuple[str, int, int]] = []

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.boundaries = stage_boundaries(self.stages, state.max_steps)
        plan = ", ".join(f"{name}: steps {start + 1}-{start + n}" for name, start, n in self.boundaries if n)
        logger.info("training %d optimizer steps (%s)", state.max_steps, plan)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        for name, start, length in self.boundaries[:-1]:
            if (
                length and state.global_step == start + length < state.max_steps
            ):  # the last step has its own save
                logger.info("stage %r done at step %d", name, state.global_step)
                control.should_save = True
                control.should_evaluate = control.should_evaluate or self.evaluate
                if self.on_stage_end is not None:
                    self.on_stage_end(name, state.global_step)
        if state.global_step >= state.max_steps and self.evaluate:
            control.should_evaluate = True
        return control


__all__ = ["MetricsJsonl", "StageBoundary", "StagedTrainer", "stage_at"]
