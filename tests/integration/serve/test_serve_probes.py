"""The probes of issue 22, each against a real ``aligner serve`` process on loopback: the twelve rows (list and
unreadable content, a 50 MB answer, key files, ``n`` and the queue, a trickling upstream, JSON no server accepts,
a client that hangs up, SIGTERM, a malformed batch item, ``--max-queue`` alone, slow-loris clients) and the
response contract (stop, finish_reason, usage, logprobs, token limits, JSON on every status, models, ``n`` > 1
streams, the openai SDK's ``parse()`` and stream helper).

The upstream and the Aligner are one scripted server (``tests/fixtures/servers/fake_upstream.py``): no model is loaded, so
the proxy starts in seconds and every correction is known in advance. The real vLLM upstream and a real Aligner are
in test_serve.py and test_serve_patterns.py."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
openai = pytest.importorskip("openai")
pytest.importorskip("starlette")
httpx = pytest.importorskip("httpx")

from pydantic import BaseModel  # noqa: E402

from aligner_serve.budget import restating  # noqa: E402
from tests.fixtures.servers.fake_upstream import ALIGNER, MAX_MODEL_LEN, UPSTREAM, FakeUpstream  # noqa: E402
from tests.integration.serve.test_serve import ProxyProcess  # noqa: E402

KEY = "probe-key-0123456789"
QUESTION = "What is the capital of France?"


class City(BaseModel):
    name: str
    country: str


@pytest.fixture(scope="module")
def fake():
    server = FakeUpstream()
    yield server
    server.close()


def proxy_args(fake: FakeUpstream, *extra: str) -> list[str]:
    return [
        "--upstream",
        fake.url,
        "--upstream-model",
        UPSTREAM,
        "--aligner-server",
        fake.url,
        "--aligner-model",
        ALIGNER,
        "--max-new-tokens",
        "16",
        *extra,
    ]


@pytest.fixture(scope="module")
def proxy(fake, tmp_path_factory):
    """``--max-queue 8`` alone (row 10); the key in a file that starts with a UTF-8 BOM (row 3)."""
    folder = tmp_path_factory.mktemp("serve-probes")
    keys = folder / "keys.txt"
    keys.write_bytes(b"\xef\xbb\xbf" + KEY.encode() + b"\n# a comment\n")
    p = ProxyProcess(
        proxy_args(
            fake,
            "--served-model-name",
            "assistant",
            "--model-map",
            "gpt-4o=fake-up",
            "--api-key-file",
            str(keys),
            "--max-queue",
            "8",
            "--upstream-timeout",
            "3",
            "--max-upstream-bytes",
            "1000000",
            "--read-timeout",
            "2",
        ),
        folder / "proxy.log",
        KEY,
    )
    try:
        yield p.wait_healthy(timeout=120)
    finally:
        fake.release.set()
        p.stop()


@pytest.fixture(autouse=True)
def fresh_script(fake):
    fake.script.clear()
    fake.release.clear()
    fake.arrived.clear()
    yield
    fake.release.set()


def post(
    p: ProxyProcess, body: dict | None = None, path: str = "/chat/completions", **kwargs
) -> httpx.Response:
    return httpx.post(f"{p.url}{path}", json=body, headers=p.headers, timeout=120, **kwargs)


def chat(p: ProxyProcess, **body) -> httpx.Response:
    return post(p, {"model": UPSTREAM, "messages": [{"role": "user", "content": QUESTION}], **body})


def client(p: ProxyProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=p.url, api_key=KEY, max_retries=0, timeout=120)


def stream_chunks(resp: httpx.Response) -> list[dict]:
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream"), resp.text
    events = [e.removeprefix("data: ") for e in resp.text.split("\n\n") if e.strip()]
    assert events[-1] == "[DONE]", events[-1]
    return [json.loads(e) for e in events[:-1]]


def metrics(p: ProxyProcess) -> str:
    return httpx.get(f"http://127.0.0.1:{p.port}/metrics", headers=p.headers, timeout=30).text


def health(p: ProxyProcess) -> dict:
    return httpx.get(f"http://127.0.0.1:{p.port}/health", headers=p.headers, timeout=30).json()


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def in_thread(fn, *args, **kwargs) -> tuple[threading.Thread, dict]:
    out: dict = {}

    def run():
        try:
            out["value"] = fn(*args, **kwargs)
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            out["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, out


# -- the rows --------------------------------------------------------------------------------------------------


def test_row1_row11_text_parts_are_corrected_and_a_number_is_a_502_streamed_too(proxy, fake):
    fake.script.append(
        {
            "kind": "message",
            "message": {
                "role": "assistant",
                "content": [{"type": "text", "text": "Paris is "}, {"type": "text", "text": "the capital."}],
            },
        }
    )
    data = chat(proxy).json()
    assert data["choices"][0]["message"]["content"] == [
        {"type": "text", "text": "Corrected: Paris is the capital. (checked)"}
    ]
    assert data["aligner"]["corrected"] is True and data["aligner"]["original"] == "Paris is the capital."
    for stream in (False, True):
        calls = len(fake.aligner_bodies())
        fake.script.append({"kind": "message", "message": {"role": "assistant", "content": 12345}})
        resp = chat(proxy, stream=stream)
        assert resp.status_code == 502 and resp.json()["error"]["code"] == "unreadable_content"
        assert "12345" not in resp.text and "data:" not in resp.text and len(fake.aligner_bodies()) == calls


def test_row2_a_50mb_answer_is_a_fast_502_and_memory_stays(proxy, fake):
    before = rss_kib(proxy.proc.pid)
    fake.script.append({"kind": "huge", "size": 50_000_000})
    thread, out = in_thread(chat, proxy)
    assert health(proxy)["status"] == "ok"  # the event loop answers while the answer is refused
    thread.join(120)
    resp = out["value"]
    assert resp.status_code == 502 and resp.json()["error"]["code"] == "upstream_response_too_large"
    assert "--max-upstream-bytes" in resp.json()["error"]["message"]
    # Under the cap but far past the Aligner's context: counted off the event loop, a slice past the context at most.
    fake.script.append({"kind": "message", "message": {"role": "assistant", "content": "word " * 150_000}})
    thread, out = in_thread(chat, proxy)
    assert health(proxy)["status"] == "ok"
    thread.join(120)
    assert (
        out["value"].status_code == 400 and out["value"].json()["error"]["code"] == "context_length_exceeded"
    )
    assert f"context of {MAX_MODEL_LEN}" in out["value"].json()["error"]["message"]
    assert rss_kib(proxy.proc.pid) - before < 200 * 1024  # never the gigabytes of the probe
    assert chat(proxy).status_code == 200


@pytest.mark.parametrize(
    "content, says",
    [(b"# only a comment\n\n   \n", "holds no key"), ("clé\n".encode("latin-1"), "not UTF-8")],
)
def test_row3_a_key_file_without_keys_or_not_utf8_refuses_to_start_in_one_line(fake, tmp_path, content, says):
    keys = tmp_path / "keys.txt"
    keys.write_bytes(content)
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "aligner_core",
            "serve",
            *proxy_args(fake, "--api-key-file", str(keys)),
            "--port",
            "9",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert run.returncode == 2 and "Traceback" not in run.stderr
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and says in lines[0], run.stderr


def test_row3_a_key_after_a_bom_is_accepted(proxy):
    assert httpx.get(f"{proxy.url}/models", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
    with_bom = (
        b"Bearer \xef\xbb\xbf" + KEY.encode()
    )  # the key as it was in the file: the BOM was no part of it
    assert httpx.get(f"{proxy.url}/models", headers={"Authorization": with_bom}).status_code == 401


def test_row4_n_choices_take_n_places_and_max_n(proxy, fake):
    fake.script.append({"kind": "hold"})
    thread, out = in_thread(chat, proxy, n=6)
    assert fake.arrived.wait(60)
    assert health(proxy)["in_progress"] == 6
    full = chat(proxy, n=3)  # 6 + 3 > --max-queue 8
    assert (
        full.status_code == 429
        and full.json()["error"]["code"] == "queue_full"
        and full.headers["retry-after"]
    )
    over = chat(proxy, n=9)  # --max-n follows --max-queue 8
    assert over.status_code == 400 and over.json()["error"]["param"] == "n"
    fake.release.set()
    thread.join(60)
    data = out["value"].json()
    assert [c["aligner"]["corrected"] for c in data["choices"]] == [True] * 6
    assert [c["message"]["content"] for c in data["choices"]] == [
        f"Corrected: Answer {i} to: {QUESTION} (checked)" for i in range(6)
    ]


def test_row5_the_upstream_timeout_is_a_deadline_for_the_whole_answer(proxy, fake):
    fake.script.append({"kind": "trickle", "interval": 0.5})  # ~300 bytes: ~150 s at a byte per 0.5 s
    start = time.monotonic()
    resp = chat(proxy)
    elapsed = time.monotonic() - start
    assert resp.status_code == 504 and resp.json()["error"]["code"] == "upstream_timeout"
    assert 3 <= elapsed < 60  # after --upstream-timeout 3, long before the upstream would have finished


@pytest.mark.parametrize(
    "raw, says",
    [
        (b'{"model": "fake-up", "temperature": NaN, "messages": [{"role": "user", "content": "q"}]}', "NaN"),
        (
            b'{"model": "fake-up", "top_p": Infinity, "messages": [{"role": "user", "content": "q"}]}',
            "Infinity",
        ),
        (b'{"model": "fake-up", "messages": [{"role": "user", "content": "\\ud800"}]}', "lone surrogate"),
        (b'{"a": ' + b"[" * 40_000 + b"]" * 40_000 + b"}", "deeper"),
    ],
)
def test_row6_json_no_server_accepts_is_400(proxy, raw, says):
    resp = httpx.post(
        f"{proxy.url}/chat/completions",
        content=raw,
        timeout=60,
        headers={**proxy.headers, "Content-Type": "application/json"},
    )
    assert resp.status_code == 400 and resp.json()["error"]["code"] == "invalid_json"
    assert says in resp.json()["error"]["message"]


def test_row7_a_client_hanging_up_mid_body_is_499_without_a_traceback(proxy):
    with socket.create_connection(("127.0.0.1", proxy.port)) as sock:
        sock.sendall(
            f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
            'Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{"model": '.encode()
        )
    line = 'aligner_serve_requests_total{endpoint="/v1/chat/completions",status="499"}'
    for _ in range(300):
        if line in metrics(proxy):
            break
        time.sleep(0.1)
    assert line in metrics(proxy)
    assert "Traceback" not in proxy.log.read_text() and 'status="500"' not in metrics(proxy)


def test_row9_a_malformed_batch_item_is_that_items_error(proxy):
    resp = post(
        proxy,
        {
            "items": [
                {"question": "Q?", "answer": "A."},
                {"question": "Q?"},
                7,
                {"question": "Q2?", "answer": "B."},
            ]
        },
        path="/corrections",
    )
    items = resp.json()["items"]
    assert resp.status_code == 200 and [i.get("status") for i in items] == [None, 400, 400, None]
    assert items[0]["text"] == "Corrected: A. (checked)" and items[1]["error"]["param"] == "items[1].answer"


def test_row10_max_queue_alone_starts_and_the_batch_limit_follows_it(proxy):
    assert health(proxy)["queue_limit"] == 8
    resp = post(proxy, {"items": [{"question": "Q?", "answer": "A."}] * 9}, path="/corrections")
    assert resp.status_code == 413 and resp.json()["error"]["code"] == "too_many_items"


def test_row12_slow_loris_connections_are_closed(proxy):
    socks = [socket.create_connection(("127.0.0.1", proxy.port)) for _ in range(5)]
    start = time.monotonic()
    try:
        for i, sock in enumerate(socks):
            sock.settimeout(60)
            sock.sendall(
                b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n" if i else b""
            )  # one sends nothing
        for sock in socks:
            assert sock.recv(1024) == b""  # closed by the proxy, not by the test's timeout
        assert time.monotonic() - start >= 2  # --read-timeout 2: not before
        with socket.create_connection(("127.0.0.1", proxy.port)) as body_loris:  # the head, then a slow body
            body_loris.settimeout(60)
            body_loris.sendall(
                f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
                "Content-Length: 500\r\n\r\n{".encode()
            )
            answer = b""
            while chunk := body_loris.recv(65536):
                answer += chunk
        head, _, payload = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 408") and json.loads(payload)["error"]["code"] == "request_timeout"
    finally:
        for sock in socks:
            sock.close()
    assert health(proxy)["status"] == "ok"


def test_row8_sigterm_waits_the_grace_then_answers_503(fake, tmp_path):
    p = ProxyProcess(proxy_args(fake, "--shutdown-grace", "1"), tmp_path / "proxy.log", None)
    try:
        p.wait_healthy(timeout=120)
        fake.script.append({"kind": "hold"})
        thread, out = in_thread(
            httpx.post,
            f"{p.url}/chat/completions",
            timeout=120,
            json={"model": UPSTREAM, "messages": [{"role": "user", "content": QUESTION}]},
        )
        assert fake.arrived.wait(60)
        start = time.monotonic()
        p.proc.send_signal(signal.SIGTERM)
        thread.join(60)
        elapsed = time.monotonic() - start
        resp = out["value"]
        assert resp.status_code == 503 and resp.headers["content-type"] == "application/json"
        assert resp.json()["error"]["code"] == "shutting_down" and resp.headers["retry-after"]
        assert 1 <= elapsed < 55  # after the grace, long before the held upstream's 60 s
        assert p.proc.wait(60) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal once it has shut down
        assert "Traceback" not in p.log.read_text()
    finally:
        fake.release.set()
        p.stop()


# -- the contract ----------------------------------------------------------------------------------------------


def test_stop_finish_reason_usage_and_logprobs_describe_the_text_returned(proxy, fake):
    data = chat(proxy, stop=["(checked"], logprobs=True, max_tokens=2).json()
    choice = data["choices"][0]
    assert (
        choice["message"]["content"] == f"Corrected: Answer 0 to: {QUESTION}"
    )  # the stop applied to the correction
    assert fake.aligner_bodies()[-1]["stop"] == ["(checked"]
    assert choice["finish_reason"] == "stop" and choice["logprobs"] is None
    assert (
        choice["aligner"]["upstream_finish_reason"] == "stop"
        and choice["aligner"]["logprobs_dropped"] is True
    )
    words = len(choice["message"]["content"].split())
    assert data["usage"] == {"prompt_tokens": 11, "completion_tokens": words, "total_tokens": 11 + words}
    assert data["aligner"]["upstream_usage"] == {
        "prompt_tokens": 11,
        "completion_tokens": 7,
        "total_tokens": 18,
    }
    # The client's max_tokens=2 bounded the upstream's answer, not the correction: room to restate it was given.
    assert fake.aligner_bodies()[-1]["max_tokens"] >= restating(len(f"Answer 0 to: {QUESTION}".split())) > 9
    fake.script.append(
        {
            "kind": "message",
            "finish_reason": "length",
            "message": {"role": "assistant", "content": '{"name": "Paris", "country": "France"}'},
        }
    )
    passed = chat(proxy, logprobs=True, response_format={"type": "json_object"}).json()["choices"][0]
    assert passed["finish_reason"] == "length" and passed["logprobs"]["content"][0]["token"] == "Answer"
    fake.script.append({"kind": "message", "message": {"role": "assistant", "content": "{}"}})
    streamed = stream_chunks(chat(proxy, logprobs=True, stream=True, response_format={"type": "json_object"}))
    assert streamed[0]["choices"][0]["logprobs"]["content"][0]["token"] == "Answer"  # kept when streamed too


def test_errors_are_json_on_every_status(proxy):
    for method, path, status in (
        ("POST", "/v1/completions", 404),
        ("GET", "/nowhere", 404),
        ("GET", "/v1/chat/completions", 405),
        ("POST", "/v1/models", 405),
    ):
        resp = httpx.request(
            method, f"http://127.0.0.1:{proxy.port}{path}", headers=proxy.headers, timeout=30
        )
        assert resp.status_code == status and resp.headers["content-type"] == "application/json", (
            path,
            resp.text,
        )
        assert resp.json()["error"]["code"] in ("not_found", "method_not_allowed")
    assert (
        "/v1/chat/completions"
        in httpx.post(f"{proxy.url}/completions", headers=proxy.headers).json()["error"]["message"]
    )
    with socket.create_connection(
        ("127.0.0.1", proxy.port)
    ) as sock:  # not HTTP at all: uvicorn's 400, as JSON
        sock.settimeout(60)
        sock.sendall(b"NONSENSE\r\n\r\n")
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    head, _, payload = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400") and json.loads(payload)["error"]["code"] == "invalid_http_request"


def test_models_keep_the_upstreams_fields_and_unknown_names_go_upstream(proxy, fake):
    models = {m["id"]: m for m in httpx.get(f"{proxy.url}/models", headers=proxy.headers).json()["data"]}
    assert list(models)[:2] == ["assistant", "gpt-4o"]
    assert (
        models["assistant"]["max_model_len"] == MAX_MODEL_LEN
        and models["assistant"]["root"] == "/models/fake-up"
    )
    assert models[UPSTREAM]["max_model_len"] == MAX_MODEL_LEN
    unknown = post(proxy, {"model": "no-such-model", "messages": [{"role": "user", "content": "q"}]})
    assert unknown.status_code == 404 and "does not exist" in unknown.json()["error"]["message"]
    assert fake.chat_bodies()[-1]["model"] == "no-such-model"  # forwarded as it came: the upstream answered
    for alias in ("assistant", "gpt-4o"):
        data = post(proxy, {"model": alias, "messages": [{"role": "user", "content": "q"}]}).json()
        assert data["model"] == alias and fake.chat_bodies()[-1]["model"] == UPSTREAM


def test_a_request_without_a_user_message_is_answered(proxy, fake):
    resp = post(proxy, {"model": UPSTREAM, "messages": [{"role": "system", "content": "Write a haiku."}]})
    assert resp.status_code == 200 and resp.json()["aligner"]["question_from"] == "system"
    assert "harmless: Write a haiku. |" in fake.aligner_bodies()[-1]["prompt"]


def test_n_choices_stream_each_under_its_index(proxy):
    chunks = stream_chunks(chat(proxy, n=2, stream=True, stream_options={"include_usage": True}))
    texts = {0: "", 1: ""}
    finals = {}
    for c in chunks:
        for choice in c["choices"]:
            texts[choice["index"]] += choice["delta"].get("content") or ""
            if choice["finish_reason"]:
                finals[choice["index"]] = (choice["finish_reason"], c["aligner"])
    assert texts == {i: f"Corrected: Answer {i} to: {QUESTION} (checked)" for i in (0, 1)}
    assert {i: f[0] for i, f in finals.items()} == {0: "stop", 1: "stop"}
    assert all("original" not in f[1] for f in finals.values())
    usage = chunks[-1]["usage"]
    assert chunks[-1]["choices"] == [] and usage["completion_tokens"] == sum(
        len(t.split()) for t in texts.values()
    )
    assert chunks[-1]["aligner"]["upstream_usage"]["completion_tokens"] == 14


def test_the_openai_sdk_parse_and_stream_helpers_work_through_the_proxy(proxy, fake):
    c = client(proxy)
    city = '{"name": "Paris", "country": "France"}'
    fake.script.append({"kind": "message", "message": {"role": "assistant", "content": city}})
    parsed = c.chat.completions.parse(
        model=UPSTREAM, messages=[{"role": "user", "content": QUESTION}], response_format=City
    )
    assert parsed.choices[0].message.parsed == City(name="Paris", country="France")
    fake.script.append({"kind": "message", "message": {"role": "assistant", "content": city}})
    with c.chat.completions.stream(
        model=UPSTREAM, messages=[{"role": "user", "content": QUESTION}], response_format=City
    ) as stream:
        final = stream.get_final_completion()
    assert final.choices[0].message.parsed == City(name="Paris", country="France")
    # A small max_tokens truncates the upstream's answer (finish "length"), never the correction.
    fake.script.append(
        {
            "kind": "message",
            "finish_reason": "length",
            "message": {"role": "assistant", "content": "Paris is"},
        }
    )
    with c.chat.completions.stream(
        model=UPSTREAM, messages=[{"role": "user", "content": QUESTION}], max_tokens=2
    ) as stream:
        text = "".join(e.delta for e in stream if e.type == "content.delta")
        final = stream.get_final_completion()
    assert text == "Corrected: Paris is (checked)" and final.choices[0].finish_reason == "stop"
    beta = getattr(getattr(c, "beta", None), "chat", None)  # the older alias, where this SDK still has it
    if beta is not None:
        fake.script.append(
            {
                "kind": "message",
                "finish_reason": "length",
                "message": {"role": "assistant", "content": "Paris is"},
            }
        )
        with beta.completions.stream(
            model=UPSTREAM, messages=[{"role": "user", "content": QUESTION}], max_tokens=2
        ) as stream:
            assert stream.get_final_completion().choices[0].message.content == "Corrected: Paris is (checked)"
