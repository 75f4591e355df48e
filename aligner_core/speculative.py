"""Answer-anchored speculative decoding for batches: draft from the answer being corrected.

An Aligner mostly copies the answer it corrects. Each step, every row proposes the next tokens of
the answer that follow the n-gram it has just generated (prompt lookup anchored to the answer, as in
LLMA "Inference with Reference"), and one forward pass verifies all proposals of all rows. Under
greedy decoding a row keeps the longest proposed prefix that matches the model's own argmax plus the
model's next token, so the output is exactly what plain greedy decoding produces, in fewer passes.

Rows accept different numbers of tokens, so the KV cache becomes ragged: rejected proposals stay in
the cache but are masked out of every later step (positions come from the count of valid tokens),
columns that no row needs are cropped, and finished rows leave the batch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch


class AnswerDrafter:
    """Proposes the continuation of ``reference`` after the longest matching n-gram of the output."""

    def __init__(self, reference: Sequence[int], max_ngram: int = 3):
        self.reference = list(reference)
        self.max_ngram = max_ngram
        self.index: dict[tuple[int, ...], list[int]] = {}
        for n in range(1, max_ngram + 1):
            for end in range(n, len(self.reference) + 1):
                self.index.setdefault(tuple(self.reference[end - n:end]), []).append(end)
        self.cursor = 0  # where the last accepted copy ended: prefer matches at or after it

    def propose(self, output: Sequence[int], k: int) -> list[int]:
        if k <= 0 or not self.reference:
            return []
        if not output:
            return self.reference[:k]
        for n in range(min(self.max_ngram, len(output)), 0, -1):
            ends = self.index.get(tuple(output[-n:]))
            if not ends:
                continue
            end = next((e for e in ends if e >= self.cursor), ends[0])
            draft = self.reference[end:end + k]
            if draft:
                return draft
        return []

    def accepted(self, output: Sequence[int]) -> None:
        """Move the cursor to just after the match of the output's last tokens."""
        for n in range(min(self.max_ngram, len(output)), 0, -1):
            ends = self.index.get(tuple(output[-n:]))
            if ends:
                self.cursor = next((e for e in ends if e >= self.cursor), ends[0])
                return


@dataclass
class RowResult:
    tokens: list[int] = field(default_factory=list)
    proposed: int = 0
    accepted: int = 0
    steps: int = 0


Sink = Callable[[int, list[int]], None]


