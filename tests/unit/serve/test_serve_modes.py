"""Per-key policies and per-request modes on the in-process app with a tiny real Aligner: each key's mode (correct,
inspect, off), a request choosing another only where its key allows it (403 otherwise, 400 for no valid mode), the
outcome in response headers (one value per choice; streams only what is known before the first byte), the modes on
``/v1/corrections``, and the JSON 404 of the endpoints that are not proxied."""

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

from aligner_core.decision import DETAILS, Skip  # noqa: E402
from aligner_core.inspector import Inspector  # noqa: E402
from aligner_serve import ServeLimits, Upstream, build_app  # noqa: E402
from aligner_serve.config import KeyEntry, Policy, digest  # noqa: E402
from aligner_serve.policy import DEFAULT_POLICY, KeyRing  # noqa: E402

QUESTION = "Name a colour."
TOOL_CALL = {"id": "call_1", "type": "function", "function": {"name": "paint", "arguments": "{}"}}
#: API key -> its policy (named as an operator would label the client; the name is not the key).
KEYS = {
    "strict": Policy("correct", False, "web"),
    "open": Policy("correct", True, "lab"),
    "off": Policy("off", False, "reports"),
    "inspect": Policy("inspect", False, "analytics"),
}


class Upstream_:
    """Answers ``Answer {i} to: {question}`` per choice (a tool call when the request has tools); keeps the bodies."""

    def __init__(self) -> None:
        self.bodies: list[dict] = []
        self.headers: list[dict[str, str]] = []
        self.app = Starlette(routes=[Route("/v1/chat/completions", self.chat, methods=["POST"])])

    async def chat(self, request: Request) -> JSONResponse:
        body = await request.json()
        self.bodies.append(body)
        self.headers.append(dict(request.headers))
        question = body["messages"][-1]["content"]
        choices = []
        for i in range(body.get("n", 1)):
            if body.get("tools"):
                message, finish = (
                    {"role": "assistant", "content": None, "tool_calls": [TOOL_CALL]},
                    "tool_calls",
                )
            elif question == "number":  # content no OpenAI server sends: the Aligner cannot read it
                message, finish = {"role": "assistant", "content": 12345}, "stop"
            else:
                message, finish = {"role": "assistant", "content": f"Answer {i} to: {question}"}, "stop"
            choice = {"index": i, "message": message, "finish_reason": finish}
            if body.get("logprobs"):
                choice["logprobs"] = {
                    "content": [{"token": "Answer", "logprob": -0.1, "bytes": None, "top_logprobs": []}]
                }
            choices.append(choice)
        return JSONResponse(
            {
                "id": "chatcmpl-x",
                "object": "chat.completion",
                "created": 1,
                "model": "up",
                "choices": choices,
                "usage": {"prompt_tokens": 5, "completion_tokens": 4, "total_tokens": 9},
            }
        )


def score(question: str, answer: str) -> float:
    """Choice 0 passes, any other fails."""
    return 0.9 if answer.startswith("Answer 0") else 0.2


@pytest.fixture
def upstream():
    return Upstream_()


def make_app(aligner, upstream, *, keys=KEYS, default: Policy = DEFAULT_POLICY):
    up = Upstream("http://upstream.test/v1", model="up", transport=httpx.ASGITransport(upstream.app))
    ring = KeyRing.build(entries=[KeyEntry(digest(k), p) for k, p in keys.items()], default=default)
    return build_app(
        aligner,
        up,
        api_keys=ring,
        limits=ServeLimits(max_queue=8, correction_timeout=60),
        close_aligner=False,
    )


@pytest.fixture
def app(tiny_aligner, upstream):
    tiny_aligner.inspector, tiny_aligner.threshold = Inspector(score), 0.5
    yield make_app(tiny_aligner, upstream)
    tiny_aligner.close()


