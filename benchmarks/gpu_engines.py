"""Engines on a GPU with no weights and no network: random-weight Llama models at real shapes.

    python -m benchmarks.gpu_engines --tokenizer DIR [--shapes 1b,8b] [--requests 256] [--max-new-tokens 128] [--json PATH]

Throughput does not depend on weight values, so models are built from ``LlamaConfig`` at 1B and 8B
shapes (bf16, random weights) with the SmolLM2 tokenizer. On the same 256 Aligner requests (the
bundled 32 pairs, repeated, ``aligner-v1`` template) it measures side by side: plain transformers
``generate`` over padded chunks of 64 in input order (what a user writes by hand); ``correct_batch``
with default settings; ``correct_batch(speculative=False)``; concurrent ``acorrect``; and vLLM
in-process when vLLM is installed (otherwise reported as not measurable). Random weights make drafts
nearly always wrong: the worst case for answer-anchored drafting. ``--shapes tiny`` runs on a CPU.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import time
from pathlib import Path
from typing import Any

DATA = Path(__file__).parent / "data"
SHAPES: dict[str, dict[str, int]] = {
    "tiny": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    ),
    "1b": dict(
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
    ),
    "8b": dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
    ),
}


def pairs(n: int) -> list[tuple[str, str]]:
    rows = [json.loads(line) for line in (DATA / "pairs32.jsonl").read_text().splitlines() if line.strip()]
    base = [(r["question"], r["answer"]) for r in rows]
    return [base[i % len(base)] for i in range(n)]


def build(shape: str, tokenizer: Any, device: str) -> Any:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        max_position_embeddings=4096,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        **SHAPES[shape],
    )
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config).eval()
    finally:
        torch.set_default_dtype(previous)
    # Random weights never say EOS on purpose, but might by chance: generate exactly max_new_tokens.
    model.generation_config.eos_token_id = None
    return model


def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def naive_generate(
    model: Any, tokenizer: Any, prompts: list[str], max_new_tokens: int, chunk: int = 64
) -> int:
    """What a user writes by hand: left-padded chunks in input order, ``generate``, greedy."""
    import torch

    tokenizer.padding_side = "left"
    total = 0
    for i in range(0, len(prompts), chunk):
        enc = tokenizer(prompts[i : i + chunk], return_tensors="pt", padding=True).to(model.device)
        with torch.inference_mode():
            out = model.generate(
                **enc,
                max_new_tokens=max_new_tokens,
                min_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
            )
        total += (out.shape[1] - enc["input_ids"].shape[1]) * out.shape[0]
    return total


def measure(
    label: str, fn: Any, results: list[dict[str, Any]], baseline: float | None, repeat: int = 2
) -> float:
    """Run ``fn`` ``repeat`` times and report the last (warm) run; the first run's time is kept as ``cold_s``.

    A GPU's first pass at new batch shapes also pays for kernel selection (cuDNN attention builds a plan per
    shape), which the first method measured would otherwise carry for the ones after it.
    """
    times = []
    for _ in range(repeat):
        sync()
        start = time.perf_counter()
        tokens = fn()
        sync()
        times.append(time.perf_counter() - start)
    elapsed = times[-1]
    rate = tokens / elapsed
    ratio = None if baseline is None else rate / baseline
    results.append(
        {
            "method": label,
            "tokens": tokens,
            "seconds": round(elapsed, 3),
            "cold_s": round(times[0], 3),
            "tok_s": round(rate, 1),
            "ratio_vs_naive": None if ratio is None else round(ratio, 3),
        }
    )
    print(
        f"  {label:<42} {tokens:>7} tok {elapsed:>7.2f} s (cold {times[0]:.2f} s) {rate:>9.1f} tok/s"
        + ("" if ratio is None else f"  {ratio:.2f}x"),
        flush=True,
    )
    return rate


def run_shape(shape: str, tokenizer: Any, device: str, n: int, max_new_tokens: int) -> dict[str, Any]:
    import torch

    from aligner_core import Aligner

    work = pairs(n)
    model = build(shape, tokenizer, device)
    params = sum(p.numel() for p in model.parameters())
    print(f"{shape}: {params / 1e9:.2f}B parameters on {device}", flush=True)
    aligner = Aligner.from_model(model, tokenizer, template="aligner-v1", max_new_tokens=max_new_tokens)
    prompts = [aligner.template.format(question=q, answer=a) for q, a in work]
    prompt_tokens = sum(len(tokenizer(p)["input_ids"]) for p in prompts) / len(prompts)
    results: list[dict[str, Any]] = []
    naive_generate(model, tokenizer, prompts[:8], 4)  # warm-up (kernels, allocator)
    aligner.correct_batch(work[:8], max_new_tokens=4)
    base = measure(
        "transformers generate, chunks of 64",
        lambda: naive_generate(model, tokenizer, prompts, max_new_tokens),
        results,
        None,
    )

    def batch(**kw: Any) -> int:
        return sum(c.completion_tokens for c in aligner.correct_batch(work, **kw))

    batch_rate = measure("correct_batch, defaults", batch, results, base)
    measure("correct_batch, speculative=False", lambda: batch(speculative=False), results, base)

    async def concurrent() -> int:
        out = await asyncio.gather(*(aligner.acorrect(q, a) for q, a in work))
        return sum(c.completion_tokens for c in out)

    before = aligner.engine.scheduler.batches_run
    measure(f"{n} concurrent acorrect", lambda: asyncio.run(concurrent()), results, base)
    results[-1]["worker_batches_per_run"] = (aligner.engine.scheduler.batches_run - before) / 2
    results[-1]["ratio_vs_correct_batch"] = round(results[-1]["tok_s"] / batch_rate, 3)
    print(
        f"  (the worker ran each burst as {results[-1]['worker_batches_per_run']:g} batches; "
        f"{results[-1]['ratio_vs_correct_batch']:.2f}x correct_batch)",
        flush=True,
    )
    try:
        import vllm  # noqa: F401

        vllm_note = (
            "vLLM is installed but random-weight models cannot be handed to it in-process; not measured"
        )
    except ImportError:
        vllm_note = (
            "not measurable here: vLLM is not installed on this GPU machine (no network to install it)"
        )
    print(f"  vLLM in-process: {vllm_note}", flush=True)
    aligner.close()
    aligner = model = None  # free the accelerator before the next shape
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return {
        "shape": shape,
        "parameters": params,
        "requests": n,
        "mean_prompt_tokens": round(prompt_tokens, 1),
        "max_new_tokens": max_new_tokens,
        "results": results,
        "vllm": vllm_note,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tokenizer", required=True, help="Directory with the SmolLM2 tokenizer files.")
    parser.add_argument("--shapes", default="1b,8b", help="Comma-separated: tiny, 1b, 8b.")
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--json", type=Path, default=None, help="Write the results here.")
    args = parser.parse_args(argv)

    import torch
    import transformers
    from transformers import AutoTokenizer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    report: dict[str, Any] = {
        "device": torch.cuda.get_device_name(0) if device == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "shapes": [],
    }
    for shape in args.shapes.split(","):
        report["shapes"].append(
            run_shape(shape.strip(), tokenizer, device, args.requests, args.max_new_tokens)
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
