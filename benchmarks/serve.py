"""``aligner serve`` against calling the upstream directly, side by side in one run.

    python -m benchmarks.serve [--upstream URL --upstream-model NAME] [--concurrency 1,32]
                               [--requests-per-client 4] [--max-tokens 16] [--aligner-engine transformers|llama.cpp|auto]
                               [--aligner-server URL] [--json PATH]

The upstream is the vLLM CPU server serving the packaged SmolLM2 (``$ALIGNER_TEST_VLLM_URL``, ``--upstream``, or
one started here with tests/fixtures/servers/vllm_server.py and stopped at the end). The proxy is a real ``aligner serve``
process on 127.0.0.1 (Aligner: the packaged SmolLM2 on a local engine, ``--aligner-engine``, or ``--aligner-server``).
For each concurrency level, ``c`` clients each send ``--requests-per-client`` chat completions one after the
other (greedy, ``max_tokens``; questions from benchmarks/data/pairs32.jsonl), first straight to the upstream, then
through the proxy, then straight to the upstream again (the direct figure is the better of the two runs).
Reported: requests/s, median and p95 latency, the latency the proxy adds (median through the proxy minus
median direct), and how much of that is the correction itself (the ``aligner.latency_s`` each response
reports) versus the proxy's own HTTP/JSON work.

Then the same questions are streamed one at a time (``stream: true``, ``--stream-requests``), straight to the
upstream and through the proxy, for the time to the first token (TTFT): the proxy can only start once the
upstream's whole answer is in (it corrects the whole answer), so its TTFT splits into the upstream's whole answer
and the correction up to its first token, both measured in the same request (the proxy's ``Server-Timing`` header:
``upstream;dur=..., aligner;dur=...``). Every process started here is stopped by its PID.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
DATA = Path(__file__).parent / "data"


def questions(n: int) -> list[str]:
    rows = [json.loads(line) for line in (DATA / "pairs32.jsonl").read_text().splitlines() if line.strip()]
    return [rows[i % len(rows)]["question"] for i in range(n)]


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def drive(
    url: str, model: str, clients: int, per_client: int, max_tokens: int, headers: dict[str, str]
) -> dict[str, Any]:
    """``clients`` concurrent clients, each sending its requests one after the other."""
    import httpx

    latencies: list[float] = []
    corrections: list[float] = []
    errors: list[str] = []
    qs = questions(clients * per_client)

    async def client(c: httpx.AsyncClient, k: int) -> None:
        for j in range(per_client):
            body = {
                "model": model,
                "max_tokens": max_tokens,
                "temperature": 0,
                "messages": [{"role": "user", "content": qs[k * per_client + j]}],
            }
            start = time.perf_counter()
            resp = await c.post(f"{url}/chat/completions", json=body, headers=headers)
            latencies.append(time.perf_counter() - start)
            if resp.status_code != 200:
                errors.append(f"{resp.status_code}: {resp.text[:200]}")
                continue
            details = resp.json().get("aligner")
            if details and details.get("latency_s") is not None:
                corrections.append(details["latency_s"])

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=600, limits=limits) as c:
        start = time.perf_counter()
        await asyncio.gather(*(client(c, k) for k in range(clients)))
        wall = time.perf_counter() - start
    n = len(latencies)
    return {
        "requests": n,
        "errors": len(errors),
        "first_error": errors[0] if errors else None,
        "seconds": round(wall, 2),
        "req_s": round(n / wall, 3),
        "median_ms": round(1000 * statistics.median(latencies), 1),
        "p95_ms": round(1000 * pct(latencies, 0.95), 1),
        "correction_median_ms": round(1000 * statistics.median(corrections), 1) if corrections else None,
    }


async def first_tokens(url: str, model: str, n: int, max_tokens: int) -> dict[str, Any]:
    """``n`` streamed requests one after the other: time to the first content delta, and to the end."""
    import httpx

    ttft: list[float] = []
    total: list[float] = []
    parts: dict[str, list[float]] = {}
    qs = questions(n)
    async with httpx.AsyncClient(timeout=600) as c:
        for q in qs:
            body = {
                "model": model,
                "max_tokens": max_tokens,
                "temperature": 0,
                "stream": True,
                "messages": [{"role": "user", "content": q}],
            }
            start = time.perf_counter()
            first = None
            async with c.stream("POST", f"{url}/chat/completions", json=body) as resp:
                resp.raise_for_status()
                for item in resp.headers.get("server-timing", "").split(","):  # the proxy's own split
                    name, _, dur = item.strip().partition(";dur=")
                    if name and dur:
                        parts.setdefault(name, []).append(float(dur))
                async for line in resp.aiter_lines():
                    if first is None and line.startswith("data: {"):
                        choices = json.loads(line[6:]).get("choices") or [{}]
                        if (choices[0].get("delta") or {}).get("content"):
                            first = time.perf_counter() - start
            total.append(time.perf_counter() - start)
            ttft.append(first if first is not None else total[-1])
    return {
        "requests": n,
        "ttft_median_ms": round(1000 * statistics.median(ttft), 1),
        "ttft_p95_ms": round(1000 * pct(ttft, 0.95), 1),
        "total_median_ms": round(1000 * statistics.median(total), 1),
        **{f"{name}_median_ms": round(statistics.median(v), 1) for name, v in parts.items()},
    }


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_health(url: str, proc: subprocess.Popen | None, log: Path | None, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(
                f"the process exited ({proc.returncode}):\n{log.read_text()[-2000:] if log else ''}"
            )
        with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=2) as resp:
            if resp.status == 200:
                return
        time.sleep(0.5)
    raise TimeoutError(f"{url} was not healthy after {timeout:.0f}s")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=20)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    if proc.poll() is None:
        proc.wait(timeout=10)


def local_engine(requested: str) -> str:
    """The engine ``aligner serve --aligner-engine requested`` runs the packaged model on, on this machine."""
    from aligner_core.engines.choosing import canonical, choose_engine
    from aligner_core.loading import DEFAULT_MODEL

    name = canonical(requested)
    return choose_engine(DEFAULT_MODEL, hint=False) if name == "auto" else name


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--upstream", help="upstream URL (default: $ALIGNER_TEST_VLLM_URL, else a vLLM server started here)"
    )
    parser.add_argument("--upstream-model", default="smollm2", help="upstream model name (default: smollm2)")
    parser.add_argument(
        "--aligner-server", help="run the Aligner on this server instead of in the proxy process"
    )
    parser.add_argument("--aligner-model", help="the Aligner's name on --aligner-server")
    parser.add_argument(
        "--aligner-engine",
        default="transformers",
        help="the proxy's local engine for the Aligner: transformers (the proxy's default), llama.cpp or auto",
    )
    parser.add_argument(
        "--concurrency", default="1,32", help="client counts, comma-separated (default: 1,32)"
    )
    parser.add_argument(
        "--requests-per-client", type=int, default=4, help="requests each client sends (default: 4)"
    )
    parser.add_argument(
        "--max-tokens", type=int, default=16, help="max_tokens of every request (default: 16)"
    )
    parser.add_argument(
        "--stream-requests",
        type=int,
        default=8,
        help="streamed requests each way for the time to first token (default: 8; 0 skips it)",
    )
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)
    levels = [int(x) for x in args.concurrency.split(",")]

    started: list[subprocess.Popen] = []
    workdir = Path(tempfile.mkdtemp(prefix="aligner-bench-serve-"))
    vllm = None
    try:
        upstream = args.upstream or os.environ.get("ALIGNER_TEST_VLLM_URL")
        if upstream is None:
            sys.path.insert(0, str(ROOT))
            from tests.fixtures.servers import vllm_server as vs

            print("starting a vLLM CPU server for the upstream ...", file=sys.stderr)
            vllm = vs.start().wait_healthy()
            upstream = vllm.url
        wait_health(upstream.removesuffix("/v1") + "/health", None, None, 600)
        port = free_port()
        log = workdir / "proxy.log"
        aligner = (
            (
                ["--aligner-server", args.aligner_server]
                + (["--aligner-model", args.aligner_model] if args.aligner_model else [])
            )
            if args.aligner_server
            else ["--aligner-engine", args.aligner_engine]
        )
        cmd = [
            sys.executable,
            "-m",
            "aligner_core",
            "serve",
            "--upstream",
            upstream,
            "--upstream-model",
            args.upstream_model,
            "--port",
            str(port),
            "--max-new-tokens",
            str(args.max_tokens),
            "--max-queue",
            "1024",
            "--log-level",
            "warning",
            *aligner,
        ]
        with open(log, "wb") as out:
            proxy = subprocess.Popen(
                cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, cwd=ROOT
            )
        started.append(proxy)
        wait_health(f"http://127.0.0.1:{port}/health", proxy, log, 300)
        proxy_url = f"http://127.0.0.1:{port}/v1"
        # One warm-up request each way (model caches, connection pools).
        asyncio.run(drive(upstream, args.upstream_model, 1, 1, args.max_tokens, {}))
        asyncio.run(drive(proxy_url, args.upstream_model, 1, 1, args.max_tokens, {}))

        rows = []
        for c in levels:
            print(f"{c} client(s) x {args.requests_per_client} requests ...", file=sys.stderr)
            run = {
                name: asyncio.run(
                    drive(url, args.upstream_model, c, args.requests_per_client, args.max_tokens, {})
                )
                for name, url in (("direct_a", upstream), ("proxy", proxy_url), ("direct_b", upstream))
            }
            direct = min(run["direct_a"], run["direct_b"], key=lambda r: r["median_ms"])
            prox = run["proxy"]
            added = prox["median_ms"] - direct["median_ms"]
            correction = prox["correction_median_ms"] or 0.0
            rows.append(
                {
                    "clients": c,
                    "direct": direct,
                    "direct_runs": [run["direct_a"], run["direct_b"]],
                    "proxy": prox,
                    "added_latency_ms": round(added, 1),
                    "added_minus_correction_ms": round(added - correction, 1),
                    "req_s_ratio_proxy_over_direct": round(prox["req_s"] / direct["req_s"], 3),
                }
            )
        ttft = None
        if args.stream_requests > 0:
            print(
                f"time to first token, {args.stream_requests} streamed requests each way ...", file=sys.stderr
            )
            direct_stream = asyncio.run(
                first_tokens(upstream, args.upstream_model, args.stream_requests, args.max_tokens)
            )
            proxy_stream = asyncio.run(
                first_tokens(proxy_url, args.upstream_model, args.stream_requests, args.max_tokens)
            )
            added = proxy_stream["ttft_median_ms"] - direct_stream["ttft_median_ms"]
            ttft = {
                "direct": direct_stream,
                "proxy": proxy_stream,
                "added_ttft_ms": round(added, 1),
                "upstream_whole_answer_ms": proxy_stream.get("upstream_median_ms"),
                "correction_to_first_token_ms": proxy_stream.get("aligner_median_ms"),
            }
        result = {
            "machine": {
                "platform": platform.platform(),
                "cpu_count": os.cpu_count(),
                "python": platform.python_version(),
                "loadavg": list(os.getloadavg()),
            },
            "settings": {
                "upstream": "vLLM CPU server, SmolLM2-135M-Instruct float32 (tests/fixtures/servers/vllm_server.py)",
                "aligner": f"server {args.aligner_server}"
                if args.aligner_server
                else f"packaged SmolLM2-135M-Instruct, local {local_engine(args.aligner_engine)} engine in the proxy process",
                "max_tokens": args.max_tokens,
                "requests_per_client": args.requests_per_client,
                "greedy": True,
            },
            "rows": rows,
            "time_to_first_token": ttft,
        }
        print(
            f"{'clients':>7} | {'direct req/s':>12} | {'proxy req/s':>11} | {'direct p50 ms':>13} | "
            f"{'proxy p50 ms':>12} | {'added ms':>8} | {'of which correction ms':>22}"
        )
        for r in rows:
            print(
                f"{r['clients']:>7} | {r['direct']['req_s']:>12} | {r['proxy']['req_s']:>11} | "
                f"{r['direct']['median_ms']:>13} | {r['proxy']['median_ms']:>12} | {r['added_latency_ms']:>8} | "
                f"{r['proxy']['correction_median_ms']:>22}"
            )
        if ttft is not None:
            print(
                f"time to first token (median ms): direct {ttft['direct']['ttft_median_ms']}, through the proxy "
                f"{ttft['proxy']['ttft_median_ms']} (+{ttft['added_ttft_ms']}); in the proxy: the upstream's whole "
                f"answer {ttft['upstream_whole_answer_ms']}, the correction to its first token "
                f"{ttft['correction_to_first_token_ms']}"
            )
        if args.json:
            args.json.write_text(json.dumps(result, indent=2) + "\n")
        return 0
    finally:
        for proc in started:
            stop(proc)
        if vllm is not None:
            vllm.stop()
        import shutil

        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
