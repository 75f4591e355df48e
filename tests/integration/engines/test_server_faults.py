"""Faults on the server path, with real servers: retries through a fault-injecting proxy in front of
the session's vLLM server, and a second vLLM server killed mid-run (Python batch and CLI file job,
then ``--resume`` on the session's server: nothing lost, nothing duplicated)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import pytest

from aligner_core import Aligner
from aligner_core.errors import ServerUnavailableError

pytestmark = [pytest.mark.integration, pytest.mark.vllm_server]
pytest.importorskip("httpx")

QA = ("What is the capital of France?", "The capital of France is Lyon.")


@pytest.fixture
def proxy_factory(vllm_server):
    from tests.fixtures.servers.fault_proxy import FaultProxy

    made: list[FaultProxy] = []

    def make(faults, **kwargs):
        p = FaultProxy(vllm_server.url.removesuffix("/v1"), faults, **kwargs)
        made.append(p)
        return p

    yield make
    for p in made:
        p.close()


@pytest.mark.parametrize("faults", [["503", "503"], ["drop"], ["429"]])
def test_transient_faults_are_retried_until_the_answer_comes(proxy_factory, vllm_server, faults):
    proxy = proxy_factory(faults, retry_after=1.0)
    with Aligner.from_server(
        proxy.url, model=vllm_server.model, template="chat", max_retries=3, max_new_tokens=8
    ) as a:
        start = time.perf_counter()
        out = a.correct(*QA)
        elapsed = time.perf_counter() - start
    with Aligner.from_server(vllm_server.url, max_new_tokens=8) as direct:
        assert out.text == direct.correct(*QA).text
    tried = [h for h in proxy.hits if h[1].endswith("completions")]
    assert [h[2] for h in tried] == [*faults, "pass"]
    if faults == ["429"]:
        assert elapsed >= 1.0, "Retry-After must be honoured"


def test_persistent_503_fails_that_request_only_after_max_retries(proxy_factory, vllm_server):
    proxy = proxy_factory(["pass", "503", "503", "503"])  # the first request passes, the second keeps failing
    with Aligner.from_server(
        proxy.url,
        model=vllm_server.model,
        template="chat",
        max_retries=2,
        max_new_tokens=8,
        max_concurrency=1,
    ) as a:
        out = a.correct_batch([QA, ("Q2?", "A2.")], return_exceptions=True)
    assert not isinstance(out[0], Exception)
    assert isinstance(out[1], ServerUnavailableError) and out[1].status == 503
    assert (
        "503" in str(out[1])
        and proxy.url.removesuffix("/v1") in str(out[1])
        and "injected 503" in str(out[1])
    )
    assert [h[2] for h in proxy.hits if h[1].endswith("completions")] == ["pass", "503", "503", "503"]


def test_streaming_retries_only_before_the_first_token(proxy_factory, vllm_server):
    proxy = proxy_factory(["503"])
    with Aligner.from_server(proxy.url, model=vllm_server.model, template="chat", max_new_tokens=12) as a:
        stream = a.stream(*QA)
        text = "".join(stream)
    assert text == stream.correction.text and text


def _read_rows(path):
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_server_killed_mid_run_fails_only_unfinished_requests_and_resume_loses_nothing(vllm_server, tmp_path):
    from tests.fixtures.servers import vllm_server as vs

    doomed = vs.start().wait_healthy()
    try:
        # A file job through the CLI and a Python batch, both on the server about to die.
        n = 40
        src = tmp_path / "in.jsonl"
        src.write_text(
            "".join(
                json.dumps({"id": i, "question": f"What is {i} plus {i}?", "answer": f"It is {2 * i + 1}."})
                + "\n"
                for i in range(n)
            )
        )
        out = tmp_path / "out.jsonl"
        base = [
            sys.executable,
            "-m",
            "aligner_core.cli",
            "correct",
            str(src),
            "-o",
            str(out),
            "--max-new-tokens",
            "12",
            "--chunk-size",
            "4",
            "--no-progress",
            "--max-retries",
            "1",
            "--max-concurrency",
            "4",
        ]
        cli = subprocess.Popen(
            [*base, "--server", doomed.url],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "HF_HUB_OFFLINE": "1"},
        )
        batch_result: dict[str, object] = {}
        pairs = [(f"Name a colour, {i}.", f"Colour number {i} is blue.") for i in range(300)]

        def run_batch():
            with Aligner.from_server(doomed.url, max_new_tokens=12, max_retries=1, max_concurrency=4) as a:
                batch_result["out"] = a.correct_batch(pairs, return_exceptions=True)

        worker = threading.Thread(target=run_batch)
        worker.start()
        deadline = time.monotonic() + 300
        while len(_read_rows(out)) < 8 and time.monotonic() < deadline and cli.poll() is None:
            time.sleep(0.2)
        assert 8 <= len(_read_rows(out)) < n, "the kill must land mid-run"
        doomed.kill()
        _, err = cli.communicate(timeout=120)
        worker.join(timeout=120)
        assert not worker.is_alive(), "a dead server must not hang the batch"
    finally:
        doomed.stop()

    # The CLI stopped with a clear message and kept what it had; no row was recorded as failed.
    assert cli.returncode == 3, err
    assert "--resume" in err and doomed.url.removesuffix("/v1") in err
    partial = _read_rows(out)
    assert [r["id"] for r in partial] == list(range(len(partial))) and all(r["correction"] for r in partial)

    # The Python batch: finished requests kept their result, the rest failed alone with the server named.
    results = batch_result["out"]
    done = [r for r in results if not isinstance(r, Exception)]
    failed = [r for r in results if isinstance(r, Exception)]
    assert done and failed and len(done) + len(failed) == len(pairs)
    assert all(isinstance(e, ServerUnavailableError) for e in failed), {type(e).__name__ for e in failed}
    assert all(c.question == q for c, (q, _) in zip(results, pairs) if not isinstance(c, Exception))

    # Resume on the session's server (same model): every row once, in order.
    resumed = subprocess.run(
        [*base, "--server", vllm_server.url, "--resume"],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr
    rows = _read_rows(out)
    assert [r["id"] for r in rows] == list(range(n))
    assert all(r["correction"] and "aligner_error" not in r for r in rows)
    assert f"{len(partial)} already done" in resumed.stderr


def test_cli_killed_mid_run_on_the_server_then_resumed_loses_and_duplicates_nothing(vllm_server, tmp_path):
    import signal

    n = 48
    src = tmp_path / "in.jsonl"
    src.write_text(
        "".join(
            json.dumps({"id": i, "question": f"Spell the number {i}.", "answer": f"{i} is spelled {i}{i}."})
            + "\n"
            for i in range(n)
        )
    )
    out = tmp_path / "out.jsonl"
    cmd = [
        sys.executable,
        "-m",
        "aligner_core.cli",
        "correct",
        str(src),
        "-o",
        str(out),
        "--server",
        vllm_server.url,
        "--max-new-tokens",
        "12",
        "--chunk-size",
        "4",
        "--max-concurrency",
        "2",
        "--no-progress",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    deadline = time.monotonic() + 300
    while len(_read_rows(out)) < 8 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    partial = len(_read_rows(out))
    assert 8 <= partial < n, "the kill must land mid-run"
    resumed = subprocess.run([*cmd, "--resume"], env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    rows = _read_rows(out)
    assert [r["id"] for r in rows] == list(range(n)) and all(r["correction"] for r in rows)