def call(app, method, path, key="strict", headers=None, **kwargs):
    async def go():
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app), base_url="http://proxy.test"
        ) as client:
            auth = {"Authorization": f"Bearer {key}"} if key else {}
            return await client.request(method, path, headers={**auth, **(headers or {})}, **kwargs)

    return asyncio.run(go())


def chat(app, key="strict", headers=None, **body):
    return call(
        app,
        "POST",
        "/v1/chat/completions",
        key,
        headers,
        json={"model": "up", "messages": [{"role": "user", "content": QUESTION}], **body},
    )


def outcome(resp: httpx.Response) -> dict[str, str]:
    return {k.removeprefix("x-aligner-"): v for k, v in resp.headers.items() if k.startswith("x-aligner-")}


def timing(resp: httpx.Response) -> dict[str, float]:
    """``Server-Timing``'s durations in milliseconds, by name."""
    parts = [part.strip().split(";dur=") for part in resp.headers["server-timing"].split(",")]
    return {name: float(ms) for name, ms in parts}


def events(resp: httpx.Response) -> list[dict]:
    assert resp.status_code == 200, resp.text
    raw = [e.removeprefix("data: ") for e in resp.text.split("\n\n") if e]
    assert raw[-1] == "[DONE]"
    return [json.loads(e) for e in raw[:-1]]


def corrections_run(app) -> str:
    return "\n".join(
        line
        for line in call(app, "GET", "/metrics").text.splitlines()
        if line.startswith("aligner_serve_corrections_total{")
    )


def test_off_returns_the_upstreams_answer_as_it_is_and_says_so(app, upstream):
    resp = chat(app, key="off", logprobs=True)
    data = resp.json()
    choice = data["choices"][0]
    assert choice["message"]["content"] == f"Answer 0 to: {QUESTION}" and choice["logprobs"]["content"]
    assert choice["aligner"] == {
        "corrected": False,
        "skipped": "disabled",
        "skipped_detail": DETAILS[Skip.DISABLED],
        "upstream_finish_reason": "stop",
    }
    assert (
        data["usage"] == data["aligner"]["upstream_usage"] and data["aligner"]["usage"]["total_tokens"] == 0
    )
    assert outcome(resp) == {"mode": "off", "changed": "false", "similarity": "1.0", "skipped": "disabled"}
    assert corrections_run(app) == ""  # the Aligner never ran
    unread = call(
        app, "POST", "/v1/chat/completions", "off", json={"messages": [{"role": "user", "content": "number"}]}
    )
    assert (
        unread.status_code == 200 and unread.json()["choices"][0]["message"]["content"] == 12345
    )  # not even read
    assert (
        call(
            app, "POST", "/v1/chat/completions", json={"messages": [{"role": "user", "content": "number"}]}
        ).json()["error"]["code"]
        == "unreadable_content"
    )  # correcting it fails closed


def test_inspect_scores_and_reports_but_never_rewrites(app):
    resp = chat(app, key="inspect", n=2)
    data = resp.json()
    assert [c["message"]["content"] for c in data["choices"]] == [
        f"Answer {i} to: {QUESTION}" for i in (0, 1)
    ]
    assert [c["aligner"]["inspector"] for c in data["choices"]] == [
        {"score": 0.9, "threshold": 0.5, "passed": True},
        {"score": 0.2, "threshold": 0.5, "passed": False},
    ]
    assert {c["aligner"]["skipped"] for c in data["choices"]} == {"inspect_only"}
    assert data["aligner"]["corrected"] is False and data["aligner"]["inspector"]["passed"] is True
    assert outcome(resp) == {
        "mode": "inspect",
        "changed": "false,false",
        "similarity": "1.0,1.0",
        "skipped": "inspect_only,inspect_only",
        "inspector-score": "0.9,0.2",
        "inspector-passed": "true,false",
    }
    metrics = call(app, "GET", "/metrics").text
    assert 'aligner_serve_inspected_total{passed="false"} 1.0' in metrics and corrections_run(app) == ""


