"""What an inspector saves: correct_batch on every pair versus only the pairs the inspector fails, side by side.

    python -m benchmarks.inspector [--pairs 20] [--pass-rate 0.8] [--max-new-tokens 48] [--json] [--output FILE]

The packaged SmolLM2-135M-Instruct corrects N pairs twice in one run: once all of them (``correct_batch``),
once behind a deterministic callable inspector that passes ``--pass-rate`` of them. The gated run goes
through ``Aligner.correct_batch(..., inspector=..., threshold=...)`` when the facade takes an inspector,
else through the same gate by hand (``aligner_core.inspector.correct_batch_gated``: score all, generate
the failing pairs only). Two shapes: one ``correct_batch`` of all pairs, and one ``correct`` per pair (what a
chain serving one request at a time does). Each pair of runs is repeated ``--repeats`` times in alternating
order; the best time of each counts.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import platform
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def spread(n: int, k: int) -> set[int]:
    """``k`` indices spread evenly over ``range(n)``: which pairs fail the inspector."""
    return {int(j * n / k) for j in range(k)} if k else set()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.inspector", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--pairs", type=int, default=20)
    parser.add_argument("--pass-rate", type=float, default=0.8, help="fraction of pairs the inspector passes")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--model", default="HuggingFaceTB/SmolLM2-135M-Instruct")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.add_argument("--output", help="also write the JSON result to this file")
    args = parser.parse_args(argv)
    if not 0.0 <= args.pass_rate <= 1.0:
        parser.error(f"--pass-rate must be in [0, 1], got {args.pass_rate}")

    import torch

    from aligner_core import Aligner
    from aligner_core.cli.demo import sample_pairs
    from aligner_core.inspector import Inspector, correct_batch_gated, correct_gated

    aligner = Aligner.from_pretrained(args.model, engine="transformers", max_new_tokens=args.max_new_tokens)
    base = sample_pairs()
    pairs = [
        (q if i < len(base) else f"{q} (variant {i})", a)
        for i in range(args.pairs)
        for q, a in [base[i % len(base)]]
    ]
    failing = spread(len(pairs), round(len(pairs) * (1 - args.pass_rate)))
    scores = {pair: (0.1 if i in failing else 0.9) for i, pair in enumerate(pairs)}
    inspector = Inspector(lambda q, a: scores[(q, a)], name="by-index")
    batch_facade = "inspector" in inspect.signature(Aligner.correct_batch).parameters
    one_facade = "inspector" in inspect.signature(Aligner.correct).parameters

    def gated_batch() -> list:
        if batch_facade:
            return aligner.correct_batch(pairs, inspector=inspector, threshold=0.5)
        return correct_batch_gated(pairs, inspector, 0.5, aligner.correct_batch)

    def gated_loop() -> list:
        if one_facade:
            return [aligner.correct(q, a, inspector=inspector, threshold=0.5) for q, a in pairs]
        return [correct_gated(q, a, inspector, 0.5, lambda q=q, a=a: aligner.correct(q, a)) for q, a in pairs]

    shapes = {
        "one correct_batch": (lambda: aligner.correct_batch(pairs), gated_batch),
        "one correct() per pair": (lambda: [aligner.correct(q, a) for q, a in pairs], gated_loop),
    }
    aligner.correct(*pairs[0], max_new_tokens=4)  # warm-up
    passed = [i for i in range(len(pairs)) if i not in failing]
    rows = []
    for shape, runs in shapes.items():
        times: dict[int, list[float]] = {0: [], 1: []}
        results: dict[int, list] = {}
        for r in range(args.repeats):
            for k in (0, 1) if r % 2 == 0 else (1, 0):  # alternate the order: neither run always goes first
                start = time.perf_counter()
                results[k] = runs[k]()
                times[k].append(time.perf_counter() - start)
        every, behind = results[0], results[1]
        t_all, t_gated = min(times[0]), min(times[1])
        rows.append(
            {
                "shape": shape,
                "all_s": round(t_all, 2),
                "gated_s": round(t_gated, 2),
                "all_s_runs": [round(t, 2) for t in times[0]],
                "gated_s_runs": [round(t, 2) for t in times[1]],
                "speedup": round(t_all / t_gated, 2),
                "time_saved": round(1 - t_gated / t_all, 3),
                "completion_tokens_all": sum(c.completion_tokens for c in every),
                "completion_tokens_gated": sum(c.completion_tokens for c in behind),
                "passed_unchanged": sum(
                    behind[i].text == pairs[i][1] and not behind[i].changed for i in passed
                ),
                "failing_identical_to_all": sum(behind[i].text == every[i].text for i in failing),
            }
        )
    out = {
        "model": args.model,
        "engine": aligner.engine.name,
        "device": str(getattr(getattr(aligner.engine, "model", None), "device", "unknown")),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "pairs": len(pairs),
        "pass_rate": round(len(passed) / len(pairs), 3),
        "generated_pairs": len(failing),
        "max_new_tokens": args.max_new_tokens,
        "repeats": args.repeats,
        "gate": "the Aligner's inspector= argument"
        if batch_facade and one_facade
        else "aligner_core.inspector.correct_batch_gated / correct_gated around the Aligner",
        "rows": rows,
    }
    text = json.dumps(out, indent=2)
    if args.output:
        Path(args.output).write_text(text + "\n", encoding="utf-8")
    if args.json:
        print(json.dumps(out))
    else:
        print(
            f"{len(pairs)} pairs, {out['pass_rate']:.0%} pass the inspector, {len(failing)} generated "
            f"(gate: {out['gate']})"
        )
        print(
            f"{'shape':<26}{'every pair s':>14}{'gated s':>10}{'speed-up':>10}{'new tokens':>14}{'identical':>11}"
        )
        for row in rows:
            tokens = f"{row['completion_tokens_all']}/{row['completion_tokens_gated']}"
            print(
                f"{row['shape']:<26}{row['all_s']:>14.2f}{row['gated_s']:>10.2f}{row['speedup']:>9.2f}x{tokens:>14}"
                f"{row['failing_identical_to_all']:>7}/{len(failing)}"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
