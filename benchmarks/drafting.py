"""Does drafting ever lose? Default settings against ``speculative=False``, side by side in one run.

    python -m benchmarks.drafting [--model M] [--max-new-tokens 64] [--device cpu|cuda] [--rounds 1] [--json]

Workloads: the copy-edit set (benchmarks/data/copyedit8.jsonl: the output copies most of the answer, where
drafting pays) and its worst case, the same questions with the answers rotated so that no answer belongs to
its question (the correction shares little with the answer, so drafts are mostly rejected). Each at batch 1
(a loop of ``correct``) and as one ``correct_batch``. Both settings are greedy, so they must give identical
texts; the ratio is default time over ``speculative=False`` time inverted (>1: drafting is faster). The two run
in alternating order from one measurement to the next (the first of each pair used to be ``speculative=False``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
DATA = Path(__file__).parent / "data"


def load(name: str) -> list[tuple[str, str]]:
    rows = [json.loads(line) for line in (DATA / name).read_text().splitlines() if line.strip()]
    return [(r["question"], r["answer"]) for r in rows]


def run(aligner: Any, pairs: list[tuple[str, str]], batch: bool, **options: Any) -> tuple[float, list[Any]]:
    start = time.perf_counter()
    if batch:
        out = aligner.correct_batch(pairs, **options)
    else:
        out = [aligner.correct(q, a, **options) for q, a in pairs]
    return time.perf_counter() - start, out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.drafting", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--model", default="HuggingFaceTB/SmolLM2-135M-Instruct")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--device", default=None)
    parser.add_argument(
        "--rounds", type=int, default=1, help="repetitions (alternating order; fastest counts)"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)

    import torch

    from aligner_core import Aligner

    aligner = Aligner.from_pretrained(
        args.model, engine="transformers", device=args.device, max_new_tokens=args.max_new_tokens
    )
    copy = load("copyedit8.jsonl")
    rotated = [(q, copy[(i + 3) % len(copy)][1]) for i, (q, _) in enumerate(copy)]
    aligner.correct(*copy[0], max_new_tokens=4)  # warm-up
    rows = []
    block = 0
    for name, pairs in (("copy-edit", copy), ("unrelated answers (worst case)", rotated)):
        for batch in (False, True):
            # The order of the two methods alternates from block to block and round to round, so neither always
            # runs first (cold caches) or second (a machine warming up, or other jobs starting); the fastest of
            # the rounds counts for each method.
            plain_times, draft_times = [], []
            for r in range(args.rounds):
                if (block + r) % 2 == 0:
                    plain_s, plain = run(aligner, pairs, batch, speculative=False)
                    draft_s, drafted = run(aligner, pairs, batch)
                else:
                    draft_s, drafted = run(aligner, pairs, batch)
                    plain_s, plain = run(aligner, pairs, batch, speculative=False)
                plain_times.append(plain_s)
                draft_times.append(draft_s)
            plain_s, draft_s = min(plain_times), min(draft_times)
            order = "speculative=False first" if block % 2 == 0 else "drafting first"
            block += 1
            tokens = sum(c.completion_tokens for c in drafted)
            proposed = sum(c.metadata.get("draft_tokens", 0) for c in drafted)
            accepted = sum(c.metadata.get("accepted_draft_tokens", 0) for c in drafted)
            rows.append(
                {
                    "workload": name,
                    "shape": f"one correct_batch of {len(pairs)}" if batch else "batch 1 (loop of correct)",
                    "first_round_order": order,
                    "plain_s": round(plain_s, 2),
                    "drafting_s": round(draft_s, 2),
                    "speedup": round(plain_s / draft_s, 3),
                    "acceptance": round(accepted / proposed, 3) if proposed else None,
                    "tokens": tokens,
                    "identical": sum(a.text == b.text for a, b in zip(plain, drafted)),
                    "pairs": len(pairs),
                }
            )
    result = {
        "model": args.model,
        "device": str(aligner.engine.device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "max_new_tokens": args.max_new_tokens,
        "rows": rows,
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(
        f"{args.model} on {result['device']} ({result['threads']} threads), at most {args.max_new_tokens} new tokens"
    )
    print(
        f"{'workload':32} {'shape':28} {'plain s':>8} {'draft s':>8} {'speed-up':>9} {'accept':>7} identical"
    )
    for r in rows:
        accept = "" if r["acceptance"] is None else f"{r['acceptance']:.2f}"
        print(
            f"{r['workload']:32} {r['shape']:28} {r['plain_s']:8.2f} {r['drafting_s']:8.2f} {r['speedup']:8.2f}x "
            f"{accept:>7} {r['identical']}/{r['pairs']}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
