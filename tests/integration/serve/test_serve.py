"""``aligner serve`` as a real process on 127.0.0.1 in front of the real vLLM CPU server, driven by the
official ``openai`` client and by ``curl``: plain and streamed completions (the raw upstream text never in
the stream), 200 concurrent requests each matched to its own answer, 429 under overload, an upstream that
drops the connection mid-request, 401, 413 and 400."""

from __future__ import annotations

import asyncio
import contextlib
import difflib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.vllm_server]
openai = pytest.importorskip("openai")
pytest.importorskip("starlette")
httpx = pytest.importorskip("httpx")

KEY = "proxy-key-0123456789"
UPSTREAM_KEY = "sk-upstream-never-echoed-42"
QUESTION = "What is the capital of Australia?"
CHANGED = (
    "Tell me a joke."  # a question whose upstream answer the packaged Aligner rewrites (greedy, so always)
)
CURL = shutil.which("curl")


class ProxyProcess:
    """One ``aligner serve`` process, stopped by its PID (and its process group) at the end."""

    def __init__(self, args: list[str], log: Path, key: str | None) -> None:
        from tests.fixtures.servers.vllm_server import free_port

        self.port = free_port()
        self.log = log
        self.key = key
        env = {
            **os.environ,
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "ALIGNER_UPSTREAM_API_KEY": UPSTREAM_KEY,
        }
        cmd = [
            sys.executable,
            "-m",
            "aligner_core",
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            *args,
        ]
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(
                cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"} if self.key else {}

    def wait_healthy(self, timeout: float = 240.0) -> ProxyProcess:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"aligner serve exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}"
                )
            with contextlib.suppress(OSError):
                req = urllib.request.Request(f"http://127.0.0.1:{self.port}/health", headers=self.headers)
                with urllib.request.urlopen(req, timeout=2) as resp:
                    if resp.status == 200:
                        return self
            time.sleep(0.5)
        raise TimeoutError(
            f"aligner serve was not healthy after {timeout:.0f}s:\n{self.log.read_text()[-3000:]}"
        )

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=20)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # anything left in its group
        if self.proc.poll() is None:
            self.proc.wait(timeout=10)


@pytest.fixture(scope="module")
def proxy(vllm_server, tmp_path_factory):
    """Upstream: the vLLM server. Aligner: the packaged SmolLM2 on the local transformers engine. API key on."""
    p = ProxyProcess(
        [
            "--upstream",
            vllm_server.url,
            "--upstream-model",
            vllm_server.model,
            "--max-new-tokens",
            "8",
            "--api-key",
            KEY,
            "--max-body-bytes",
            "65536",
            "--max-queue",
            "256",
        ],
        tmp_path_factory.mktemp("serve") / "proxy.log",
        KEY,
    )
    try:
        yield p.wait_healthy()
    finally:
        p.stop()


@pytest.fixture(scope="module")
def fault_proxy(vllm_server):
    from tests.fixtures.servers.fault_proxy import FaultProxy

    fp = FaultProxy(vllm_server.url.removesuffix("/v1"))
    yield fp
    fp.close()


@pytest.fixture(scope="module")
def small_proxy(vllm_server, fault_proxy, tmp_path_factory):
    """Upstream: the vLLM server behind a fault-injecting proxy. Aligner: on the vLLM server. Queue limit 2."""
    p = ProxyProcess(
        [
            "--upstream",
            fault_proxy.url,
            "--upstream-model",
            vllm_server.model,
            "--upstream-timeout",
            "3",
            "--aligner-server",
            vllm_server.url,
            "--aligner-model",
            vllm_server.model,
            "--max-new-tokens",
            "16",
            "--max-queue",
            "2",
            "--max-batch-items",
            "2",
        ],
        tmp_path_factory.mktemp("serve-small") / "proxy.log",
        None,
    )
    try:
        yield p.wait_healthy()
    finally:
        p.stop()


def client(p: ProxyProcess, **kwargs) -> openai.OpenAI:
    return openai.OpenAI(base_url=p.url, api_key=p.key or "unused", max_retries=0, timeout=300, **kwargs)