def test_correct_headers_describe_each_choice_in_order(app):
    resp = chat(app, n=2)  # choice 0 passes the Aligner's inspector gate, choice 1 is corrected
    choices = resp.json()["choices"]
    assert [c["aligner"].get("skipped") for c in choices] == ["inspector_passed", None]
    headers = outcome(resp)
    assert headers["mode"] == "correct" and headers["skipped"] == "inspector_passed,none"
    assert headers["changed"] == ",".join(str(c["aligner"]["changed"]).lower() for c in choices)
    assert headers["similarity"] == ",".join(repr(round(c["aligner"]["similarity"], 4)) for c in choices)
    assert headers["inspector-passed"] == "true,false"
    assert all(ms >= 0 for ms in timing(resp).values()) and list(timing(resp)) == ["upstream", "aligner"]


def test_a_request_picks_a_mode_where_its_key_allows_it(app, upstream):
    by_header = chat(app, key="open", headers={"x-aligner-mode": "off"})
    assert by_header.json()["aligner"]["skipped"] == "disabled" and outcome(by_header)["mode"] == "off"
    by_body = chat(app, key="open", aligner={"mode": "inspect"})
    assert by_body.json()["aligner"]["skipped"] == "inspect_only" and outcome(by_body)["mode"] == "inspect"
    assert "aligner" not in upstream.bodies[-1]  # the proxy's own field never goes upstream
    same = chat(app, key="strict", headers={"x-aligner-mode": "correct"})  # its own mode: nothing to allow
    assert same.status_code == 200 and outcome(same)["mode"] == "correct"


@pytest.mark.parametrize(
    "key, headers, body, status, code",
    [
        ("strict", {"x-aligner-mode": "off"}, {}, 403, "mode_not_allowed"),
        ("off", {}, {"aligner": {"mode": "correct"}}, 403, "mode_not_allowed"),
        ("open", {"x-aligner-mode": "loud"}, {}, 400, "invalid_mode"),
        ("open", {"x-aligner-mode": "off"}, {"aligner": {"mode": "inspect"}}, 400, "invalid_mode"),
    ],
)
def test_a_mode_the_key_may_not_use_is_refused_before_the_upstream_is_called(
    app, upstream, key, headers, body, status, code
):
    payloads = {
        "/v1/chat/completions": {"model": "up", "messages": [{"role": "user", "content": "q"}], **body},
        "/v1/corrections": {"question": "q", "answer": "a", **body},
    }
    for path, payload in payloads.items():
        resp = call(app, "POST", path, key, headers, json=payload)
        assert resp.status_code == status and resp.json()["error"]["code"] == code, (path, resp.text)
        assert set(resp.json()["error"]) == {"message", "type", "param", "code"}
    assert upstream.bodies == []


def test_an_unknown_mode_in_the_body_is_a_400_naming_the_field(app):
    resp = chat(app, key="open", aligner={"mode": "loud"})
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "aligner.mode"


def test_inspect_needs_an_inspector(tiny_aligner, upstream):
    correcting = {k: p for k, p in KEYS.items() if p.mode != "inspect"}
    app = make_app(tiny_aligner, upstream, keys=correcting)  # no inspector on this Aligner
    resp = chat(app, key="open", headers={"x-aligner-mode": "inspect"})
    assert resp.status_code == 400 and "needs an inspector" in resp.json()["error"]["message"]
    for keys, default in ((KEYS, DEFAULT_POLICY), (correcting, Policy("inspect"))):
        with pytest.raises(ValueError, match="no inspector"):
            make_app(tiny_aligner, upstream, keys=keys, default=default)


