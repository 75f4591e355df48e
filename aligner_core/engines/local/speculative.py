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

from ..drafts import AnswerDrafter


@dataclass
class RowResult:
    tokens: list[int] = field(default_factory=list)
    proposed: int = 0
    accepted: int = 0
    steps: int = 0


Sink = Callable[[int, list[int]], None]

#: Shared prompt prefixes shorter than this are not worth a separate forward pass.
MIN_SHARED_PREFIX = 8
#: Most prompt tokens (rows x padded width) one prefill forward pass takes.
PREFILL_TOKENS = 4096


@dataclass
class Prefilled:
    """The batch after its prompts went through the model: a ragged cache and each row's first token."""

    cache: Any
    mask: torch.Tensor
    order: list[int]  # batch row -> request index
    valid: list[int]  # valid cache tokens per batch row
    first: list[int]  # greedy first token per batch row


def common_prefix(prompts: Sequence[Sequence[int]]) -> int:
    """Length of the token prefix all prompts share, leaving each at least one token of its own."""
    limit = min(len(p) for p in prompts) - 1
    n = 0
    while n < limit and all(p[n] == prompts[0][n] for p in prompts):
        n += 1
    return n


def group_by_length(
    lengths: Sequence[int], budget: int = PREFILL_TOKENS, waste: float = 0.125
) -> list[list[int]]:
    """Rows of similar length, so a padded prefill wastes at most ``waste`` of its tokens."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    groups: list[list[int]] = []
    for i in order:
        if groups:
            g = groups[-1]
            width = lengths[g[0]]
            total = sum(lengths[j] for j in g) + lengths[i]
            padded = width * (len(g) + 1)
            if padded <= budget and padded - total <= waste * total:
                g.append(i)
                continue
        groups.append([i])
    return groups


def _layers(cache: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    if hasattr(cache, "layers"):
        return [(layer.keys, layer.values) for layer in cache.layers]
    return list(zip(cache.key_cache, cache.value_cache))  # transformers < 4.56


def _mergeable(model: Any) -> bool:
    """Whether the model keeps a plain key/value cache whose rows can be padded and concatenated."""
    config = getattr(model, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    if getattr(text, "sliding_window", None) or any(
        "sliding" in str(t) for t in getattr(text, "layer_types", None) or []
    ):
        return False
    return getattr(text, "model_type", "") not in {
        "mamba",
        "mamba2",
        "jamba",
        "falcon_h1",
        "zamba",
        "zamba2",
        "lfm2",
    }


def prefill(model: Any, prompts: Sequence[Sequence[int]], *, pad_token_id: int, cache_kw: str) -> Prefilled:
    """Run the prompts: a prefix they all share once, then groups of similar length, merged into one cache.

    Padding a batch of prompts to the longest one wastes compute on every pad token, and on a CPU the
    prompts dominate the cost of short corrections; grouping keeps the waste small while the decode
    steps still run the whole batch together.
    """
    from transformers import DynamicCache

    device = next(model.parameters()).device
    mergeable = _mergeable(model) and len(prompts) > 1
    shared = common_prefix(prompts) if mergeable else 0
    if shared < MIN_SHARED_PREFIX:
        shared = 0
    prefix_kv: list[tuple[torch.Tensor, torch.Tensor]] = []
    if shared:
        ids = torch.tensor([list(prompts[0][:shared])], device=device)
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1, **{cache_kw: DynamicCache()})
        prefix_kv = _layers(out.past_key_values)
    suffix = [len(p) - shared for p in prompts]
    groups = group_by_length(suffix) if mergeable else [list(range(len(prompts)))]
    parts = []
    for g in groups:
        width = max(suffix[i] for i in g)
        ids = torch.full((len(g), width), pad_token_id, dtype=torch.long)
        own = torch.zeros((len(g), width), dtype=torch.long)
        for row, i in enumerate(g):
            ids[row, width - suffix[i] :] = torch.tensor(list(prompts[i][shared:]))
            own[row, width - suffix[i] :] = 1
        mask = torch.cat([torch.ones((len(g), shared), dtype=torch.long), own], dim=1).to(device)
        positions = torch.clamp(shared + torch.cumsum(own, 1) - 1, min=0).to(device)
        cache = (
            DynamicCache(
                ddp_cache_data=[
                    (k.expand(len(g), -1, -1, -1), v.expand(len(g), -1, -1, -1)) for k, v in prefix_kv
                ]
            )
            if shared
            else DynamicCache()
        )
        out = model(
            input_ids=ids.to(device),
            attention_mask=mask,
            position_ids=positions,
            use_cache=True,
            logits_to_keep=1,
            **{cache_kw: cache},
        )
        parts.append((g, out.past_key_values, mask, out.logits[:, -1].argmax(-1).tolist()))
    order = [i for g, *_ in parts for i in g]
    first = [t for *_, preds in parts for t in preds]
    if len(parts) == 1:
        _, cache, mask, _ = parts[0]
    else:
        total = max(m.shape[1] for _, _, m, _ in parts)

        def pad(t: torch.Tensor, dim: int) -> torch.Tensor:
            return torch.nn.functional.pad(t, (0, 0) * (t.dim() - 1 - dim) + (0, total - t.shape[dim]))

        merged = []
        for layer in range(len(_layers(parts[0][1]))):
            keys = torch.cat([pad(_layers(c)[layer][0], 2) for _, c, _, _ in parts])
            values = torch.cat([pad(_layers(c)[layer][1], 2) for _, c, _, _ in parts])
            merged.append((keys, values))
        cache = DynamicCache(ddp_cache_data=merged)
        mask = torch.cat([pad(m, 1) for _, _, m, _ in parts])
    return Prefilled(cache=cache, mask=mask, order=order, valid=[len(prompts[i]) for i in order], first=first)


#: A row checks its drafts every PAUSE_AFTER proposed tokens; when almost none were accepted (below
#: MIN_ACCEPTANCE) it drafts nothing for PAUSE_STEPS steps (plain decoding for that row), then probes again
#: with one token. Kept low on purpose: on a 2-core CPU, drafts accepted at 26% still paid (benchmarks/drafting.py).
PAUSE_AFTER = 24
MIN_ACCEPTANCE = 0.05
PAUSE_STEPS = 16


class DraftingPolicy:
    """Whether a batch goes through the drafting loop or plain ``generate``, from what was measured.

    On a CPU the loop wins even without accepted drafts (ragged prefill, finished rows leave, the verify
    cap turns drafting off for large batches), so it always runs there. On an accelerator a step of the
    loop costs more than one of ``generate`` at large batches, which only accepted drafts pay back: once
    the acceptance measured over recent batches (an exponential average) is below ``min_acceptance``, a
    batch of ``min_rows`` or more takes the plain path, and every ``probe_every``-th such batch drafts
    again to keep the measurement fresh. A batch with more rows than half of ``max_verify_tokens`` could not
    verify a single draft token per row (the loop's width cap), so on an accelerator it always takes ``generate``.
    """

    def __init__(
        self,
        device_type: str,
        *,
        min_acceptance: float = 0.35,
        min_rows: int = 8,
        probe_every: int = 8,
        smoothing: float = 0.3,
        max_verify_tokens: int | None = None,
    ) -> None:
        self.device_type = device_type
        self.max_verify_tokens = max_verify_tokens
        self.min_acceptance = min_acceptance
        self.min_rows = min_rows
        self.probe_every = probe_every
        self.smoothing = smoothing
        self.acceptance: float | None = None
        self._skipped = 0

    def choose(self, rows: int) -> bool:
        """True to run this batch through the drafting loop."""
        if (
            self.device_type != "cpu"
            and self.max_verify_tokens is not None
            and self.max_verify_tokens // max(rows, 1) < 2
        ):
            return (
                False  # too many rows to verify even one draft token each: the loop would only add its cost
            )
        if self.device_type == "cpu" or self.acceptance is None or rows < self.min_rows:
            return True
        if self.acceptance >= self.min_acceptance:
            return True
        self._skipped += 1
        if self._skipped >= self.probe_every:
            self._skipped = 0
            return True
        return False

    def record(self, proposed: int, accepted: int) -> None:
        """Fold a drafted batch's acceptance into the average."""
        if proposed <= 0:
            return
        rate = accepted / proposed
        self.acceptance = (
            rate
            if self.acceptance is None
            else (1 - self.smoothing) * self.acceptance + self.smoothing * rate
        )


@torch.inference_mode()
def drafted_greedy(  # noqa: C901 -- the hot decode loop stays one function: no call per step
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
    on_step: Callable[[int, int], None] | None = None,
) -> list[RowResult]:
    """Greedy decoding of a batch with answer-anchored drafts; identical tokens to plain greedy.

    ``stop_check(row, tokens)`` may end a row early (stop strings); ``sink(row, new_tokens)``
    receives tokens as they are accepted (streaming); ``on_step(new_tokens, finished_rows)`` is
    called once per step with the batch's totals (progress). ``num_draft_tokens=0`` is plain decoding.
    ``max_verify_tokens`` caps the tokens one decoding step feeds the model (rows x block width):
    verifying drafts is nearly free while a step is memory-bound (small batches, GPUs) and costs
    real compute once it is not (large batches on a CPU), where the cap turns drafting off.
    """
    device = next(model.parameters()).device
    n = len(prompts)
    results = [RowResult() for _ in range(n)]
    drafters = [AnswerDrafter(r) for r in references]
    eos = set(int(e) for e in eos_token_ids)
    cache_kw = _cache_keyword(model)
    budgets = [max(1, num_draft_tokens)] * n
    paused = [0] * n  # steps a row drafts nothing, after its drafts kept missing
    window = [[0, 0] for _ in range(n)]  # proposed, accepted since the row's last check
    pending: list[int] = [0] * n
    valid = [0] * n  # valid tokens in the cache, per request
    step_tokens = [0]  # tokens emitted in the current step (read by on_step)

    def emit(i: int, new: list[int]) -> bool:
        """Append a row's new tokens; True when the row is finished."""
        res = results[i]
        done = False
        for t_idx, t in enumerate(new):
            if t in eos:
                new, done = new[: t_idx + 1], True
                break
        room = max_new_tokens[i] - len(res.tokens)
        if len(new) >= room:
            new, done = new[:room], True
        res.tokens.extend(new)
        step_tokens[0] += len(new)
        drafters[i].accepted(res.tokens)
        if sink is not None:
            sink(i, new)
        if not done and stop_check is not None and stop_check(i, res.tokens):
            done = True
        pending[i] = new[-1]
        return done

    state = prefill(model, prompts, pad_token_id=pad_token_id, cache_kw=cache_kw)
    cache, mask, active = state.cache, state.mask, state.order
    finished = []
    for row, (i, token, count) in enumerate(zip(state.order, state.first, state.valid)):
        valid[i] = count
        results[i].steps += 1
        if emit(i, [token]):
            finished.append(row)
    if on_step is not None:
        on_step(step_tokens[0], len(finished))

    while True:
        if finished:
            keep_rows = [r for r in range(len(active)) if r not in set(finished)]
            active = [active[r] for r in keep_rows]
            if not active:
                break
            index = torch.tensor(keep_rows, device=device)
            cache.batch_select_indices(index)
            mask = mask[index]
        drafts: list[list[int]] = []
        width_cap = num_draft_tokens
        if max_verify_tokens is not None:
            width_cap = min(width_cap * 2, max(0, max_verify_tokens // len(active) - 1))
        for i in active:
            room = max_new_tokens[i] - len(results[i].tokens) - 1
            k = min(budgets[i], room, width_cap) if num_draft_tokens > 0 else 0
            if paused[i] > 0:
                paused[i] -= 1
                k = 0
            drafts.append(drafters[i].propose(results[i].tokens, k) if k > 0 else [])
        blocks = [[pending[i], *d] for i, d in zip(active, drafts)]
        span = max(len(b) for b in blocks)
        ids = torch.full((len(active), span), pad_token_id, dtype=torch.long)
        step_mask = torch.zeros((len(active), span), dtype=torch.long)
        for row, block in enumerate(blocks):
            ids[row, : len(block)] = torch.tensor(block)
            step_mask[row, : len(block)] = 1
        starts = torch.tensor([valid[i] for i in active]).unsqueeze(1)
        positions = starts + torch.arange(span).unsqueeze(0)
        full_mask = torch.cat([mask, step_mask.to(device)], dim=1)
        out = model(
            input_ids=ids.to(device),
            attention_mask=full_mask,
            position_ids=positions.to(device),
            use_cache=True,
            **{cache_kw: cache},
        )
        preds = out.logits.argmax(-1).tolist()  # [rows, span]
        used = 0
        finished = []
        step_tokens[0] = 0
        for row, i in enumerate(active):
            d, p = drafts[row], preds[row]
            a = 0
            while a < len(d) and d[a] == p[a]:
                a += 1
            res = results[i]
            res.proposed += len(d)
            res.accepted += a
            res.steps += 1
            if d:  # adapt: grow the draft after a full hit, shrink after a miss
                budgets[i] = (
                    min(num_draft_tokens * 2, budgets[i] + 2) if a == len(d) else max(1, budgets[i] - 1)
                )
                window[i][0] += len(d)
                window[i][1] += a
                if (
                    window[i][0] >= PAUSE_AFTER
                ):  # drafts that keep missing cost verify width: stop, probe later
                    if window[i][1] < MIN_ACCEPTANCE * window[i][0]:
                        paused[i], budgets[i] = PAUSE_STEPS, 1
                    window[i] = [0, 0]
            # Cache validity: the pending token and the accepted drafts; the rest is masked from now on.
            last = 1 + a
            full_mask[row, mask.shape[1] + last :] = 0
            valid[i] += last
            used = max(used, last)
            if emit(i, d[:a] + [p[a]]):
                finished.append(row)
        if on_step is not None:
            on_step(step_tokens[0], len(finished))
        mask = full_mask
        surplus = span - used  # columns no row needs any more (the common rejected tail)
        if surplus > 0:
            cache.crop(-surplus)  # negative: drop that many trailing columns
            mask = mask[:, : mask.shape[1] - surplus]
    return results


def _cache_keyword(model: Any) -> str:
    """transformers >= 5.2x names the cache argument ``cache``; older releases ``past_key_values``."""
    import inspect

    forward = getattr(model, "get_base_model", lambda: model)().forward
    return "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"
