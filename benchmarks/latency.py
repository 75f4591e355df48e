"""Batch-1 latency and batch-32 throughput of every installed engine, side by side in one run.

    python -m benchmarks.latency [--max-new-tokens 64] [--rounds 2] [--sets copy-edit,worst-case,identity]
                                 [--skip transformers,llamacpp,vllm] [--out FILE] [--json]

Engines (each row one way of running the same packaged SmolLM2-135M-Instruct, the ``aligner-v1`` prompt, greedy):

- ``transformers``: the library's transformers engine on the dequantized float32 copy, with its defaults
  (answer-anchored drafting) and with ``speculative=False`` (plain greedy);
- ``llama.cpp``: ``engine="llama.cpp"`` on the Q4_1 GGUF itself, drafting off (its default) and on;
- ``vLLM server``: only when ``$ALIGNER_TEST_VLLM_URL`` points at a running vLLM server of the same model.

Sets (8 pairs each; batch 32 is the 8 pairs four times, in one ``correct_batch``):

- ``copy-edit``: benchmarks/data/copyedit8.jsonl, answers with small mistakes;
- ``worst-case``: the same questions with the answers rotated so that none belongs to its question;
- ``identity``: the copy-edit pairs corrected by an Aligner that leaves good answers alone: a LoRA on the packaged
  model trained briefly with ``aligner train``'s identity warm-up (Q-A-A) on benchmarks/data/pairs32.jsonl (other
  pairs), built once and cached under ``<cache root>/benchmarks/identity-lora``; each engine loads it
  (transformers through PEFT, llama.cpp as a GGUF LoRA converted from it).

Timing on a shared machine: other jobs only ever add time, so every measurement is repeated ``--rounds`` times with
the order of the methods rotated each time, and the fastest round of each (pair, method) counts; the mean over
rounds is in the JSON too. Batch 1 is one ``correct`` per pair. Each row says how many texts equal plain greedy on
the same engine (transformers ``speculative=False``, llama.cpp without drafting, both at batch 1).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
DATA = Path(__file__).parent / "data"
MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
SETS = ("copy-edit", "worst-case", "identity")
#: How the identity LoRA is trained (part of its cache key: change it and the LoRA is rebuilt).
IDENTITY_RECIPE = (
    "--identity-only",
    "--identity-fraction",
    "1.0",
    "--lora",
    "--correction-field",
    "answer",
    "--epochs",
    "2",
    "--batch-size",
    "4",
    "--grad-accum",
    "1",
    "--lr",
    "1e-3",
    "--scheduler",
    "constant",
    "--warmup-ratio",
    "0",
    "--no-gradient-checkpointing",
    "--report-to",
    "none",
    "--no-progress",
    "--save-steps",
    "1000",
    "--seed",
    "1",
)


def load(name: str) -> list[tuple[str, str]]:
    rows = [json.loads(line) for line in (DATA / name).read_text().splitlines() if line.strip()]
    return [(r["question"], r["answer"]) for r in rows]


@dataclass
class Method:
    """One row: an Aligner and the call options that make it this method."""

    name: str
    engine: str
    aligner: Any
    options: dict[str, Any] = field(default_factory=dict)
    reference: str = ""  # the method whose batch-1 texts this one's are compared with


# -- the identity LoRA ------------------------------------------------------------------------------


def identity_lora(rebuild: bool = False) -> tuple[Path, float | None]:
    """The cached identity LoRA (PEFT folder) and the seconds it took to build now (None when cached)."""
    import hashlib

    from aligner_core.loading import cache_root

    key = hashlib.sha256(
        " ".join(IDENTITY_RECIPE).encode() + (DATA / "pairs32.jsonl").read_bytes()
    ).hexdigest()[:12]
    out = cache_root() / "benchmarks" / f"identity-lora-{key}"
    adapter = _adapter_dir(out)
    if adapter is not None and not rebuild:
        return adapter, None
    start = time.perf_counter()
    command = [
        sys.executable,
        "-m",
        "aligner_core",
        "train",
        str(DATA / "pairs32.jsonl"),
        "--base-model",
        MODEL,
        "--output",
        str(out),
        "--overwrite",
        *IDENTITY_RECIPE,
    ]
    print(f"building the identity LoRA once ({' '.join(command[3:])})", file=sys.stderr, flush=True)
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    adapter = _adapter_dir(out)
    if adapter is None:
        raise RuntimeError(f"aligner train wrote no PEFT adapter under {out}")
    return adapter, time.perf_counter() - start


def _adapter_dir(out: Path) -> Path | None:
    for candidate in (out, out / "adapter", out / "identity"):
        if (candidate / "adapter_config.json").is_file() and (
            candidate / "adapter_model.safetensors"
        ).is_file():
            return candidate
    return None


# -- building the rows -------------------------------------------------------------------------------


def transformers_methods(max_new_tokens: int, adapter: Path | None) -> list[Method]:
    from aligner_core import Aligner

    aligner = Aligner.from_pretrained(
        MODEL, template="aligner-v1", engine="transformers", adapter=adapter, max_new_tokens=max_new_tokens
    )
    plain = "transformers, speculative=False"
    return [
        Method("transformers (default: drafting)", "transformers", aligner, {}, plain),
        Method(plain, "transformers", aligner, {"speculative": False}, plain),
    ]


def llamacpp_methods(max_new_tokens: int, adapter: Path | None) -> list[Method]:
    from aligner_core import Aligner

    # One engine for both rows: drafting is an engine setting, and speculative=False turns it off per call,
    # which is exactly what the engine does by default. n_ctx=1024 holds these prompts and gives 32 slots.
    aligner = Aligner.from_pretrained(
        MODEL,
        template="aligner-v1",
        engine="llama.cpp",
        adapter=adapter,
        max_new_tokens=max_new_tokens,
        drafting=True,
        n_ctx=1024,
    )
    plain = "llama.cpp (default: no drafting)"
    return [
        Method(plain, "llama.cpp", aligner, {"speculative": False}, plain),
        Method("llama.cpp, drafting=True", "llama.cpp", aligner, {}, plain),
    ]


def vllm_methods(max_new_tokens: int) -> list[Method]:
    url = os.environ.get("ALIGNER_TEST_VLLM_URL")
    if not url:
        return []
    from aligner_core import Aligner

    aligner = Aligner.from_server(url, template="aligner-v1", max_new_tokens=max_new_tokens)
    name = "vLLM CPU server (Aligner.from_server)"
    return [Method(name, "server", aligner, {}, name)]


# -- measuring ---------------------------------------------------------------------------------------


def rotated(items: list[Method], by: int) -> list[Method]:
    by %= len(items)
    return items[by:] + items[:by]


def batch1(methods: list[Method], pairs: list[tuple[str, str]], rounds: int) -> dict[str, dict[str, Any]]:
    """One ``correct`` per pair, methods in a rotating order, ``rounds`` times; the fastest round per pair counts."""
    times: dict[str, list[list[float]]] = {m.name: [[] for _ in pairs] for m in methods}
    outputs: dict[str, list[Any]] = {m.name: [None] * len(pairs) for m in methods}
    for r in range(rounds):
        for i, (question, answer) in enumerate(pairs):
            for m in rotated(methods, r + i):
                start = time.perf_counter()
                out = m.aligner.correct(question, answer, **m.options)
                times[m.name][i].append(time.perf_counter() - start)
                outputs[m.name][i] = out
    return {m.name: summary(times[m.name], outputs[m.name]) for m in methods}


def batch32(methods: list[Method], pairs: list[tuple[str, str]], rounds: int) -> dict[str, dict[str, Any]]:
    """One ``correct_batch`` of the 32 pairs per method and round, in a rotating order; the fastest round counts."""
    times: dict[str, list[float]] = {m.name: [] for m in methods}
    outputs: dict[str, list[Any]] = {}
    for r in range(rounds):
        for m in rotated(methods, r):
            start = time.perf_counter()
            out = m.aligner.correct_batch(pairs, **m.options)
            times[m.name].append(time.perf_counter() - start)
            outputs[m.name] = out
    result = {}
    for m in methods:
        tokens = sum(c.completion_tokens for c in outputs[m.name])
        best = min(times[m.name])
        result[m.name] = {
            "seconds": round(best, 3),
            "mean_s": round(sum(times[m.name]) / rounds, 3),
            "tokens": tokens,
            "tokens_per_s": round(tokens / best, 1),
            "texts": outputs[m.name],
        }
    return result


def summary(times: list[list[float]], outputs: list[Any]) -> dict[str, Any]:
    best = sum(min(t) for t in times)
    mean = sum(sum(t) / len(t) for t in times)
    tokens = sum(c.completion_tokens for c in outputs)
    proposed = sum(c.metadata.get("draft_tokens", 0) for c in outputs)
    accepted = sum(c.metadata.get("accepted_draft_tokens", 0) for c in outputs)
    return {
        "s_per_answer": round(best / len(times), 3),
        "mean_s_per_answer": round(mean / len(times), 3),
        "tokens": tokens,
        "tokens_per_s": round(tokens / best, 1),
        "acceptance": round(accepted / proposed, 3) if proposed else None,
        "texts": outputs,
    }


def measure_set(
    name: str, methods: list[Method], pairs: list[tuple[str, str]], rounds: int, skip_batch: bool
) -> list[dict[str, Any]]:
    for m in methods:  # warm-up: first calls load kernels and fill caches
        m.aligner.correct(*pairs[0], max_new_tokens=4, **m.options)
    one = batch1(methods, pairs, rounds)
    many = {} if skip_batch else batch32(methods, pairs * 4, rounds)
    rows = []
    for m in methods:
        ref = [c.text for c in one[m.reference]["texts"]]
        row = {"set": name, "method": m.name, "engine": m.engine}
        row.update({k: v for k, v in one[m.name].items() if k != "texts"})
        row["equal_to_plain"] = f"{sum(c.text == t for c, t in zip(one[m.name]['texts'], ref))}/{len(ref)}"
        if many:
            b = many[m.name]
            row.update(
                batch32_s=b["seconds"],
                batch32_mean_s=b["mean_s"],
                batch32_tokens=b["tokens"],
                batch32_tokens_per_s=b["tokens_per_s"],
            )
            row["batch32_equal_to_plain"] = (
                f"{sum(c.text == ref[i % len(ref)] for i, c in enumerate(b['texts']))}/{len(b['texts'])}"
            )
        rows.append(row)
    return rows


# -- output ------------------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    cpu = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    versions = {}
    for dist in ("torch", "transformers", "llama-cpp-python"):
        with contextlib.suppress(Exception):
            from importlib.metadata import version

            versions[dist] = version(dist)
    return {
        "cpu": cpu,
        "nproc": os.cpu_count(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "load_average_at_start": [round(x, 2) for x in load] if load else None,
        "versions": versions,
    }


def table(rows: list[dict[str, Any]]) -> str:
    head = (
        f"{'set':11} {'method':38} {'s/answer':>8} {'tok/s':>6} {'accept':>6} {'=plain':>6} "
        f"{'b32 s':>7} {'b32 tok/s':>9} {'=plain':>6}"
    )
    lines = [head]
    for r in rows:
        accept = "" if r.get("acceptance") is None else f"{r['acceptance']:.2f}"
        lines.append(
            f"{r['set']:11} {r['method'][:38]:38} {r['s_per_answer']:8.2f} {r['tokens_per_s']:6.1f} {accept:>6} "
            f"{r['equal_to_plain']:>6} {r.get('batch32_s', float('nan')):7.2f} "
            f"{r.get('batch32_tokens_per_s', float('nan')):9.1f} {r.get('batch32_equal_to_plain', ''):>6}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.latency",
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join(__doc__.splitlines()[2:]),
    )
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument(
        "--rounds", type=int, default=2, help="repetitions of every measurement (fastest counts)"
    )
    parser.add_argument("--sets", default=",".join(SETS), help=f"comma-separated subset of {','.join(SETS)}")
    parser.add_argument("--skip", default="", help="engines to leave out: transformers,llamacpp,vllm")
    parser.add_argument("--skip-batch", action="store_true", help="batch 1 only")
    parser.add_argument("--rebuild-identity", action="store_true", help="train the identity LoRA again")
    parser.add_argument("--out", default=None, help="write the JSON here (default: print only)")
    parser.add_argument("--json", action="store_true", help="print the JSON instead of the table")
    args = parser.parse_args(argv)
    sets = [s for s in args.sets.split(",") if s]
    unknown = set(sets) - set(SETS)
    if unknown:
        parser.error(f"unknown set(s) {sorted(unknown)}; choose from {SETS}")
    skip = {s for s in args.skip.split(",") if s}
    copy = load("copyedit8.jsonl")
    workloads = {
        "copy-edit": copy,
        "worst-case": [(q, copy[(i + 3) % len(copy)][1]) for i, (q, _) in enumerate(copy)],
        "identity": copy,
    }
    result: dict[str, Any] = {
        "model": MODEL,
        "template": "aligner-v1",
        "max_new_tokens": args.max_new_tokens,
        "rounds": args.rounds,
        "machine": machine(),
        "rows": [],
        "not_measured": {},
    }
    builders: list[tuple[str, Callable[[Path | None], list[Method]]]] = []
    if "transformers" not in skip:
        builders.append(("transformers", lambda a: transformers_methods(args.max_new_tokens, a)))
    if "llamacpp" not in skip:
        builders.append(("llama.cpp", lambda a: llamacpp_methods(args.max_new_tokens, a)))
    if "vllm" not in skip:
        builders.append(("vLLM server", lambda a: [] if a is not None else vllm_methods(args.max_new_tokens)))
    started = time.perf_counter()
    for set_name in sets:
        adapter = None
        if set_name == "identity":
            try:
                adapter, built = identity_lora(args.rebuild_identity)
            except Exception as exc:  # training needs the [train] extra and minutes of CPU
                result["not_measured"]["identity"] = f"{type(exc).__name__}: {exc}"[:400]
                continue
            result["identity_lora"] = {
                "path": str(adapter),
                "build_s": None if built is None else round(built, 1),
                "recipe": " ".join(IDENTITY_RECIPE),
            }
        methods: list[Method] = []
        for engine, build in builders:
            try:
                methods += build(adapter)
            except Exception as exc:  # an engine that is not installed is reported, the others still run
                result["not_measured"][f"{engine} ({set_name})"] = f"{type(exc).__name__}: {exc}"[:400]
        print(f"measuring {set_name}: {', '.join(m.name for m in methods)}", file=sys.stderr, flush=True)
        try:
            result["rows"] += measure_set(
                set_name, methods, workloads[set_name], args.rounds, args.skip_batch
            )
        finally:
            for aligner in {id(m.aligner): m.aligner for m in methods}.values():
                aligner.close()
    result["seconds"] = round(time.perf_counter() - started, 1)
    load_end = os.getloadavg() if hasattr(os, "getloadavg") else None
    result["machine"]["load_average_at_end"] = [round(x, 2) for x in load_end] if load_end else None
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        info = result["machine"]
        print(
            f"{MODEL}, aligner-v1, greedy, at most {args.max_new_tokens} new tokens; {info['cpu']} "
            f"({info['nproc']} CPUs), load {info['load_average_at_start']} -> {info['load_average_at_end']}"
        )
        print(table(result["rows"]))
        for what, why in result["not_measured"].items():
            print(f"not measured: {what}: {why}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
