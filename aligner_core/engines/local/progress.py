"""Progress from inside a batch of the transformers engine: tokens and finished rows reported while ``generate``
decodes (a streamer that counts each row's tokens) and settled exactly once the batch is done."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from ...progress import Progress
from ..base import GenerationOutput


class BatchReport:
    """One batch's share of a ``Progress``: reported live, taken back if the batch fails, settled at the end."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.tokens = 0
        self.rows = 0

    def step(self, tokens: int, rows: int) -> None:
        if tokens or rows:
            self.tokens += tokens
            self.rows += rows
            self.progress.update(tokens=tokens, rows=rows)

    def retract(self) -> None:
        self.step(-self.tokens, -self.rows)

    def settle(self, outputs: Sequence[GenerationOutput]) -> None:
        """Make the totals exact: rows the loop could not see end (stop strings) and the final token counts."""
        self.step(sum(o.completion_tokens for o in outputs) - self.tokens, len(outputs) - self.rows)


def counting_streamer(
    limits: Sequence[int], eos_token_ids: Sequence[int], on_step: Callable[[int, int], None]
) -> Any:
    """A streamer for ``model.generate`` that counts each step's tokens and the rows that just ended.

    ``generate`` already copies each step's tokens to the host for a streamer, at the point where it
    waits for the step anyway; counting them costs a few list operations per step. A row ends at EOS
    or its own ``max_new_tokens``, as ``TransformersEngine.finish`` cuts it.
    """
    from transformers.generation.streamers import BaseStreamer

    eos = set(eos_token_ids)

    class _Counter(BaseStreamer):
        def __init__(self) -> None:
            self.prompt_seen = False
            self.counts = [0] * len(limits)
            self.open = [limit > 0 for limit in limits]

        def put(self, value: torch.Tensor) -> None:
            if not self.prompt_seen:  # generate() first hands over the prompt
                self.prompt_seen = True
                return
            tokens = ended = 0
            for row, token in enumerate(value.reshape(-1).tolist()):
                if not self.open[row]:
                    continue
                tokens += 1
                self.counts[row] += 1
                if token in eos or self.counts[row] >= limits[row]:
                    self.open[row] = False
                    ended += 1
            on_step(tokens, ended)

        def end(self) -> None:
            pass

    return _Counter()