@torch.inference_mode()
def drafted_greedy(
    model: Any,
    prompts: Sequence[Sequence[int]],
    references: Sequence[Sequence[int]],
    max_new_tokens: Sequence[int],
    *,
    eos_token_ids: Sequence[int],
    pad_token_id: int,
    num_draft_tokens: int = 8,
    max_verify_tokens: int | None = None,
    stop_check: Callable[[int, list[int]], bool] | None = None,
    sink: Sink | None = None,
) -> list[RowResult]:
    """Greedy decoding of a batch with answer-anchored drafts; identical tokens to plain greedy.

    ``stop_check(row, tokens)`` may end a row early (stop strings); ``sink(row, new_tokens)``
    receives tokens as they are accepted (streaming). ``num_draft_tokens=0`` is plain decoding.
    ``max_verify_tokens`` caps the tokens one decoding step feeds the model (rows x block width):
    verifying drafts is nearly free while a step is memory-bound (small batches, GPUs) and costs
    real compute once it is not (large batches on a CPU), where the cap turns drafting off.
    """
    from transformers import DynamicCache

    device = next(model.parameters()).device
    n = len(prompts)
    results = [RowResult() for _ in range(n)]
    drafters = [AnswerDrafter(r) for r in references]
    eos = set(int(e) for e in eos_token_ids)
    active = list(range(n))  # batch row -> request index
    pending: list[int | None] = [None] * n
    valid = [0] * n  # valid tokens in the cache, per request
    cache = DynamicCache()
    mask = torch.zeros((n, 0), dtype=torch.long, device=device)
    width = max(len(p) for p in prompts)
    first = True
    cache_kw = _cache_keyword(model)
    budgets = [max(1, num_draft_tokens)] * n

    while active:
        drafts: list[list[int]] = []
        width_cap = num_draft_tokens
        if max_verify_tokens is not None:
            width_cap = min(width_cap * 2, max(0, max_verify_tokens // len(active) - 1))
        for i in active:
            room = max_new_tokens[i] - len(results[i].tokens) - 1
            k = min(budgets[i], room, width_cap) if num_draft_tokens > 0 else 0
            drafts.append(drafters[i].propose(results[i].tokens, k) if k > 0 else [])
        if first:
            blocks = [[pad_token_id] * (width - len(prompts[i])) + list(prompts[i]) + d for i, d in zip(active, drafts)]
            real = [[0] * (width - len(prompts[i])) + [1] * (len(prompts[i]) + len(d)) for i, d in zip(active, drafts)]
            base = [width - 1] * len(active)
        else:
            blocks = [[pending[i]] + d for i, d in zip(active, drafts)]  # type: ignore[list-item]
            real = [[1] * len(b) for b in blocks]
            base = [0] * len(active)
        span = max(len(b) for b in blocks)
        ids = torch.full((len(active), span), pad_token_id, dtype=torch.long)
        step_mask = torch.zeros((len(active), span), dtype=torch.long)
        positions = torch.zeros((len(active), span), dtype=torch.long)
        for row, (block, r) in enumerate(zip(blocks, real)):
            ids[row, : len(block)] = torch.tensor(block)
            step_mask[row, : len(r)] = torch.tensor(r)
            start = valid[active[row]]
            positions[row] = torch.clamp(start + torch.cumsum(step_mask[row], 0) - 1, min=0)
        ids, step_mask, positions = ids.to(device), step_mask.to(device), positions.to(device)
        full_mask = torch.cat([mask, step_mask], dim=1)
        keep = span - min(base)
        out = model(
            input_ids=ids,
            attention_mask=full_mask,
            position_ids=positions,
            use_cache=True,
            logits_to_keep=keep,
            **{cache_kw: cache},
        )
        preds = out.logits[:, -keep:].argmax(-1).tolist()  # [rows, keep]
        offset = span - keep
        used = 0
        finished: list[int] = []
        for row, i in enumerate(active):
            d, b = drafts[row], base[row]
            p = preds[row]
            a = 0
            while a < len(d) and d[a] == p[b - offset + a]:
                a += 1
            new = d[:a] + [p[b - offset + a]]
            res = results[i]
            res.proposed += len(d)
            res.accepted += a
            res.steps += 1
            if d:  # adapt: grow the draft after a full hit, shrink after a miss
                budgets[i] = min(num_draft_tokens * 2, budgets[i] + 2) if a == len(d) else max(1, budgets[i] - 1)
            # Cache validity: the block up to the last accepted draft; the rest is masked from now on.
            last = b + 1 + a
            full_mask[row, mask.shape[1] + last:] = 0
            valid[i] += (last if not first else int(step_mask[row, :last].sum()))
            used = max(used, last)
            done = False
            for t_idx, t in enumerate(new):
                if t in eos:
                    new, done = new[: t_idx + 1], True
                    break
            room = max_new_tokens[i] - len(res.tokens)
            if len(new) >= room:
                new, done = new[:room], True
            res.tokens.extend(new)
            drafters[i].accepted(res.tokens)
            if sink is not None:
                sink(i, new)
            if not done and stop_check is not None and stop_check(i, res.tokens):
                done = True
            pending[i] = new[-1]
            if done:
                finished.append(row)
        first = False
        mask = full_mask
        # Crop columns no row needs any more (the common rejected tail).
        surplus = span - used
        if surplus > 0:
            cache.crop(-surplus)  # negative: drop that many trailing columns
            mask = mask[:, : mask.shape[1] - surplus]
        if finished:
            keep_rows = [r for r in range(len(active)) if r not in set(finished)]
            active = [active[r] for r in keep_rows]
            if not active:
                break
            index = torch.tensor(keep_rows, device=device)
            cache.batch_select_indices(index)
            mask = mask[index]
    return results


def _cache_keyword(model: Any) -> str:
    """transformers >= 5.2x names the cache argument ``cache``; older releases ``past_key_values``."""
    import inspect

    forward = getattr(model, "get_base_model", lambda: model)().forward
    return "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"
