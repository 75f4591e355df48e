"""A real HTTP reverse proxy that injects faults in front of a real server.

Each incoming request takes the next fault from a script (``"503"``, ``"429"``, ``"drop"``, ``"slow"``),
then everything passes through to the upstream unchanged (streaming included). Used to prove that
retries, backoff and ``Retry-After`` work against real sockets, without touching the vLLM server.

A ``"reply"`` fault answers the request itself with a chat completion whose message is the next one in
``replies`` (shapes a real server may send but the test server does not: content as a list of parts, a
number). Every request's path and body are kept in ``bodies``, so a test can read what a client sent.
"""

from __future__ import annotations

import json
import threading
import time
from collections import deque
from collections.abc import Iterable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx


class FaultProxy:
    def __init__(self, upstream_root: str, faults: Iterable[str] = (), *, retry_after: float | None = None):
        self.upstream = upstream_root.rstrip("/")
        self.faults: deque[str] = deque(faults)
        self.retry_after = retry_after
        self.hits: list[tuple[float, str, str]] = []  # (time, path, what happened)
        self.bodies: list[tuple[str, bytes]] = []  # (path, body) of every request, in order
        self.replies: deque[dict[str, Any]] = deque()  # the messages "reply" faults answer with
        self.lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                proxy._handle(self, "GET")

            def do_POST(self) -> None:
                proxy._handle(self, "POST")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _handle(self, h: BaseHTTPRequestHandler, method: str) -> None:
        body = h.rfile.read(int(h.headers.get("content-length") or 0)) if method == "POST" else b""
        with self.lock:
            fault = self.faults.popleft() if self.faults and h.path.endswith("completions") else "pass"
            self.hits.append((time.monotonic(), h.path, fault))
            self.bodies.append((h.path, body))
            message = self.replies.popleft() if fault == "reply" else None
        if fault == "drop":  # close the socket without an answer, as a crashing server does
            h.close_connection = True
            h.connection.close()
            return
        if fault in ("503", "429"):
            payload = b'{"error": {"message": "injected ' + fault.encode() + b'"}}'
            h.send_response(int(fault))
            if fault == "429" and self.retry_after is not None:
                h.send_header("Retry-After", f"{self.retry_after:g}")
            h.send_header("content-type", "application/json")
            h.send_header("content-length", str(len(payload)))
            h.end_headers()
            h.wfile.write(payload)
            return
        if message is not None:
            self._send_json(
                h,
                200,
                {
                    "id": "chatcmpl-fault",
                    "object": "chat.completion",
                    "created": 1,
                    "model": "fault",
                    "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
                },
            )
            return
        if fault == "slow":
            time.sleep(5)
        headers = {"content-type": h.headers.get("content-type", "application/json")}
        with (
            httpx.Client(timeout=120) as client,
            client.stream(method, self.upstream + h.path, content=body, headers=headers) as resp,
        ):
            h.send_response(resp.status_code)
            h.send_header("content-type", resp.headers.get("content-type", "application/json"))
            h.send_header("transfer-encoding", "chunked")
            h.end_headers()
            for chunk in resp.iter_raw():
                h.wfile.write(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
                h.wfile.flush()
            h.wfile.write(b"0\r\n\r\n")

    @staticmethod
    def _send_json(h: BaseHTTPRequestHandler, status: int, payload: Any) -> None:
        data = json.dumps(payload).encode()
        h.send_response(status)
        h.send_header("content-type", "application/json")
        h.send_header("content-length", str(len(data)))
        h.end_headers()
        h.wfile.write(data)