def direct_answer(vllm_server, question: str, max_tokens: int) -> str:
    """What the upstream says when called directly (greedy, so the proxy's upstream call says the same)."""
    upstream = openai.OpenAI(base_url=vllm_server.url, api_key="unused", max_retries=0, timeout=300)
    resp = upstream.chat.completions.create(
        model=vllm_server.model,
        max_tokens=max_tokens,
        temperature=0,
        messages=[{"role": "user", "content": question}],
    )
    return resp.choices[0].message.content


def curl(*args: str, data: str | None = None) -> subprocess.CompletedProcess:
    if CURL is None:
        pytest.skip("curl is not installed")
    return subprocess.run([CURL, "-sS", *args], input=data, capture_output=True, text=True, timeout=300)


def wait_idle(p: ProxyProcess, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        req = urllib.request.Request(f"http://127.0.0.1:{p.port}/health", headers=p.headers)
        if json.load(urllib.request.urlopen(req, timeout=5))["in_progress"] == 0:
            return
        time.sleep(0.2)
    raise TimeoutError("the proxy still has requests in progress")


def test_openai_client_gets_the_correction_and_the_original(proxy, vllm_server):
    raw = direct_answer(vllm_server, QUESTION, 24)
    resp = client(proxy).chat.completions.create(
        model="smollm2", messages=[{"role": "user", "content": QUESTION}], max_tokens=24, temperature=0
    )
    details = resp.model_extra["aligner"]
    text = resp.choices[0].message.content
    assert details["original"] == raw and text and details["corrected"] is True
    assert details["changed"] == (text.strip() != raw.strip())
    expected = difflib.SequenceMatcher(None, raw.strip(), text.strip(), autojunk=False).ratio()
    assert details["similarity"] == pytest.approx(expected, abs=1e-6)
    from aligner_serve.budget import restating

    # room to restate the upstream's answer (at most 24 tokens), never the client's max_tokens
    assert details["template"] == "chat" and 0 < details["usage"]["completion_tokens"] <= restating(24)
    assert resp.model == vllm_server.model and details["upstream_usage"]["completion_tokens"] <= 24
    assert resp.usage.completion_tokens == details["usage"]["completion_tokens"]  # what the client got
    assert details["upstream_finish_reason"] in ("stop", "length")
    assert UPSTREAM_KEY not in resp.model_dump_json()


def test_a_stream_never_carries_the_raw_upstream_text(proxy, vllm_server):
    raw = direct_answer(vllm_server, CHANGED, 16)
    body = json.dumps(
        {
            "model": "smollm2",
            "messages": [{"role": "user", "content": CHANGED}],
            "max_tokens": 16,
            "temperature": 0,
            "stream": True,
        }
    )
    run = curl(
        "-N",
        "-H",
        f"Authorization: Bearer {KEY}",
        "-H",
        "Content-Type: application/json",
        f"{proxy.url}/chat/completions",
        "-d",
        "@-",
        data=body,
    )
    events = [e.removeprefix("data: ") for e in run.stdout.split("\n\n") if e.strip()]
    assert events[-1] == "[DONE]", run.stdout[-500:]
    chunks = [json.loads(e) for e in events[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    final = chunks[-1]["aligner"]
    assert final["changed"] is True, "the example must be one the Aligner changes"
    assert raw not in run.stdout and json.dumps(raw)[1:-1] not in run.stdout and "original" not in final
    assert text and text.strip() != raw.strip()

    stream = client(proxy).chat.completions.create(
        model="smollm2",
        messages=[{"role": "user", "content": CHANGED}],
        max_tokens=16,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    parts, usage = [], None
    for chunk in stream:
        if chunk.choices:
            parts.append(chunk.choices[0].delta.content or "")
        usage = chunk.usage or usage
    assert "".join(parts) == text and usage is not None and usage.total_tokens > 0


def test_curl_chat_completion_and_corrections(proxy):
    body = json.dumps(
        {
            "model": "smollm2",
            "messages": [{"role": "user", "content": "Name a fruit."}],
            "max_tokens": 8,
            "temperature": 0,
        }
    )
    run = curl(
        "-H",
        f"Authorization: Bearer {KEY}",
        "-H",
        "Content-Type: application/json",
        f"{proxy.url}/chat/completions",
        "-d",
        body,
    )
    data = json.loads(run.stdout)
    assert data["object"] == "chat.completion" and data["choices"][0]["message"]["content"]
    assert data["aligner"]["original"]

    batch = json.dumps(
        {
            "items": [
                {"question": "How many legs does a spider have?", "answer": "Spiders have six legs."},
                {"question": "Q?", "answer": " "},
            ],
            "max_new_tokens": 12,
        }
    )
    run = curl("-H", f"Authorization: Bearer {KEY}", f"{proxy.url}/corrections", "-d", batch)
    items = json.loads(run.stdout)["items"]
    assert (
        items[0]["original"] == "Spiders have six legs."
        and items[0]["text"]
        and items[0]["template"] == "chat"
    )
    assert items[1]["status"] == 400


def test_200_concurrent_requests_each_get_their_own_answer(proxy):
    async def main():
        async with openai.AsyncOpenAI(base_url=proxy.url, api_key=KEY, max_retries=0, timeout=600) as c:

            async def one(i):
                return await c.chat.completions.create(
                    model="smollm2",
                    messages=[{"role": "user", "content": f"Repeat this number: {1000 + i}"}],
                    max_tokens=4,
                    temperature=0,
                )  # "1000": its correction gets 4 + 8 tokens of room

            return await asyncio.gather(*(one(i) for i in range(200)))

    start = time.perf_counter()
    out = asyncio.run(main())
    elapsed = time.perf_counter() - start
    for i, resp in enumerate(out):
        details = resp.model_extra["aligner"]
        text = resp.choices[0].message.content
        assert str(1000 + i) in details["original"], (
            i,
            details["original"],
        )  # the upstream answered this request
        # ... and the correction is the one made of that answer: its similarity is computed from exactly these two
        expected = difflib.SequenceMatcher(
            None, details["original"].strip(), text.strip(), autojunk=False
        ).ratio()
        assert details["similarity"] == pytest.approx(expected, abs=1e-6), i
    print(f"200 concurrent requests through the proxy in {elapsed:.1f}s")
    metrics = (
        urllib.request.urlopen(
            urllib.request.Request(f"http://127.0.0.1:{proxy.port}/metrics", headers=proxy.headers)
        )
        .read()
        .decode()
    )
    assert 'aligner_serve_requests_total{endpoint="/v1/chat/completions",status="200"}' in metrics


def test_models_health_metrics_and_multi_turn(proxy, vllm_server):
    c = client(proxy)
    models = c.models.list()
    assert [m.id for m in models] == [vllm_server.model]
    assert models.data[0].model_extra["max_model_len"] == 2048  # the upstream's fields are kept
    with pytest.raises(openai.NotFoundError):  # a model nobody maps goes upstream, and vLLM answers it
        c.chat.completions.create(
            model="no-such-model", messages=[{"role": "user", "content": "Hi"}], max_tokens=4
        )
    resp = c.chat.completions.create(
        model="smollm2",
        max_tokens=8,
        temperature=0,
        messages=[
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Hi, I am Ann."},
            {"role": "assistant", "content": "Hello Ann."},
            {"role": "user", "content": "What is my name?"},
        ],
    )
    assert resp.model_extra["aligner"].get("history_turns") == 3
    run = curl("-H", f"Authorization: Bearer {KEY}", f"http://127.0.0.1:{proxy.port}/metrics")
    for name in (
        "aligner_serve_requests_total",
        "aligner_serve_corrections_total",
        "aligner_serve_changed_share",
        "aligner_serve_request_latency_seconds_bucket",
        'aligner_serve_tokens_total{kind="completion"',
    ):
        assert name in run.stdout, name


def test_wrong_key_oversized_body_and_malformed_json(proxy):
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=proxy.url, api_key="wrong", max_retries=0).chat.completions.create(
            model="smollm2", messages=[{"role": "user", "content": "Hi"}]
        )
    run = curl("-o", "/dev/null", "-w", "%{http_code}", f"{proxy.url}/models")
    assert run.stdout == "401"
    big = json.dumps({"model": "smollm2", "messages": [{"role": "user", "content": "x" * 100_000}]})
    run = curl(
        "-w",
        "\n%{http_code}",
        "-H",
        f"Authorization: Bearer {KEY}",
        "-H",
        "Content-Type: application/json",
        f"{proxy.url}/chat/completions",
        "--data-binary",
        "@-",
        data=big,
    )
    assert run.stdout.endswith("\n413") and "request_too_large" in run.stdout
    run = curl(
        "-w",
        "\n%{http_code}",
        "-H",
        f"Authorization: Bearer {KEY}",
        f"{proxy.url}/chat/completions",
        "-d",
        '{"model": "smollm2", "messages": [',
    )
    assert run.stdout.endswith("\n400") and "invalid_json" in run.stdout
    assert proxy.alive()
    log = proxy.log.read_text()
    assert KEY not in log and UPSTREAM_KEY not in log  # no secrets in the logs


def test_past_the_queue_limit_the_proxy_answers_429_with_retry_after(small_proxy):
    async def main():
        async with httpx.AsyncClient(timeout=300) as c:
            return await asyncio.gather(
                *(
                    c.post(
                        f"{small_proxy.url}/chat/completions",
                        json={
                            "model": "smollm2",
                            "messages": [{"role": "user", "content": f"Count to {i}."}],
                            "max_tokens": 8,
                            "temperature": 0,
                        },
                    )
                    for i in range(12)
                )
            )

    start = time.perf_counter()
    out = asyncio.run(main())
    codes = sorted(r.status_code for r in out)
    assert set(codes) == {200, 429} and codes.count(200) >= 1 and codes.count(429) >= 8, codes
    rejected = [r for r in out if r.status_code == 429]
    assert all(int(r.headers["retry-after"]) >= 1 for r in rejected)
    assert all(r.json()["error"]["type"] == "rate_limit_error" for r in rejected)
    assert time.perf_counter() - start < 120  # refused at once, never left hanging
    with pytest.raises(openai.RateLimitError):  # the official client sees its usual error type

        async def burst():
            async with openai.AsyncOpenAI(base_url=small_proxy.url, api_key="unused", max_retries=0) as c:
                await asyncio.gather(
                    *(
                        c.chat.completions.create(
                            model="smollm2", messages=[{"role": "user", "content": "Hi"}], max_tokens=8
                        )
                        for _ in range(6)
                    )
                )

        asyncio.run(burst())
    wait_idle(small_proxy)  # the burst's admitted requests were cancelled: their client hung up
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{small_proxy.port}/metrics").read().decode()
    assert 'aligner_serve_requests_total{endpoint="/v1/chat/completions",status="499"}' in metrics
    assert (
        client(small_proxy)
        .chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "Hi"}], max_tokens=8)
        .choices[0]
        .message.content
    )


