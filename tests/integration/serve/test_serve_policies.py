"""``aligner serve --config`` as a real process (issue 22, points 3-4): the file gives the upstream, the Aligner,
the limits and the keys with their policies, the command line wins over it, each key runs in its mode, a request
picks another only where its key allows it, the outcome reaches clients that drop unknown JSON fields (LangChain's
``ChatOpenAI``) as headers, and a file that cannot start the proxy is one line and exit code 2.

The upstream and the Aligner are one scripted server (``tests/fixtures/servers/fake_upstream.py``), so the proxy starts in
seconds and every correction is known in advance (``"Corrected: {answer} (checked)"``)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration
pytest.importorskip("starlette")
httpx = pytest.importorskip("httpx")

from tests.fixtures.servers.fake_upstream import ALIGNER, UPSTREAM, FakeUpstream  # noqa: E402
from tests.integration.serve.test_serve import ProxyProcess  # noqa: E402

APP_KEY, REPORTS_KEY, CLI_KEY = "app-key-0123456789", "reports-key-0123456789", "cli-key-0123456789"
QUESTION = "What is the capital of France?"
CONFIG = """
[upstream]
url = "{url}"
model = "{upstream}"
timeout = 30

[aligner]
server = "{url}"
model = "{aligner}"
max_new_tokens = 16

[limits]
max_queue = 8

[[keys]]
name = "chat-app"
key = "{app_key}"
allow_override = true

