"""Throughput of every way to run the corrector, measured side by side in one run.

    python -m benchmarks.throughput [--max-new-tokens 64] [--json] [--device cpu|cuda]

Loads SmolLM2-135M-Instruct once and, on the same 32 mixed-length pairs (benchmarks/data/pairs32.jsonl,
answers 20-187 words), times: (a) a loop of one-at-a-time ``generate``; (b) padded ``generate`` over
chunks of 8 in input order, as a user would write by hand; (c) transformers ``generate_batch``
(continuous batching); (d) ``correct_batch``; (d') ``correct_batch(speculative=False)``, which runs
transformers ``generate`` over the planned batches; (e) 32 concurrent ``acorrect``. Then, at batch 1, plain
greedy versus answer-anchored drafting on a copy-edit set (benchmarks/data/copyedit8.jsonl) where the
output copies most of the answer. All runs are greedy, so every method generates the same tokens.
"""

from __future__ import annotations

import argparse
import asyncio
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


def count_new(tokens: list[int], eos: set[int], limit: int) -> int:
    for i, t in enumerate(tokens[:limit]):
        if t in eos:
            return i + 1
    return min(len(tokens), limit)


def timed(fn: Any) -> tuple[float, Any]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Corrector throughput, side by side.")
    parser.add_argument("--model", default="HuggingFaceTB/SmolLM2-135M-Instruct")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--copy-max-new-tokens", type=int, default=96)
    parser.add_argument("--device", default=None)
    parser.add_argument(
        "--skip-generate-batch", action="store_true", help="skip (c), transformers generate_batch"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)

    import torch

    from aligner_core import Aligner, ChatTemplate, GenerationParams
    from aligner_core.engines.local import hf_generate

    aligner = Aligner.from_pretrained(
        args.model, engine="transformers", max_new_tokens=args.max_new_tokens, device=args.device
    )
    backend = aligner.engine
    model, tok = backend.model, backend.tokenizer
    eos = set(backend.eos_token_ids)
    m = args.max_new_tokens
    pairs = load("pairs32.jsonl")
    params = GenerationParams(max_new_tokens=m)
    prompts = [list(aligner.prepare(q, a, params).request.prompt_ids) for q, a in pairs]
    config = hf_generate.generation_config(backend, params, m)
    aligner.correct(*pairs[0], max_new_tokens=4)  # warm-up (threads, allocator)

    def one_at_a_time() -> int:
        total = 0
        for p in prompts:
            ids, mask = hf_generate.pad_left(backend, [p])
            out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
            total += count_new(out[0, ids.shape[1] :].tolist(), eos, m)
        return total

    def chunks_of_8() -> int:
        total = 0
        for i in range(0, len(prompts), 8):
            ids, mask = hf_generate.pad_left(backend, prompts[i : i + 8])
            out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
            total += sum(count_new(row, eos, m) for row in out[:, ids.shape[1] :].tolist())
        return total

    def generate_batch() -> int:
        outs = model.generate_batch(prompts, generation_config=config, progress_bar=False)
        return sum(count_new(list(o.generated_tokens), eos, m) for o in outs.values())

    def correct_batch(speculative: bool) -> int:
        return sum(c.completion_tokens for c in aligner.correct_batch(pairs, speculative=speculative))

    def concurrent() -> int:
        async def run() -> list[Any]:
            return await asyncio.gather(*(aligner.acorrect(q, a) for q, a in pairs))

        return sum(c.completion_tokens for c in asyncio.run(run()))

    rows: list[dict[str, Any]] = []

    def record(key: str, label: str, fn: Any) -> None:
        try:
            seconds, tokens = timed(fn)
            rows.append(
                {
                    "key": key,
                    "method": label,
                    "seconds": round(seconds, 2),
                    "tokens": tokens,
                    "tok_s": round(tokens / seconds, 1),
                }
            )
        except Exception as exc:  # a method that cannot run here is reported, not hidden
            rows.append({"key": key, "method": label, "error": f"{type(exc).__name__}: {exc}"[:200]})

    record("a", "(a) loop of one-at-a-time generate", one_at_a_time)
    record("b", "(b) padded generate, chunks of 8", chunks_of_8)
    if not args.skip_generate_batch:
        record("c", "(c) transformers generate_batch", generate_batch)
    record("d", "(d) correct_batch", lambda: correct_batch(True))
    record("d0", "(d') correct_batch, speculative=False", lambda: correct_batch(False))
    record("e", "(e) 32 concurrent acorrect", concurrent)

    # Batch 1: plain greedy versus answer-anchored drafting on a copy-heavy task.
    copy = ChatTemplate(
        name="copyedit",
        instruction="Copy the following text exactly, fixing only spelling mistakes.\n\nText: {answer}\n\n"
        "(Context question, do not answer it: {question})",
    ).bind(tok)
    editor = Aligner(backend, copy, max_new_tokens=args.copy_max_new_tokens)
    copy_pairs = load("copyedit8.jsonl")
    t_plain, plain = timed(lambda: [editor.correct(q, a, speculative=False) for q, a in copy_pairs])
    t_draft, drafted = timed(lambda: [editor.correct(q, a) for q, a in copy_pairs])
    identical = sum(p.text == d.text for p, d in zip(plain, drafted))
    proposed = sum(d.metadata.get("draft_tokens", 0) for d in drafted)
    accepted = sum(d.metadata.get("accepted_draft_tokens", 0) for d in drafted)
    copy_tokens = sum(p.completion_tokens for p in plain)
    similarity = sum(p.similarity for p in plain) / len(plain)

    base = {r["key"]: r for r in rows if "error" not in r}
    for r in rows:
        if "error" in r:
            continue
        for ref in ("a", "b"):
            if ref in base:
                r[f"x_{ref}"] = round(r["tok_s"] / base[ref]["tok_s"], 2)
    result = {
        "device": str(backend.device),
        "cpu_threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "model": args.model,
        "pairs": len(pairs),
        "max_new_tokens": m,
        "rows": rows,
        "batch1_drafting": {
            "pairs": len(copy_pairs),
            "plain_s": round(t_plain, 2),
            "drafted_s": round(t_draft, 2),
            "speedup": round(t_plain / t_draft, 2),
            "plain_tok_s": round(copy_tokens / t_plain, 1),
            "drafted_tok_s": round(copy_tokens / t_draft, 1),
            "identical_texts": f"{identical}/{len(copy_pairs)}",
            "acceptance_rate": round(accepted / proposed, 3) if proposed else 0.0,
            "mean_similarity_to_answer": round(similarity, 3),
        },
    }
    aligner.close()
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(
        f"device={result['device']} threads={result['cpu_threads']} model={args.model} "
        f"pairs={len(pairs)} max_new_tokens={m}"
    )
    print(f"{'method':<38}{'s':>8}{'tokens':>8}{'tok/s':>9}{'x (a)':>8}{'x (b)':>8}")
    for r in rows:
        if "error" in r:
            print(f"{r['method']:<38}  not run: {r['error']}")
            continue
        print(
            f"{r['method']:<38}{r['seconds']:>8}{r['tokens']:>8}{r['tok_s']:>9}{r.get('x_a', ''):>8}{r.get('x_b', ''):>8}"
        )
    d = result["batch1_drafting"]
    print(
        f"\nbatch 1, copy-edit set ({d['pairs']} pairs, similarity to answer {d['mean_similarity_to_answer']}):"
    )
    print(f"  plain greedy   {d['plain_s']:>7}s {d['plain_tok_s']:>7} tok/s")
    print(
        f"  drafting       {d['drafted_s']:>7}s {d['drafted_tok_s']:>7} tok/s   speed-up {d['speedup']}x, "
        f"acceptance {d['acceptance_rate']}, identical texts {d['identical_texts']}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
