"""Every engine the Aligner runs on, side by side in one run, on the same model and the same pairs.

    python -m benchmarks.engines [--pairs 32] [--max-new-tokens 48] [--json PATH]
                                 [--skip local,server,ngram,vllm-inprocess,ray]

The model is the packaged SmolLM2-135M-Instruct in float32 everywhere (the local engine loads the
dequantized GGUF; vLLM serves a safetensors copy of the same weights, ``tests.fixtures.servers.vllm_server.model_dir``).
All decoding is greedy. Measured, on the pairs of benchmarks/data/pairs32.jsonl (cycled to ``--pairs``):

1. ``local``: the transformers engine, ``Aligner.from_pretrained(...).correct_batch`` with its defaults.
2. ``server``: one vLLM server (``--dtype float32 --enforce-eager``). The exact requests the Aligner
   sends (its template rendered locally, raw ``/v1/completions`` prompts, greedy, same ``max_tokens``,
   64 in flight) are sent by plain httpx/asyncio, alternating round by round with
   ``Aligner.from_server(url, tokenizer=model_dir).correct_batch``: the Aligner's overhead is reported
   in % of the server's own throughput (best of the rounds, and the median of adjacent pairs).
3. ``ngram``: that server against a second one started with n-gram (prompt lookup) speculative decoding,
   on the copy-edit set (benchmarks/data/copyedit8.jsonl), one request at a time and all at once; texts
   compared, acceptance read from the server's ``/metrics`` (``vllm:spec_decode_*``).
4. ``vllm-inprocess``: ``Aligner.from_pretrained(..., engine="vllm")`` in a child process run by the
   vLLM virtualenv's python (``--worker vllm-inprocess``), with the engine's defaults (which include
   n-gram speculation) and with ``speculative=False``, one engine after the other; construction time
   is reported apart.
5. ``ray``: ``aligner_core.jobs.ray.correct_dataset`` over ``ray.data.from_items`` with 1 and 2
   replicas of the local engine (``ray.init(num_cpus=2)``, the library's default of 1 CPU, so one torch
   thread, per replica; workers at nice 0 like every other engine here). ``ray.init`` is timed apart, and
   a warm-up run (one short row per replica) comes first; tok/s is given end to end (actor start and
   model load included: actors do not outlive a dataset run) and steady: generation inside the actors,
   from the latencies each row reports.

An engine that is missing or fails is reported as "not measured: <why>"; the others still run. Every
server and child is stopped by its PID (process group) in ``finally`` blocks, temp folders are removed.
Only one vLLM process (server or in-process) runs at a time.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
DATA = Path(__file__).parent / "data"
VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"
PARTS = ("local", "server", "ngram", "vllm-inprocess", "ray")
COPY_INSTRUCTION = (
    "Copy the following text exactly, fixing only spelling mistakes.\n\nText: {answer}\n\n"
    "(Context question, do not answer it: {question})"
)  # as in benchmarks/throughput.py
RESULT_TAG = "ENGINES-RESULT "
RAY_NICENESS = "RAY_worker_niceness"  # Ray's own (lower-case) config variable


# -- small helpers ------------------------------------------------------------------------------


def load(name: str, n: int | None = None) -> list[tuple[str, str]]:
    rows = [json.loads(line) for line in (DATA / name).read_text().splitlines() if line.strip()]
    pairs = [(r["question"], r["answer"]) for r in rows]
    if n is None:
        return pairs
    return [pairs[i % len(pairs)] for i in range(n)]


def why(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}".strip()[:400]


def rate(tokens: int, seconds: float) -> float:
    return round(tokens / seconds, 1) if seconds > 0 else 0.0


def same(a: list[str] | None, b: list[str] | None) -> str | None:
    if not a or not b or len(a) != len(b):
        return None
    return f"{sum(x.strip() == y.strip() for x, y in zip(a, b))}/{len(a)}"


def loadavg() -> list[float] | None:
    with contextlib.suppress(OSError):
        return [round(x, 2) for x in os.getloadavg()]
    return None


def load1() -> float | None:
    """The 1-minute load average when a row is recorded: how busy the shared machine was."""
    avg = loadavg()
    return avg[0] if avg else None


def version(dist: str) -> str | None:
    import importlib.metadata

    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


class Timer:
    def __enter__(self) -> Timer:
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self.start


def log(msg: str) -> None:
    print(f"[engines {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# -- 1. the local (transformers) engine ---------------------------------------------------------


def run_local(pairs: list[tuple[str, str]], m: int, runs: int) -> dict[str, Any]:
    import torch

    from aligner_core import DEFAULT_MODEL, Aligner

    with Timer() as t_load:
        aligner = Aligner.from_pretrained(DEFAULT_MODEL, engine="transformers", max_new_tokens=m)
    try:
        aligner.correct(*pairs[0], max_new_tokens=4)  # warm-up (threads, allocator)
        best: dict[str, Any] | None = None
        times = []
        for _ in range(runs):
            with Timer() as t:
                out = aligner.correct_batch(pairs)
            times.append(t.seconds)
            if best is None or t.seconds < best["seconds"]:
                best = {
                    "seconds": t.seconds,
                    "tokens": sum(c.completion_tokens for c in out),
                    "texts": [c.text for c in out],
                }
        assert best is not None
        return {
            "engine": "local",
            "method": "local engine correct_batch",
            "runs": runs,
            "seconds": round(best["seconds"], 2),
            "all_seconds": [round(x, 2) for x in times],
            "tokens": best["tokens"],
            "tok_s": rate(best["tokens"], best["seconds"]),
            "construct_s": round(t_load.seconds, 2),
            "threads": torch.get_num_threads(),
            "dtype": str(next(aligner.engine.model.parameters()).dtype),
            "texts": best["texts"],
            "load_1m": load1(),
        }
    finally:
        aligner.close()


# -- 2. the server alone vs through the Aligner -------------------------------------------------


class RawClient:
    """Plain httpx/asyncio: the same bodies the Aligner's server engine sends, ``limit`` in flight."""

    def __init__(self, url: str, limit: int, timeout: float) -> None:
        import httpx

        self.url = url.rstrip("/") + "/completions"
        self.limit = limit
        self.loop = asyncio.new_event_loop()
        self.client = httpx.AsyncClient(
            timeout=timeout, limits=httpx.Limits(max_connections=limit, max_keepalive_connections=limit)
        )

    def run(self, bodies: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return self.loop.run_until_complete(self._all(bodies))

    async def _all(self, bodies: list[dict[str, Any]]) -> list[dict[str, Any]]:
        sem = asyncio.Semaphore(self.limit)

        async def one(body: dict[str, Any]) -> dict[str, Any]:
            async with sem:
                resp = await self.client.post(self.url, json=body)
                resp.raise_for_status()
                return resp.json()

        return await asyncio.gather(*(one(b) for b in bodies))

    def close(self) -> None:
        self.loop.run_until_complete(self.client.aclose())
        self.loop.close()


def raw_bodies(aligner: Any, model: str, pairs: list[tuple[str, str]], m: int) -> list[dict[str, Any]]:
    """What ``ServerEngine._body`` sends for a greedy correction: the locally rendered template as a raw prompt."""
    template = aligner.template
    bodies = []
    for q, a in pairs:
        body: dict[str, Any] = {
            "model": model,
            "max_tokens": m,
            "prompt": template.format(question=q, answer=a),
        }
        if not template.add_special_tokens:
            body["add_special_tokens"] = False
        body["temperature"] = 0.0
        bodies.append(body)
    return bodies


def measure_overhead(
    server: Any,
    model_path: Path,
    pairs: list[tuple[str, str]],
    m: int,
    rounds: int,
    concurrency: int,
    timeout: float,
) -> dict[str, Any]:
    from aligner_core import Aligner

    aligner = Aligner.from_server(
        server.url, tokenizer=str(model_path), max_new_tokens=m, max_concurrency=concurrency, timeout=timeout
    )
    raw = RawClient(server.url, concurrency, timeout)
    try:
        bodies = raw_bodies(aligner, aligner.engine.model_name, pairs, m)
        # Warm-up, not timed: connections, the server's first batches.
        raw.run(bodies[:4])
        aligner.correct_batch(pairs[:4])

        # CPU seconds this process (all its threads) spends per round: what the client takes from the
        # server's cores, a figure the other load on a shared machine does not blur the way wall time is.
        cpu: dict[str, list[float]] = {"raw": [], "aligner": []}

        def raw_round() -> tuple[float, int, list[str]]:
            c0 = time.process_time()
            with Timer() as t:
                out = raw.run(bodies)
            cpu["raw"].append(time.process_time() - c0)
            return (
                t.seconds,
                sum(r["usage"]["completion_tokens"] for r in out),
                [r["choices"][0]["text"].strip() for r in out],
            )

        def aligner_round() -> tuple[float, int, list[str]]:
            c0 = time.process_time()
            with Timer() as t:
                out = aligner.correct_batch(pairs)
            cpu["aligner"].append(time.process_time() - c0)
            return t.seconds, sum(c.completion_tokens for c in out), [c.text for c in out]

        raw_runs: list[tuple[float, int, list[str]]] = []
        al_runs: list[tuple[float, int, list[str]]] = []
        for i in range(rounds):  # alternate which goes first: raw/aligner, aligner/raw, ...
            order = (("raw", raw_round), ("aligner", aligner_round))
            for name, fn in order if i % 2 == 0 else order[::-1]:
                (raw_runs if name == "raw" else al_runs).append(fn())
            log(f"  round {i + 1}/{rounds}: raw {raw_runs[-1][0]:.2f}s, aligner {al_runs[-1][0]:.2f}s")
    finally:
        raw.close()
        aligner.close()

    def row(key: str, label: str, runs: list[tuple[float, int, list[str]]]) -> dict[str, Any]:
        best = min(runs, key=lambda r: r[0])
        return {
            "engine": key,
            "method": label,
            "runs": len(runs),
            "seconds": round(best[0], 2),
            "all_seconds": [round(r[0], 2) for r in runs],
            "tokens": best[1],
            "tok_s": rate(best[1], best[0]),
            "all_tok_s": [rate(r[1], r[0]) for r in runs],
            "texts": best[2],
            "load_1m": load1(),
        }

    raw_row = row("server-raw", f"vLLM server alone (httpx, {concurrency} in flight)", raw_runs)
    al_row = row("server-aligner", "vLLM server via Aligner.from_server", al_runs)
    paired = [100 * (1 - (a[1] / a[0]) / (r[1] / r[0])) for r, a in zip(raw_runs, al_runs)]
    med_raw = statistics.median(rate(r[1], r[0]) for r in raw_runs)
    med_al = statistics.median(rate(a[1], a[0]) for a in al_runs)
    overhead = {
        "rounds": rounds,
        "concurrency": concurrency,
        "overhead_pct_best": round(100 * (1 - al_row["tok_s"] / raw_row["tok_s"]), 1),
        "overhead_pct_median": round(100 * (1 - med_al / med_raw), 1),
        "overhead_pct_per_round": [round(p, 1) for p in paired],
        "overhead_pct_median_of_rounds": round(statistics.median(paired), 1),
        "target_pct": 5.0,
        "client_cpu_s_raw": [round(x, 3) for x in cpu["raw"]],
        "client_cpu_s_aligner": [round(x, 3) for x in cpu["aligner"]],
        "same_tokens_each_round": all(r[1] == a[1] for r, a in zip(raw_runs, al_runs)),
        "identical_texts_raw_vs_aligner": same(raw_row["texts"], al_row["texts"]),
        "template": aligner.template.name,
    }
    return {"rows": [raw_row, al_row], "overhead": overhead}


# -- 3. n-gram speculative decoding on the server ----------------------------------------------


def spec_metrics(root_url: str) -> dict[str, float]:
    """``vllm:spec_decode_*`` counters (summed over engines; per-position counters keep their position)."""
    import re

    import httpx

    try:
        text = httpx.get(root_url + "/metrics", timeout=10).text
    except Exception:
        return {}
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line.startswith("vllm:spec_decode") or "_created" in line.split("{")[0].split(" ")[0]:
            continue
        name_labels, _, value = line.rpartition(" ")
        name = name_labels.split("{")[0]
        pos = re.search(r'position="(\d+)"', name_labels)
        key = f"{name}[{pos.group(1)}]" if pos else name
        with contextlib.suppress(ValueError):
            out[key] = out.get(key, 0.0) + float(value)
    return out


def spec_summary(before: dict[str, float], after: dict[str, float]) -> dict[str, Any] | None:
    delta = {k: after[k] - before.get(k, 0.0) for k in after}
    if not delta:
        return None
    drafts = delta.get("vllm:spec_decode_num_drafts_total", 0.0)
    proposed = delta.get("vllm:spec_decode_num_draft_tokens_total", 0.0)
    accepted = delta.get("vllm:spec_decode_num_accepted_tokens_total", 0.0)
    per_pos = {k.split("[")[1].rstrip("]"): int(v) for k, v in delta.items() if "per_pos" in k and "[" in k}
    return {
        "drafts": int(drafts),
        "draft_tokens": int(proposed),
        "accepted_tokens": int(accepted),
        "acceptance_rate": round(accepted / proposed, 3) if proposed else None,
        "mean_acceptance_length": round(1 + accepted / drafts, 2) if drafts else None,
        "accepted_per_position": per_pos or None,
    }


def measure_copy(
    server: Any, model_path: Path, copy_pairs: list[tuple[str, str]], m: int, rounds: int, timeout: float
) -> dict[str, Any]:
    """Batch 1 (sequential ``correct``) and all at once (``correct_batch``) on the copy-edit set."""
    from aligner_core import Aligner, ChatTemplate

    root = server.url[: -len("/v1")]
    copy = ChatTemplate(name="copyedit", instruction=COPY_INSTRUCTION)
    editor = Aligner.from_server(
        server.url,
        tokenizer=str(model_path),
        template=copy,
        max_new_tokens=m,
        max_concurrency=64,
        timeout=timeout,
    )
    try:
        editor.correct(*copy_pairs[0], max_new_tokens=4)  # warm-up
        out: dict[str, Any] = {}
        for mode in ("batch1", "concurrent"):
            best: dict[str, Any] | None = None
            times: list[float] = []
            before = spec_metrics(root)
            for _ in range(rounds):
                with Timer() as t:
                    if mode == "batch1":
                        res = [editor.correct(q, a) for q, a in copy_pairs]
                    else:
                        res = editor.correct_batch(copy_pairs)
                if best is None or t.seconds < best["seconds"]:
                    best = {
                        "seconds": t.seconds,
                        "tokens": sum(c.completion_tokens for c in res),
                        "texts": [c.text for c in res],
                        "similarity_to_answer": round(sum(c.similarity for c in res) / len(res), 3),
                    }
                times.append(round(t.seconds, 2))
            assert best is not None
            best["all_seconds"] = times
            best["seconds"] = round(best["seconds"], 2)
            best["tok_s"] = rate(best["tokens"], best["seconds"])
            time.sleep(0.5)  # let the last steps' stats reach the API server
            best["spec_metrics"] = spec_summary(before, spec_metrics(root))
            out[mode] = best
        return out
    finally:
        editor.close()


def ngram_compare(plain: dict[str, Any], spec: dict[str, Any]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for mode in ("batch1", "concurrent"):
        p, s = plain[mode], spec[mode]
        result[mode] = {
            "plain_s": p["seconds"],
            "spec_s": s["seconds"],
            "plain_all_s": p["all_seconds"],
            "spec_all_s": s["all_seconds"],
            "plain_tok_s": p["tok_s"],
            "spec_tok_s": s["tok_s"],
            "speedup": round(p["seconds"] / s["seconds"], 2) if s["seconds"] else None,
            "plain_tokens": p["tokens"],
            "spec_tokens": s["tokens"],
            "identical_texts": same(p["texts"], s["texts"]),
            "similarity_to_answer": p["similarity_to_answer"],
            "acceptance": s["spec_metrics"],
        }
    result["target_batch1_speedup"] = 1.5
    return result


def run_servers(
    parts: set[str], pairs: list[tuple[str, str]], args: argparse.Namespace, results: dict[str, Any]
) -> None:
    """Phases 2 and 3: a plain server, stopped, then an n-gram one; never two at once."""
    try:
        sys.path.insert(0, str(ROOT))
        from tests.fixtures.servers import vllm_server
    except Exception as exc:
        for part in parts & {"server", "ngram"}:
            results["not_measured"][part] = f"cannot import tests.fixtures.servers.vllm_server: {why(exc)}"
        return
    if vllm_server.vllm_python() is None:
        for part in parts & {"server", "ngram"}:
            results["not_measured"][part] = "no .venv-vllm (bash scripts/setup_vllm.sh)"
        return
    model_path = vllm_server.model_dir()
    results["settings"]["vllm_model_dir"] = str(model_path)
    copy_pairs = load("copyedit8.jsonl")
    plain_copy: dict[str, Any] | None = None
    for speculative in (False, True):
        if speculative and ("ngram" not in parts or plain_copy is None):
            continue
        label = "n-gram speculative server" if speculative else "plain server"
        server = None
        try:
            log(f"starting the {label}")
            with Timer() as t_start:
                server = vllm_server.start(model_path, speculative=speculative)
                server.wait_healthy(timeout=args.server_start_timeout)
            results["servers"][label] = {"startup_s": round(t_start.seconds, 1), "port": server.port}
            with contextlib.suppress(Exception):
                import httpx

                results["machine"]["vllm"] = (
                    httpx.get(server.url[:-3] + "/version", timeout=5).json().get("version")
                )
            log(f"  healthy after {t_start.seconds:.0f}s on port {server.port}")
            if not speculative and "server" in parts:
                try:
                    log("server alone vs Aligner.from_server")
                    got = measure_overhead(
                        server,
                        model_path,
                        pairs,
                        args.max_new_tokens,
                        args.rounds,
                        args.concurrency,
                        args.timeout,
                    )
                    results["rows"].extend(got["rows"])
                    results["server_overhead"] = got["overhead"]
                except Exception as exc:
                    traceback.print_exc()
                    results["not_measured"]["server"] = why(exc)
            if "ngram" in parts:
                try:
                    log(f"copy-edit set on the {label}")
                    copy = measure_copy(
                        server,
                        model_path,
                        copy_pairs,
                        args.copy_max_new_tokens,
                        args.copy_rounds,
                        args.timeout,
                    )
                    if not speculative:
                        plain_copy = copy
                    else:
                        assert plain_copy is not None
                        results["ngram"] = ngram_compare(plain_copy, copy)
                        results["ngram"]["config"] = vllm_server.NGRAM
                except Exception as exc:
                    traceback.print_exc()
                    results["not_measured"]["ngram"] = f"{label}: {why(exc)}"
        except Exception as exc:
            traceback.print_exc()
            tail = ""
            if server is not None and server.log.exists():
                tail = " | log: " + server.log.read_text(errors="replace")[-300:].replace("\n", " ")
            for part in parts & ({"ngram"} if speculative else {"server", "ngram"}):
                results["not_measured"].setdefault(part, f"{label}: {why(exc)}{tail}")
        finally:
            if server is not None:
                log(f"stopping the {label} (pid {server.proc.pid})")
                server.stop()


# -- 4. vLLM in-process (a child running the vLLM virtualenv) -----------------------------------

VLLM_VARIANTS = {  # name -> (label, extra keyword arguments of Aligner.from_pretrained(engine="vllm"))
    "default": ("vLLM in-process (engine='vllm', defaults)", {}),
    "plain": ("vLLM in-process (speculative=False)", {"speculative": False}),
}


def worker_vllm(args: argparse.Namespace) -> int:
    """``--worker vllm-inprocess``: runs under .venv-vllm's python; prints one result line.

    Each variant builds its own engine, corrects the pairs ``--local-runs`` times and closes it before
    the next one starts (one vLLM engine at a time)."""
    result: dict[str, Any] = {"rows": [], "errors": {}}
    try:
        with Timer() as t_import:
            import torch
            import vllm

            from aligner_core import DEFAULT_MODEL, Aligner
            from aligner_core.engines import vllm as _engine  # noqa: F401  (fails clearly when not written yet)
        result.update(
            vllm=vllm.__version__,
            torch=torch.__version__,
            transformers=version("transformers"),
            import_s=round(t_import.seconds, 2),
        )
        pairs = load("pairs32.jsonl", args.pairs)
        for variant in [v.strip() for v in args.vllm_variants.split(",") if v.strip()]:
            label, extra = VLLM_VARIANTS[variant]
            try:
                with Timer() as t_build:
                    aligner = Aligner.from_pretrained(
                        DEFAULT_MODEL,
                        engine="vllm",
                        dtype="float32",
                        max_new_tokens=args.max_new_tokens,
                        **{**json.loads(args.vllm_kwargs), **extra},
                    )
                try:
                    aligner.correct(*pairs[0], max_new_tokens=4)  # warm-up
                    times, best = [], None
                    for _ in range(args.local_runs):
                        with Timer() as t:
                            out = aligner.correct_batch(pairs)
                        times.append(t.seconds)
                        if best is None or t.seconds < best[0]:
                            best = (t.seconds, out)
                    assert best is not None
                    seconds, out = best
                    tokens = sum(c.completion_tokens for c in out)
                    proposed = sum(c.metadata.get("draft_tokens", 0) for c in out)
                    accepted = sum(c.metadata.get("accepted_draft_tokens", 0) for c in out)
                    row = {
                        "engine": f"vllm-inprocess-{variant}",
                        "method": label,
                        "runs": len(times),
                        "seconds": round(seconds, 2),
                        "all_seconds": [round(x, 2) for x in times],
                        "tokens": tokens,
                        "tok_s": rate(tokens, seconds),
                        "construct_s": round(t_build.seconds, 2),
                        "texts": [c.text for c in out],
                        "engine_repr": repr(aligner.engine)[:200],
                        "acceptance_rate": round(accepted / proposed, 3) if proposed else None,
                        "load_1m": load1(),
                    }
                finally:
                    with Timer() as t_close:
                        aligner.close()
                row["close_s"] = round(t_close.seconds, 2)
                result["rows"].append(row)
            except Exception as exc:
                traceback.print_exc()
                result["errors"][f"vllm-inprocess-{variant}"] = why(exc)
    except BaseException as exc:  # report, never hang the parent
        traceback.print_exc()
        result["error"] = why(exc)
    print(RESULT_TAG + json.dumps(result), flush=True)
    return 0


def run_vllm_inprocess(args: argparse.Namespace, results: dict[str, Any]) -> None:
    if not VLLM_PYTHON.exists():
        results["not_measured"]["vllm-inprocess"] = "no .venv-vllm (bash scripts/setup_vllm.sh)"
        return
    if not (ROOT / "aligner_core" / "engines" / "vllm.py").exists():
        results["not_measured"]["vllm-inprocess"] = "aligner_core/engines/vllm.py does not exist yet"
        return
    work = Path(tempfile.mkdtemp(prefix="aligner-bench-vllm-"))
    (work / "tmp").mkdir()
    (work / "cache").mkdir()
    env = dict(
        os.environ,
        TMPDIR=str(work / "tmp"),
        VLLM_CACHE_ROOT=str(work / "cache"),
        HF_HUB_OFFLINE="1",
        VLLM_NO_USAGE_STATS="1",
        DO_NOT_TRACK="1",
        VLLM_RPC_BASE_PATH=str(work / "tmp"),
    )
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [
        str(VLLM_PYTHON),
        "-m",
        "benchmarks.engines",
        "--worker",
        "vllm-inprocess",
        "--pairs",
        str(args.pairs),
        "--max-new-tokens",
        str(args.max_new_tokens),
        "--local-runs",
        str(args.local_runs),
        "--vllm-kwargs",
        args.vllm_kwargs,
        "--vllm-variants",
        args.vllm_variants,
    ]
    logfile = work / "worker.log"
    proc = None
    try:
        log("vLLM in-process worker")
        with open(logfile, "wb") as f:
            proc = subprocess.Popen(
                cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True
            )
            try:
                proc.wait(timeout=args.worker_timeout)
            except subprocess.TimeoutExpired:
                results["not_measured"]["vllm-inprocess"] = f"the worker ran past {args.worker_timeout}s"
                return
        text = logfile.read_text(errors="replace")
        lines = [ln for ln in text.splitlines() if ln.startswith(RESULT_TAG)]
        if not lines:
            results["not_measured"]["vllm-inprocess"] = f"worker exited {proc.returncode}: {text[-400:]!r}"
            return
        got = json.loads(lines[-1][len(RESULT_TAG) :])
        if "error" in got:
            results["not_measured"]["vllm-inprocess"] = got["error"]
            return
        results["machine"]["vllm"] = got["vllm"]
        results["machine"]["torch_vllm_venv"] = got["torch"]
        results["machine"]["transformers_vllm_venv"] = got["transformers"]
        for row in got["rows"]:
            row["import_s"] = got["import_s"]
            results["rows"].append(row)
        results["not_measured"].update(got["errors"])
    finally:
        if proc is not None:
            for sig in (signal.SIGTERM, signal.SIGKILL):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, sig)  # its own session: pgid == pid; takes EngineCore with it
                if sig == signal.SIGTERM:
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        proc.wait(timeout=10)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=30)
        shutil.rmtree(work, ignore_errors=True)


