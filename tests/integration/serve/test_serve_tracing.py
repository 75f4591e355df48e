"""A real ``aligner serve`` process exporting its spans, as docs/serve.md shows it: the SDK's provider set before
the command runs (here with the console exporter and a batch processor), and the spans still buffered exported at
SIGTERM (uvicorn ends by raising the signal again, so no exit hook would)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.integration
pytest.importorskip("opentelemetry.sdk")
pytest.importorskip("starlette")
httpx = pytest.importorskip("httpx")

from tests.fixtures.servers.fake_upstream import ALIGNER, UPSTREAM, FakeUpstream  # noqa: E402
from tests.fixtures.servers.vllm_server import free_port  # noqa: E402

LAUNCHER = """
import sys
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

provider = TracerProvider()
provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter(), schedule_delay_millis=60_000))
trace.set_tracer_provider(provider)

from aligner_core.cli import main

sys.exit(main(["serve", *sys.argv[1:]]))
"""


def spans_in(text: str) -> list[dict]:
    """The console exporter's spans: one JSON object per span, pretty-printed."""
    decoder, found, at = json.JSONDecoder(), [], 0
    while (start := text.find('{\n    "name"', at)) >= 0:
        span, at = decoder.raw_decode(text, start)
        found.append(span)
    return found


def test_a_proxy_process_exports_its_spans_nested_and_flushed_at_sigterm(tmp_path):
    fake = FakeUpstream()
    port = free_port()
    config = tmp_path / "serve.toml"
    config.write_text(
        f'[upstream]\nurl = "{fake.url}"\nmodel = "{UPSTREAM}"\n\n'
        f'[aligner]\nserver = "{fake.url}"\nmodel = "{ALIGNER}"\n\n[server]\nport = {port}\n'
    )
    log = tmp_path / "proxy.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-c", LAUNCHER, "--config", str(config)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "HF_HUB_OFFLINE": "1"},
            start_new_session=True,
        )
    try:
        for _ in range(240):
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        resp = httpx.post(
            f"http://127.0.0.1:{port}/v1/chat/completions",
            timeout=60,
            json={"model": UPSTREAM, "messages": [{"role": "user", "content": "Capital of France?"}]},
        )
        assert resp.status_code == 200
        proc.send_signal(
            signal.SIGTERM
        )  # the batch processor has exported nothing yet: its delay is a minute
        proc.wait(60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        fake.close()
    spans = {s["name"]: s for s in spans_in(log.read_text())}
    server = spans["POST /v1/chat/completions"]
    assert server["kind"] == "SpanKind.SERVER" and server["attributes"]["http.response.status_code"] == 200
    for name in ("aligner.admission", f"chat {UPSTREAM}", f"text_completion {ALIGNER}"):
        assert spans[name]["parent_id"] == server["context"]["span_id"], name
    assert spans[f"chat {UPSTREAM}"]["attributes"]["gen_ai.usage.input_tokens"] == 11
    assert "Capital of France" not in log.read_text().split("Uvicorn running")[-1]
