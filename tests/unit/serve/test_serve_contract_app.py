"""The response contract on the in-process app with a tiny real Aligner on the local engine: stop sequences cut
the correction itself (the local engine's path; a server Aligner gets them forwarded, see
tests/integration/serve/test_serve_probes.py), JSON on the statuses Starlette answers itself, the shutdown grace, and
a client's small ``max_tokens`` never limiting the correction."""

from __future__ import annotations

import asyncio
import json

import pytest

pytest.importorskip("starlette")
pytest.importorskip("prometheus_client")

import httpx  # noqa: E402
from starlette.applications import Starlette  # noqa: E402
from starlette.requests import Request  # noqa: E402
from starlette.responses import JSONResponse  # noqa: E402
from starlette.routing import Route  # noqa: E402

from aligner_serve import ServeLimits, Upstream, build_app  # noqa: E402
from tests.unit.serve.test_serve_app import limit_for  # noqa: E402

ANSWER = "Spiders have eight legs and insects have six legs."


class HeldUpstream:
    """Answers every chat request with ``ANSWER``; ``gate`` (when set) holds requests until it is released."""

    def __init__(self) -> None:
        self.bodies: list[dict] = []
        self.gate: asyncio.Event | None = None
        self.app = Starlette(routes=[Route("/v1/chat/completions", self.chat, methods=["POST"])])

    async def chat(self, request: Request) -> JSONResponse:
        body = await request.json()
        self.bodies.append(body)
        if self.gate is not None:
            await self.gate.wait()
        return JSONResponse(
            {
                "id": "x",
                "object": "chat.completion",
                "created": 1,
                "model": body.get("model"),
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": ANSWER},
                        "finish_reason": "length",
                    }
                ],
                "usage": {"prompt_tokens": 5, "completion_tokens": 9, "total_tokens": 14},
            }
        )


@pytest.fixture
def upstream():
    return HeldUpstream()


@pytest.fixture
def app(tiny_aligner, upstream):
    up = Upstream("http://upstream.test/v1", model="up", transport=httpx.ASGITransport(upstream.app))
    application = build_app(
        tiny_aligner,
        up,
        limits=ServeLimits(max_queue=4, correction_timeout=60, shutdown_grace=0.2),
        close_aligner=False,
    )
    yield application
    asyncio.run(up.aclose())


async def _post(app, body, path="/v1/chat/completions"):
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://proxy.test") as client:
        return await client.post(path, json=body)


def chat(app, **body):
    return asyncio.run(
        _post(app, {"model": "up", "messages": [{"role": "user", "content": "Legs?"}], **body})
    )


def streamed_text(resp: httpx.Response) -> tuple[str, list[dict]]:
    events = [e.removeprefix("data: ") for e in resp.text.split("\n\n") if e]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    return "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"]), chunks


@pytest.mark.parametrize("stream", [False, True])
def test_stop_sequences_cut_the_correction(app, tiny_aligner, stream):
    full = tiny_aligner.correct("Legs?", ANSWER, max_new_tokens=limit_for(tiny_aligner, ANSWER)).text
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    assert stop.strip() and len(full) > 8, full
    resp = chat(app, stop=[stop], stream=stream)
    if stream:
        text, chunks = streamed_text(resp)
        finish = next(
            c["choices"][0]["finish_reason"]
            for c in chunks
            if c["choices"] and c["choices"][0]["finish_reason"]
        )
    else:
        text, finish = (
            resp.json()["choices"][0]["message"]["content"],
            resp.json()["choices"][0]["finish_reason"],
        )
    assert stop not in text and text == full[: full.find(stop)].strip() and finish == "stop"


def test_a_small_max_tokens_bounds_the_upstream_never_the_correction(
    app, tiny_aligner, upstream, monkeypatch
):
    seen = []
    real = tiny_aligner.acorrect

    async def acorrect(question, answer, **kwargs):
        seen.append(kwargs["max_new_tokens"])
        return await real(question, answer, **kwargs)

    monkeypatch.setattr(tiny_aligner, "acorrect", acorrect)
    data = chat(app, max_tokens=1).json()
    assert upstream.bodies[-1]["max_tokens"] == 1  # the client's limit still reaches the upstream
    assert seen == [limit_for(tiny_aligner, ANSWER)] and seen[0] > len(
        tiny_aligner.engine.encode(ANSWER, add_special_tokens=False)
    )
    assert data["choices"][0]["aligner"]["upstream_finish_reason"] == "length"


@pytest.mark.parametrize(
    "method, path, status, code",
    [
        ("POST", "/v1/completions", 404, "not_found"),
        ("GET", "/v1/responses", 404, "not_found"),
        ("GET", "/v1/corrections", 405, "method_not_allowed"),
        ("DELETE", "/health", 405, "method_not_allowed"),
    ],
)
def test_statuses_starlette_answers_are_openai_json(app, method, path, status, code):
    async def go():
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app), base_url="http://proxy.test"
        ) as client:
            return await client.request(method, path)

    resp = asyncio.run(go())
    assert resp.status_code == status and resp.headers["content-type"] == "application/json"
    error = resp.json()["error"]
    assert error["code"] == code and error["type"] == "invalid_request_error" and path in error["message"]
    if status == 404:
        assert "POST /v1/chat/completions" in error["message"]  # says what is served
    else:
        assert resp.headers["allow"]


def test_past_the_shutdown_grace_a_request_in_progress_gets_503(app, upstream):
    proxy = app.state.proxy

    async def go():
        upstream.gate = asyncio.Event()
        request = asyncio.ensure_future(
            _post(app, {"model": "up", "messages": [{"role": "user", "content": "q"}]})
        )
        while not upstream.bodies:  # the request reached the upstream and waits there
            await asyncio.sleep(0.01)
        app.state.drain.begin()
        resp = await request
        late = await _post(app, {"model": "up", "messages": [{"role": "user", "content": "q"}]})
        upstream.gate.set()
        return resp, late

    resp, late = asyncio.run(go())
    assert resp.status_code == 503 and resp.json()["error"]["code"] == "shutting_down"
    assert late.status_code == 503 and proxy.admission.active == 0


def test_past_the_shutdown_grace_a_stream_ends_with_an_error_event(app, tiny_aligner, monkeypatch):
    """A correction streaming when the grace runs out: its stream ends with an OpenAI-shaped error, not [DONE]."""
    from aligner_core.engines.base import GenerationOutput

    started = asyncio.Event()

    async def astream(request, params, on_text):  # streams a first piece, then never finishes on its own
        on_text("Spiders have")
        started.set()
        await asyncio.Event().wait()
        return GenerationOutput("never", 1, "stop", 0.0)

    monkeypatch.setattr(tiny_aligner.engine, "astream", astream)

    async def go():
        request = asyncio.ensure_future(
            _post(app, {"model": "up", "stream": True, "messages": [{"role": "user", "content": "q"}]})
        )
        await started.wait()
        app.state.drain.begin()
        return await request

    resp = asyncio.run(go())
    events = [e.removeprefix("data: ") for e in resp.text.split("\n\n") if e]
    assert (
        resp.status_code == 200 and json.loads(events[1])["choices"][0]["delta"]["content"] == "Spiders have"
    )
    assert json.loads(events[-1])["error"]["code"] == "shutting_down" and "[DONE]" not in events
    assert app.state.proxy.admission.active == 0
