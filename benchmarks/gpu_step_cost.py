"""Where a decoding step's time goes on a GPU: the library's loop against transformers ``generate``.

    python -m benchmarks.gpu_step_cost --tokenizer DIR [--shape 1b] [--rows 1,16,64,256] [--steps 64] [--json PATH]

Both decode the same left-padded batch of ``aligner-v1`` prompts greedily for exactly ``--steps`` tokens:
``generate`` (what a user writes by hand) and ``speculative.drafted_greedy`` with ``num_draft_tokens=0``
(the loop's fixed cost per step, with no draft to pay it back) and with drafts (random weights: drafts
miss). Reports milliseconds per step and the loop's ratio, then a ``torch.profiler`` table of the loop's
steps at the largest row count (top operators by self CPU and self CUDA time), so the per-step overhead can
be attributed. Random-weight Llama models from ``LlamaConfig`` (see ``gpu_engines.py``); ``--shape tiny``
runs on a CPU.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from benchmarks.gpu_engines import build, pairs, sync


def step_ms(fn: Any, steps: int, repeat: int = 2) -> float:
    best = float("inf")
    for _ in range(repeat):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - start)
    return 1000 * best / steps


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tokenizer", required=True, help="Directory with the SmolLM2 tokenizer files.")
    parser.add_argument("--shape", default="1b", help="tiny, 1b or 8b.")
    parser.add_argument("--rows", default="1,16,64,256", help="Comma-separated batch sizes.")
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--profile", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)

    import torch
    from transformers import AutoTokenizer

    from aligner_core.engines.local.speculative import drafted_greedy
    from aligner_core.templates import get_template

    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    model = build(args.shape, tokenizer, device)
    template = get_template("aligner-v1")
    rows_list = [int(r) for r in args.rows.split(",")]
    work = pairs(max(rows_list))
    prompts = [tokenizer(template.format(question=q, answer=a))["input_ids"] for q, a in work]
    answers = [tokenizer(a, add_special_tokens=False)["input_ids"] for _, a in work]
    steps = args.steps
    report: dict[str, Any] = {
        "device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu",
        "shape": args.shape,
        "steps": steps,
        "rows": [],
    }

    def generate(n: int) -> None:
        enc = tokenizer.pad({"input_ids": prompts[:n]}, return_tensors="pt").to(device)
        with torch.inference_mode():
            model.generate(
                **enc,
                max_new_tokens=steps,
                min_new_tokens=steps,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
            )

    def loop(n: int, draft: int) -> None:
        drafted_greedy(
            model,
            prompts[:n],
            answers[:n],
            [steps] * n,
            eos_token_ids=[],
            pad_token_id=tokenizer.pad_token_id,
            num_draft_tokens=draft,
            max_verify_tokens=256,
        )

    generate(2), loop(2, 0)  # warm-up
    print(f"{args.shape} on {report['device']}, {steps} steps, ms per step", flush=True)
    for n in rows_list:
        g = step_ms(lambda n=n: generate(n), steps)
        l0, l8 = step_ms(lambda n=n: loop(n, 0), steps), step_ms(lambda n=n: loop(n, 8), steps)
        row = {
            "rows": n,
            "generate_ms": round(g, 2),
            "loop_no_drafts_ms": round(l0, 2),
            "loop_drafts_ms": round(l8, 2),
            "loop_over_generate": round(l0 / g, 2),
        }
        report["rows"].append(row)
        print(
            f"  rows {n:>4}: generate {g:7.2f}  loop {l0:7.2f} ({l0 / g:.2f}x)  loop+drafts {l8:7.2f}",
            flush=True,
        )
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        n = max(rows_list)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
        for label, fn in (("loop", lambda: loop(n, 0)), ("generate", lambda: generate(n))):
            with profile(activities=activities) as prof:
                fn()
                sync()
            for key in ("self_cpu_time_total",) + (("self_cuda_time_total",) if device == "cuda" else ()):
                table = prof.key_averages().table(sort_by=key, row_limit=14, max_name_column_width=48)
                print(f"\n{label}, rows {n}, sorted by {key}\n{table}", flush=True)
                report[f"profile_{label}_{key}"] = table
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