[[keys]]
name = "reports"
key_sha256 = "{reports_digest}"
mode = "off"
"""


@pytest.fixture(scope="module")
def fake():
    server = FakeUpstream()
    yield server
    server.close()


@pytest.fixture(scope="module")
def proxy(fake, tmp_path_factory):
    """The file's queue of 8 overridden by ``--max-queue 6``; a key from the command line beside the file's two."""
    folder = tmp_path_factory.mktemp("serve-policies")
    config = folder / "serve.toml"
    config.write_text(
        CONFIG.format(
            url=fake.url,
            upstream=UPSTREAM,
            aligner=ALIGNER,
            app_key=APP_KEY,
            reports_digest=hashlib.sha256(REPORTS_KEY.encode()).hexdigest(),
        )
    )
    p = ProxyProcess(
        ["--config", str(config), "--max-queue", "6", "--api-key", CLI_KEY], folder / "proxy.log", APP_KEY
    )
    try:
        yield p.wait_healthy(timeout=120)
    finally:
        p.stop()


def chat(p: ProxyProcess, key: str = APP_KEY, headers: dict | None = None, **body) -> httpx.Response:
    return httpx.post(
        f"{p.url}/chat/completions",
        timeout=60,
        headers={"Authorization": f"Bearer {key}", **(headers or {})},
        json={"model": UPSTREAM, "messages": [{"role": "user", "content": QUESTION}], **body},
    )


def outcome(resp: httpx.Response) -> dict[str, str]:
    return {k.removeprefix("x-aligner-"): v for k, v in resp.headers.items() if k.startswith("x-aligner-")}


def test_the_file_starts_the_proxy_and_the_command_line_wins(proxy):
    health = httpx.get(f"http://127.0.0.1:{proxy.port}/health", headers=proxy.headers, timeout=30).json()
    assert health["status"] == "ok" and health["queue_limit"] == 6  # --max-queue over [limits] max_queue = 8
    assert "API keys: 3; modes: correct, off" in proxy.log.read_text()


def test_each_key_runs_in_its_mode_and_the_headers_say_what_happened(proxy, fake):
    corrected = chat(proxy)
    details = corrected.json()["aligner"]
    assert (
        corrected.json()["choices"][0]["message"]["content"]
        == f"Corrected: Answer 0 to: {QUESTION} (checked)"
    )
    assert outcome(corrected) == {
        "mode": "correct",
        "changed": "true",
        "skipped": "none",
        "similarity": repr(round(details["similarity"], 4)),
    }
    calls = len(fake.aligner_bodies())
    off = chat(proxy, key=REPORTS_KEY)
    assert off.json()["choices"][0]["message"]["content"] == f"Answer 0 to: {QUESTION}"
    assert off.json()["aligner"]["skipped"] == "disabled" and len(fake.aligner_bodies()) == calls
    assert outcome(off) == {"mode": "off", "changed": "false", "similarity": "1.0", "skipped": "disabled"}


def test_a_request_picks_a_mode_only_where_its_key_allows_it(proxy, fake):
    by_header = chat(proxy, headers={"x-aligner-mode": "off"})
    by_body = chat(proxy, aligner={"mode": "off"})
    for resp in (by_header, by_body):
        assert resp.json()["aligner"]["skipped"] == "disabled" and outcome(resp)["mode"] == "off"
    assert "aligner" not in fake.chat_bodies()[-1]
    asked = len(fake.chat_bodies())
    for key, mode in ((CLI_KEY, "off"), (REPORTS_KEY, "correct")):  # the default policy, and an off key
        refused = chat(proxy, key=key, headers={"x-aligner-mode": mode})
        assert refused.status_code == 403 and refused.json()["error"]["code"] == "mode_not_allowed"
    unknown = chat(proxy, headers={"x-aligner-mode": "loud"})
    assert unknown.status_code == 400 and unknown.json()["error"]["code"] == "invalid_mode"
    assert len(fake.chat_bodies()) == asked  # refused before the upstream was called
    one = httpx.post(
        f"{proxy.url}/corrections",
        headers={**proxy.headers, "x-aligner-mode": "off"},
        timeout=60,
        json={"question": "Q?", "answer": "Six legs."},
    )
    assert one.json()["text"] == "Six legs." and outcome(one)["skipped"] == "disabled"


def test_streams_send_what_is_known_before_the_first_byte(proxy):
    with httpx.stream(
        "POST",
        f"{proxy.url}/chat/completions",
        headers=proxy.headers,
        timeout=60,
        json={"model": UPSTREAM, "stream": True, "messages": [{"role": "user", "content": QUESTION}]},
    ) as corrected:
        assert outcome(corrected) == {"mode": "correct"}
        assert [part.split(";")[0].strip() for part in corrected.headers["server-timing"].split(",")] == [
            "upstream",
            "aligner",
        ]  # the time to the first token, split
        assert (
            '"corrected":true' in corrected.read().decode()
        )  # the rest is in the final chunk's aligner field
    off = chat(proxy, key=REPORTS_KEY, stream=True)
    assert outcome(off) == {"mode": "off", "changed": "false", "similarity": "1.0", "skipped": "disabled"}


def test_langchain_chat_openai_sees_the_outcome_in_the_headers(proxy):
    chat_openai = pytest.importorskip("langchain_openai").ChatOpenAI
    model = chat_openai(
        base_url=proxy.url, api_key=APP_KEY, model=UPSTREAM, include_response_headers=True, max_retries=0
    )
    reply = model.invoke(QUESTION)
    assert reply.content == f"Corrected: Answer 0 to: {QUESTION} (checked)"
    headers = reply.response_metadata["headers"]
    assert headers["x-aligner-changed"] == "true" and headers["x-aligner-mode"] == "correct"


def test_a_file_that_cannot_start_the_proxy_is_one_line_and_exit_code_2(fake, tmp_path):
    config = tmp_path / "serve.toml"
    config.write_text(f'[upstream]\nurl = "{fake.url}"\n\n[limits]\nmax_queue = 0\n')
    run = subprocess.run(
        [sys.executable, "-m", "aligner_core", "serve", "--config", str(config), "--port", "9"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert run.returncode == 2 and len(lines) == 1 and "Traceback" not in run.stderr, run.stderr
    assert lines[0].startswith("error: ") and "[limits] max_queue = 0" in lines[0]