def test_streams_send_the_outcome_headers_known_before_the_first_byte(app):
    off = chat(app, key="off", stream=True)
    assert outcome(off) == {"mode": "off", "changed": "false", "similarity": "1.0", "skipped": "disabled"}
    chunks = events(off)
    assert chunks[0]["choices"][0]["delta"]["content"] == f"Answer 0 to: {QUESTION}"
    assert chunks[-1]["aligner"]["skipped"] == "disabled"
    inspected = chat(app, key="inspect", stream=True, n=2)
    assert outcome(inspected)["inspector-passed"] == "true,false"
    finals = [c for c in events(inspected) if c["choices"] and c["choices"][0]["finish_reason"]]
    assert [f["aligner"]["inspector"]["score"] for f in finals] == [0.9, 0.2]
    corrected = chat(app, stream=True, n=2)
    assert outcome(corrected) == {
        "mode": "correct"
    }  # a correction streams: its outcome is in the final chunk
    assert set(timing(corrected)) == {"upstream", "aligner"}  # what the time to the first byte went to
    finals = [c for c in events(corrected) if c["choices"] and c["choices"][0]["finish_reason"]]
    assert [f["aligner"].get("skipped") for f in finals] == ["inspector_passed", None]
    tools = chat(app, stream=True, tools=[{"type": "function", "function": {"name": "paint"}}])
    assert outcome(tools) == {
        "mode": "correct",
        "changed": "false",
        "similarity": "1.0",
        "skipped": "tool_calls",
    }


def test_corrections_obey_the_mode(app, tiny_aligner):
    off = call(app, "POST", "/v1/corrections", key="off", json={"question": "Q?", "answer": "Six legs."})
    data = off.json()
    assert data["text"] == data["original"] == "Six legs." and data["changed"] is False
    assert data["metadata"]["skipped"] == "disabled" and data["completion_tokens"] == 0
    assert outcome(off) == {"mode": "off", "changed": "false", "similarity": "1.0", "skipped": "disabled"}
    batch = call(
        app,
        "POST",
        "/v1/corrections",
        key="open",
        headers={"x-aligner-mode": "inspect"},
        json={
            "items": [
                {"question": "Q?", "answer": "Answer 0."},
                {"question": "Q?", "answer": "Eight."},
                {"question": "Q?", "answer": "  "},
                {"question": "Q?"},
            ]
        },
    )
    items = batch.json()["items"]
    assert [i.get("metadata", {}).get("inspector_passed") for i in items] == [True, False, None, None]
    assert [i.get("text") for i in items[:2]] == ["Answer 0.", "Eight."]
    assert {i["metadata"]["skipped"] for i in items[:2]} == {"inspect_only"}
    assert [i.get("status") for i in items] == [None, None, 400, 400]
    assert outcome(batch) == {"mode": "inspect"}  # a batch's outcomes are in its items
    one = call(app, "POST", "/v1/corrections", key="inspect", json={"question": "Q?", "answer": "Eight."})
    assert outcome(one)["inspector-score"] == "0.2" and one.json()["metadata"]["inspector_score"] == 0.2
    bad = call(
        app,
        "POST",
        "/v1/corrections",
        key="open",
        json={"question": "Q?", "answer": "A.", "aligner": {"correct_structured": True}},
    )
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "aligner.correct_structured"
    assert corrections_run(app) == ""


def test_keys_with_policies_keep_the_401(app):
    for key in (None, "nope"):
        resp = chat(app, key=key)
        assert resp.status_code == 401 and resp.headers["www-authenticate"] == "Bearer"
        assert resp.json()["error"]["code"] == "invalid_api_key"
    assert call(app, "GET", "/health", key="off").status_code == 200


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/responses"])
def test_completions_and_responses_answer_a_json_404_saying_what_is_served(app, path):
    resp = call(app, "POST", path, json={"model": "up", "prompt": "q", "input": "q"})
    error = resp.json()["error"]
    assert resp.status_code == 404 and resp.headers["content-type"] == "application/json"
    assert error["code"] == "not_found" and f"POST {path} is not served" in error["message"]
    assert "POST /v1/chat/completions" in error["message"] and "POST /v1/corrections" in error["message"]