def test_an_upstream_that_dies_mid_request_gives_502_and_the_proxy_stays_up(small_proxy, fault_proxy):
    wait_idle(small_proxy)
    c = client(small_proxy)
    fault_proxy.faults.append("drop")  # the upstream reads the request, then its connection dies
    with pytest.raises(openai.APIStatusError) as info:
        c.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "Hi"}], max_tokens=8)
    assert info.value.status_code == 502 and "failed the request" in info.value.message
    fault_proxy.faults.append("503")  # an upstream error status is passed back as it came
    with pytest.raises(openai.APIStatusError) as info:
        c.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "Hi"}], max_tokens=8)
    assert info.value.status_code == 503 and "injected 503" in info.value.message
    fault_proxy.faults.append("slow")  # 5 s, over --upstream-timeout 3
    with pytest.raises(openai.APIStatusError) as info:
        c.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "Hi"}], max_tokens=8)
    assert info.value.status_code == 504
    fault_proxy.faults.append("drop")  # streamed: the error comes before any event
    run = curl(
        "-w",
        "\n%{http_code}",
        f"{small_proxy.url}/chat/completions",
        "-d",
        '{"model": "smollm2", "stream": true, "messages": [{"role": "user", "content": "Hi"}]}',
    )
    assert run.stdout.endswith("\n502") and "data:" not in run.stdout
    assert small_proxy.alive()
    ok = c.chat.completions.create(
        model="smollm2", messages=[{"role": "user", "content": "Hi"}], max_tokens=8
    )
    assert ok.choices[0].message.content and ok.model_extra["aligner"]["corrected"]
