"""Pack requests into batches under a token budget instead of a fixed batch size.

A padded batch costs ``size x (longest prompt + new tokens)`` slots of KV cache and compute, so
requests are sorted by length (similar lengths share a batch and waste little padding) and packed
greedily while that cost stays under ``max_batch_tokens``. The longest batch comes first, so an
out-of-memory error shows at once rather than at the end of a long run.
"""

from __future__ import annotations

from collections.abc import Sequence


def plan_batches(
    prompt_lengths: Sequence[int],
    reserves: Sequence[int],
    max_batch_tokens: int,
    *,
    max_batch_size: int | None = None,
) -> list[list[int]]:
    """Group request indices into batches whose padded cost fits ``max_batch_tokens``.

    A single request larger than the budget still gets a batch of its own.
    """
    if len(prompt_lengths) != len(reserves):
        raise ValueError(f"got {len(prompt_lengths)} prompt lengths but {len(reserves)} reserves")
    if max_batch_tokens < 1:
        raise ValueError(f"max_batch_tokens must be a positive integer, got {max_batch_tokens}")
    if max_batch_size is not None and max_batch_size < 1:
        raise ValueError(f"max_batch_size must be a positive integer, got {max_batch_size}")
    order = sorted(range(len(prompt_lengths)), key=lambda i: (-(prompt_lengths[i] + reserves[i]), i))
    batches: list[list[int]] = []
    current: list[int] = []
    width = new = 0
    for i in order:
        w, n = max(width, prompt_lengths[i]), max(new, reserves[i])
        full = max_batch_size is not None and len(current) >= max_batch_size
        if current and (full or (len(current) + 1) * (w + n) > max_batch_tokens):
            batches.append(current)
            current, w, n = [], prompt_lengths[i], reserves[i]
        current.append(i)
        width, new = w, n
    if current:
        batches.append(current)
    return batches


def batch_cost(prompt_lengths: Sequence[int], reserves: Sequence[int]) -> int:
    """Padded cost of one batch, as the planner counts it."""
    if not prompt_lengths:
        return 0
    return len(prompt_lengths) * (max(prompt_lengths) + max(reserves))