# -- 5. Ray ------------------------------------------------------------------------------------


def run_ray(
    pairs: list[tuple[str, str]], m: int, cpus_per_replica: float | None, results: dict[str, Any]
) -> None:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # Ray runs its workers at nice 15 by default; every other engine here runs at 0, and on a shared
    # machine a niced actor loses the CPU to any other load (seen: 2-thread actors 4x slower).
    os.environ.setdefault(RAY_NICENESS, "0")
    try:
        import ray
        import ray.data

        from aligner_core.jobs.choice import EngineChoice
        from aligner_core.jobs.ray import correct_dataset
    except Exception as exc:
        results["not_measured"]["ray"] = why(exc)
        return
    import logging

    tmp = Path(tempfile.mkdtemp(prefix="aligner-ray-"))
    try:
        with Timer() as t_init:
            ray.init(
                num_cpus=max(2, math.ceil(2 * (cpus_per_replica or 1))),
                include_dashboard=False,
                log_to_driver=False,
                logging_level=logging.WARNING,
                _temp_dir=str(tmp),
            )
        results["ray_info"] = {
            "init_s": round(t_init.seconds, 2),
            "ray": ray.__version__,
            "worker_niceness": os.environ.get(RAY_NICENESS),
        }
        context = ray.data.DataContext.get_current()
        context.execution_options.preserve_order = True
        context.enable_progress_bars = False
        choice = EngineChoice()
        rows = [{"question": q, "answer": a} for q, a in pairs]
        for replicas in (1, 2):
            cpus = cpus_per_replica  # None: the library's default (1 CPU, so 1 torch thread, per replica)
            threads = max(1, int(cpus)) if cpus is not None else 1
            try:
                log(f"Ray, {replicas} replica(s) x {threads} thread(s)")
                with Timer() as t_warm:  # the same actors start and load their model; one short row each
                    correct_dataset(
                        ray.data.from_items(rows[:replicas]),
                        choice,
                        load_options={"max_new_tokens": m},
                        replicas=replicas,
                        batch_size=1,
                        num_cpus=cpus,
                        max_new_tokens=1,
                    ).take_all()
                batch = math.ceil(len(rows) / replicas)
                with Timer() as t:
                    out = correct_dataset(
                        ray.data.from_items(rows),
                        choice,
                        load_options={"max_new_tokens": m},
                        replicas=replicas,
                        batch_size=batch,
                        num_cpus=cpus,
                    ).take_all()
                errors = [r["aligner_error"] for r in out if r.get("aligner_error")]
                if errors:
                    raise RuntimeError(f"{len(errors)} rows failed: {errors[0]}")
                stats = [json.loads(r["aligner"]) for r in out]
                tokens = sum(st["completion_tokens"] for st in stats)
                # Generation time inside the actors: rows come back in order, so rows [k*batch, (k+1)*batch)
                # were one Ray batch; its planned sub-batches ran one after another and each row carries its
                # sub-batch's latency, so a Ray batch took the sum of its distinct latencies. Replicas run
                # their batches in parallel: the longest batch bounds the generation time.
                in_actor = max(
                    sum({st["latency_s"] for st in stats[k : k + batch]}) for k in range(0, len(stats), batch)
                )
                results["rows"].append(
                    {
                        "engine": f"ray-{replicas}",
                        "method": f"Ray correct_dataset, {replicas} replica(s) x {threads} thread",
                        "runs": 1,
                        "seconds": round(t.seconds, 2),
                        "tokens": tokens,
                        "tok_s": rate(tokens, t.seconds),
                        "steady_s": round(in_actor, 2),
                        "steady_tok_s": rate(tokens, in_actor),
                        "startup_and_overhead_s": round(t.seconds - in_actor, 2),
                        "warmup_run_s": round(t_warm.seconds, 2),
                        "batch_size": batch,
                        "threads_per_replica": threads,
                        "load_1m": load1(),
                        "texts": [r["correction"] for r in out],
                    }
                )
            except Exception as exc:
                traceback.print_exc()
                results["not_measured"][f"ray-{replicas}"] = why(exc)
    except Exception as exc:
        traceback.print_exc()
        results["not_measured"]["ray"] = why(exc)
    finally:
        with contextlib.suppress(Exception):
            ray.shutdown()
        time.sleep(2)
        shutil.rmtree(tmp, ignore_errors=True)


