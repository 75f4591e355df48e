"""A scripted OpenAI-compatible server on loopback, to probe a real ``aligner serve`` process without a model.

It plays both parts the proxy talks to:

- the **upstream** (``/v1/chat/completions``, model ``fake-up``): each request takes the next entry of ``script``
  (a dict with ``kind``), else answers ``"Answer {i} to: {question}"`` for each of its ``n`` choices. Kinds:
  ``message`` (answer with ``message``, ``finish_reason``, ``logprobs`` as given), ``hold`` (wait until ``release``
  is set, then answer), ``trickle`` (send the answer one byte every ``interval`` seconds), ``huge`` (a ``size``-byte
  answer, streamed in 1 MB pieces so this server never holds it). An unknown model name gets vLLM's 404.
- a **fake Aligner** (``/v1/completions``, model ``aligner-7b-fake``, so the proxy picks the ``aligner-v1``
  template): the correction of an answer is ``"Corrected: {answer} (checked)"``, one token per word, cut at the
  request's ``stop`` strings and ``max_tokens`` as vLLM cuts them, streamed when asked; ``/tokenize`` counts words.

Every request's path and JSON body is kept in ``bodies``; ``arrived`` is set when a ``hold`` request came in.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

UPSTREAM = "fake-up"
ALIGNER = "aligner-7b-fake"
MAX_MODEL_LEN = 4096
_PAIR = re.compile(r"harmless: (?P<question>.*) \| (?P<answer>.*) ASSISTANT:$", re.S)


class FakeUpstream:
    def __init__(self) -> None:
        self.script: deque[dict[str, Any]] = deque()
        self.bodies: list[tuple[str, Any]] = []
        self.release = threading.Event()
        self.arrived = threading.Event()
        self.lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                fake._get(self)

            def do_POST(self) -> None:
                fake._post(self)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()

    def chat_bodies(self) -> list[dict[str, Any]]:
        return [b for p, b in self.bodies if p.endswith("/chat/completions")]

    def aligner_bodies(self) -> list[dict[str, Any]]:
        return [b for p, b in self.bodies if p.endswith("/v1/completions")]

    # -- routes -----------------------------------------------------------------------------------

    def _get(self, h: BaseHTTPRequestHandler) -> None:
        if h.path.rstrip("/") != "/v1/models":
            return _send(h, 404, {"error": {"message": "Not Found", "type": "NotFoundError", "code": 404}})
        data = [
            {
                "id": name,
                "object": "model",
                "created": 1,
                "owned_by": "fake",
                "root": f"/models/{name}",
                "max_model_len": MAX_MODEL_LEN,
            }
            for name in (UPSTREAM, ALIGNER)
        ]
        _send(h, 200, {"object": "list", "data": data})

    def _post(self, h: BaseHTTPRequestHandler) -> None:
        raw = h.rfile.read(int(h.headers.get("content-length") or 0))
        body = json.loads(raw or b"{}")
        with self.lock:
            self.bodies.append((h.path, body))
        if h.path == "/tokenize":
            return _send(h, 200, {"tokens": [0] * len(str(body.get("prompt", "")).split())})
        if h.path == "/v1/completions":
            return self._correct(h, body)
        if h.path != "/v1/chat/completions":
            return _send(h, 404, {"error": {"message": "Not Found", "type": "NotFoundError", "code": 404}})
        if body.get("model") not in (UPSTREAM, ALIGNER):
            return _send(
                h,
                404,
                {
                    "error": {
                        "message": f"The model `{body.get('model')}` does not exist.",
                        "type": "NotFoundError",
                        "param": None,
                        "code": 404,
                    }
                },
            )
        with self.lock:
            step = self.script.popleft() if self.script else {"kind": "answer"}
        kind = step["kind"]
        if kind == "hold":
            self.arrived.set()
            self.release.wait(timeout=60)
        if kind == "huge":
            return _send_huge(h, step["size"])
        payload = json.dumps(self._completion(body, step)).encode()
        if kind == "trickle":
            return _trickle(h, payload, step.get("interval", 0.5))
        _send_bytes(h, 200, payload)

    def _completion(self, body: dict[str, Any], step: dict[str, Any]) -> dict[str, Any]:
        question = next(
            (m.get("content") for m in reversed(body.get("messages", [])) if m.get("role") == "user"),
            "nothing",
        )
        n = body.get("n") or 1
        choices = []
        for i in range(n):
            message = step.get("message") or {"role": "assistant", "content": f"Answer {i} to: {question}"}
            choice = {"index": i, "message": message, "finish_reason": step.get("finish_reason", "stop")}
            if body.get("logprobs"):
                choice["logprobs"] = step.get(
                    "logprobs",
                    {"content": [{"token": "Answer", "logprob": -0.1, "bytes": None, "top_logprobs": []}]},
                )
            choices.append(choice)
        return {
            "id": "chatcmpl-fake",
            "object": "chat.completion",
            "created": 1,
            "model": body.get("model"),
            "choices": choices,
            "usage": {"prompt_tokens": 11, "completion_tokens": 7 * n, "total_tokens": 11 + 7 * n},
        }

    def _correct(self, h: BaseHTTPRequestHandler, body: dict[str, Any]) -> None:
        """The fake Aligner: restate the answer with a marker, cut as vLLM cuts."""
        match = _PAIR.search(str(body.get("prompt", "")))
        words = f"Corrected: {match['answer'] if match else '?'} (checked)".split(" ")
        text, finish = " ".join(words[: body.get("max_tokens") or len(words)]), "length"
        if len(words) <= (body.get("max_tokens") or len(words)):
            finish = "stop"
        stops = body.get("stop") or []
        cut = min((p for p in (text.find(s) for s in stops) if p >= 0), default=-1)
        if cut >= 0:
            text, finish = text[:cut], "stop"
        usage = {
            "prompt_tokens": len(str(body.get("prompt", "")).split()),
            "completion_tokens": len(text.split()),
        }
        if not body.get("stream"):
            return _send(
                h,
                200,
                {
                    "id": "cmpl-fake",
                    "object": "text_completion",
                    "model": ALIGNER,
                    "choices": [{"index": 0, "text": text, "finish_reason": finish}],
                    "usage": usage,
                },
            )
        pieces = [w + " " for w in text.split(" ")]
        pieces[-1] = pieces[-1][:-1]
        events = [{"choices": [{"index": 0, "text": p, "finish_reason": None}]} for p in pieces]
        events.append({"choices": [{"index": 0, "text": "", "finish_reason": finish}]})
        events.append({"choices": [], "usage": usage})
        stream = b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events) + b"data: [DONE]\n\n"
        h.send_response(200)
        h.send_header("content-type", "text/event-stream")
        h.send_header("content-length", str(len(stream)))
        h.end_headers()
        h.wfile.write(stream)


def _send(h: BaseHTTPRequestHandler, status: int, payload: Any) -> None:
    _send_bytes(h, status, json.dumps(payload).encode())


def _send_bytes(h: BaseHTTPRequestHandler, status: int, data: bytes) -> None:
    h.send_response(status)
    h.send_header("content-type", "application/json")
    h.send_header("content-length", str(len(data)))
    h.end_headers()
    h.wfile.write(data)


def _trickle(h: BaseHTTPRequestHandler, data: bytes, interval: float) -> None:
    """Headers at once, then one byte per ``interval``: each read is quick, the whole answer takes ages."""
    h.send_response(200)
    h.send_header("content-type", "application/json")
    h.send_header("content-length", str(len(data)))
    h.end_headers()
    try:
        for i in range(len(data)):
            h.wfile.write(data[i : i + 1])
            h.wfile.flush()
            time.sleep(interval)
    except OSError:  # the proxy gave up and closed the connection
        h.close_connection = True


def _send_huge(h: BaseHTTPRequestHandler, size: int) -> None:
    """A chat completion whose content is ``size`` bytes of text, without a Content-Length (as a streaming server
    sends it), written in 1 MB pieces."""
    head = (
        b'{"id": "chatcmpl-huge", "object": "chat.completion", "created": 1, "model": "fake-up", "choices": ['
        b'{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "'
    )
    tail = b'"}}], "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}'
    h.send_response(200)
    h.send_header("content-type", "application/json")
    h.send_header("transfer-encoding", "chunked")
    h.end_headers()
    piece = b"word " * 200_000
    try:
        for part in [head, *[piece] * (size // len(piece)), tail]:
            h.wfile.write(f"{len(part):x}\r\n".encode() + part + b"\r\n")
        h.wfile.write(b"0\r\n\r\n")
    except OSError:  # the proxy stopped reading at its limit
        h.close_connection = True
