"""correct_batch versus a loop of correct, side by side in one run, on the packaged SmolLM2-135M-Instruct.

python -m benchmarks.batch_vs_loop [--pairs 16] [--max-new-tokens 48] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--model", default="HuggingFaceTB/SmolLM2-135M-Instruct")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = parser.parse_args(argv)

    from aligner_core import Aligner
    from aligner_core.cli.demo import sample_pairs

    aligner = Aligner.from_pretrained(args.model, engine="transformers", max_new_tokens=args.max_new_tokens)
    base = sample_pairs()
    pairs = [(q, a) for i in range(args.pairs) for q, a in [base[i % len(base)]]]
    pairs = [(q if i < len(base) else f"{q} (variant {i})", a) for i, (q, a) in enumerate(pairs)]
    aligner.correct(*pairs[0], max_new_tokens=4)  # warm-up

    start = time.perf_counter()
    loop = [aligner.correct(q, a) for q, a in pairs]
    t_loop = time.perf_counter() - start
    start = time.perf_counter()
    batch = aligner.correct_batch(pairs)
    t_batch = time.perf_counter() - start

    same = sum(a.text == b.text for a, b in zip(loop, batch))
    tokens_loop = sum(c.completion_tokens for c in loop)
    tokens_batch = sum(c.completion_tokens for c in batch)
    result = {
        "pairs": len(pairs),
        "max_new_tokens": args.max_new_tokens,
        "loop_s": round(t_loop, 2),
        "batch_s": round(t_batch, 2),
        "loop_tok_s": round(tokens_loop / t_loop, 1),
        "batch_tok_s": round(tokens_batch / t_batch, 1),
        "speedup": round(t_loop / t_batch, 2),
        "identical_texts": f"{same}/{len(pairs)}",
        "threads": __import__("torch").get_num_threads(),
    }
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{'method':<26}{'seconds':>10}{'s/pair':>10}{'new tok/s':>12}")
        print(
            f"{'loop of correct()':<26}{t_loop:>10.2f}{t_loop / len(pairs):>10.2f}{result['loop_tok_s']:>12}"
        )
        print(
            f"{'correct_batch()':<26}{t_batch:>10.2f}{t_batch / len(pairs):>10.2f}{result['batch_tok_s']:>12}"
        )
        print(f"speed-up: {result['speedup']}x   identical texts: {result['identical_texts']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