# -- the report ------------------------------------------------------------------------------


def finish(results: dict[str, Any]) -> None:
    rows = results["rows"]
    local = next((r for r in rows if r["engine"] == "local"), None)
    for r in rows:
        if local:
            r["x_local"] = round(r["tok_s"] / local["tok_s"], 2)
            if "steady_tok_s" in r:
                r["steady_x_local"] = round(r["steady_tok_s"] / local["tok_s"], 2)
            r["identical_texts_vs_local"] = same(r.get("texts"), local.get("texts"))
    results["machine"]["loadavg_end"] = loadavg()
    for r in rows:
        r.pop("texts", None)  # compared above; the JSON keeps numbers only


def print_table(results: dict[str, Any]) -> None:
    s = results["settings"]
    mach = results["machine"]
    print(
        f"\n{mach['platform']} cpus={mach['cpu_count']} torch={mach.get('torch')} vllm={mach.get('vllm')} "
        f"load={mach.get('loadavg_start')}->{mach.get('loadavg_end')}"
    )
    print(f"model={s['model']} (float32) pairs={s['pairs']} max_new_tokens={s['max_new_tokens']} greedy")
    print(f"{'engine':<52}{'s':>8}{'tokens':>8}{'tok/s':>9}{'x local':>9}{'same text':>11}{'load':>6}")
    for r in results["rows"]:
        extra = f"  (best of {r['runs']})" if r.get("runs", 1) > 1 else ""
        if "construct_s" in r and r["engine"] != "local":
            extra += f"  construct {r['construct_s']}s"
        if r.get("acceptance_rate") is not None:
            extra += f"  n-gram acceptance {r['acceptance_rate']}"
        print(
            f"{r['method']:<52}{r['seconds']:>8}{r['tokens']:>8}{r['tok_s']:>9}{r.get('x_local', ''):>9}"
            f"{r.get('identical_texts_vs_local') or '':>11}{r.get('load_1m') or '':>6}{extra}"
        )
        if "steady_tok_s" in r:
            print(
                f"{'   steady: generation inside the actors':<52}{r['steady_s']:>8}"
                f"{r['tokens']:>8}{r['steady_tok_s']:>9}{r.get('steady_x_local', ''):>9}"
                f"{'':>17}  (start-up, load, Ray: {r['startup_and_overhead_s']}s)"
            )
    if results.get("ray_info"):
        print(f"Ray start-up (ray.init): {results['ray_info']['init_s']}s")
    o = results.get("server_overhead")
    if o:
        print(
            f"\nAligner.from_server overhead vs the server alone ({o['rounds']} alternating rounds, "
            f"{o['concurrency']} in flight): best-of {o['overhead_pct_best']}%, median {o['overhead_pct_median']}%, "
            f"per round {o['overhead_pct_per_round']} (target < {o['target_pct']}%); same tokens each round: "
            f"{o['same_tokens_each_round']}, identical texts {o['identical_texts_raw_vs_aligner']}"
        )
        print(f"  client CPU per round (s): raw {o['client_cpu_s_raw']}, Aligner {o['client_cpu_s_aligner']}")
    n = results.get("ngram")
    if n:
        print(
            f"\nn-gram speculative decoding on the vLLM server, copy-edit set ({results['settings']['copy_pairs']} "
            f"pairs, max {results['settings']['copy_max_new_tokens']} tokens, similarity to answer "
            f"{n['batch1']['similarity_to_answer']}):"
        )
        for mode, label in (("batch1", "batch 1 (sequential)"), ("concurrent", "all at once")):
            d = n[mode]
            acc = d["acceptance"] or {}
            print(
                f"  {label:<22} plain {d['plain_s']:>6}s {d['plain_tok_s']:>7} tok/s | n-gram {d['spec_s']:>6}s "
                f"{d['spec_tok_s']:>7} tok/s | speed-up {d['speedup']}x | identical {d['identical_texts']} | "
                f"tokens {d['plain_tokens']}/{d['spec_tokens']} | acceptance {acc.get('acceptance_rate')} "
                f"(mean length {acc.get('mean_acceptance_length')})"
            )
    for k, v in results["servers"].items():
        print(f"{k}: healthy after {v['startup_s']}s")
    for k, v in results["not_measured"].items():
        print(f"{k}: not measured: {v}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Aligner engines side by side: local, vLLM server (alone and via "
        "the Aligner, with and without n-gram speculation), vLLM in-process, Ray."
    )
    parser.add_argument("--pairs", type=int, default=32, help="pairs from pairs32.jsonl (cycled)")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--copy-max-new-tokens", type=int, default=64, help="max tokens on the copy-edit set")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds of server alone vs Aligner")
    parser.add_argument(
        "--copy-rounds", type=int, default=1, help="rounds per mode on the copy-edit set (best)"
    )
    parser.add_argument(
        "--local-runs", type=int, default=2, help="correct_batch runs of the in-process engines (best)"
    )
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per server request")
    parser.add_argument("--server-start-timeout", type=float, default=300.0)
    parser.add_argument("--worker-timeout", type=float, default=420.0)
    parser.add_argument("--vllm-kwargs", default="{}", help="JSON keyword arguments for engine='vllm'")
    parser.add_argument(
        "--vllm-variants",
        default="default,plain",
        help=f"in-process vLLM runs, one engine each: {','.join(VLLM_VARIANTS)}",
    )
    parser.add_argument(
        "--ray-cpus",
        type=float,
        default=None,
        help="num_cpus per Ray replica (default: the library's, 1); ray.init gets 2 CPUs",
    )
    parser.add_argument("--skip", default="", help=f"comma-separated parts to skip: {','.join(PARTS)}")
    parser.add_argument("--json", metavar="PATH", help="write the results as JSON to PATH ('-' for stdout)")
    parser.add_argument("--worker", choices=["vllm-inprocess"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker_vllm(args)
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    unknown = skip - set(PARTS)
    if unknown:
        parser.error(f"unknown part(s) in --skip: {sorted(unknown)}; choose from {','.join(PARTS)}")
    parts = set(PARTS) - skip

    def on_term(signum: int, _frame: Any) -> None:
        raise SystemExit(128 + signum)  # run the finally blocks: servers and children get stopped

    signal.signal(signal.SIGTERM, on_term)
    import torch

    from aligner_core import DEFAULT_MODEL

    pairs = load("pairs32.jsonl", args.pairs)
    results: dict[str, Any] = {
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "transformers": version("transformers"),
            "ray": version("ray"),
            "vllm": None,
            "loadavg_start": loadavg(),
            "mem_total_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        },
        "settings": {
            "model": DEFAULT_MODEL,
            "dtype": "float32",
            "pairs": len(pairs),
            "max_new_tokens": args.max_new_tokens,
            "copy_pairs": len(load("copyedit8.jsonl")),
            "copy_max_new_tokens": args.copy_max_new_tokens,
            "rounds": args.rounds,
            "copy_rounds": args.copy_rounds,
            "local_runs": args.local_runs,
            "concurrency": args.concurrency,
            "skipped": sorted(skip),
            "greedy": True,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        },
        "rows": [],
        "servers": {},
        "not_measured": {},
    }
    with Timer() as total:
        if "local" in parts:
            log("local engine")
            try:
                results["rows"].append(run_local(pairs, args.max_new_tokens, args.local_runs))
            except Exception as exc:
                traceback.print_exc()
                results["not_measured"]["local"] = why(exc)
        if parts & {"server", "ngram"}:
            run_servers(parts, pairs, args, results)
        if "vllm-inprocess" in parts:
            run_vllm_inprocess(args, results)
        if "ray" in parts:
            run_ray(pairs, args.max_new_tokens, args.ray_cpus, results)
    results["settings"]["total_s"] = round(total.seconds, 1)
    finish(results)
    print_table(results)
    if args.json:
        text = json.dumps(results, indent=2)
        if args.json == "-":
            print(text)
        else:
            Path(args.json).write_text(text + "\n")
            log(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
