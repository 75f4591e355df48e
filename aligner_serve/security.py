"""What guards the proxy: API keys, request-size limits and admission (429 past the queue limit).

Keys are compared in constant time and never logged; bodies are read with a byte cap, so a huge or
endless upload costs at most ``max_body_bytes``; admission is a counter, so a full proxy answers at
once instead of queueing without bound.
"""

from __future__ import annotations

import hmac
import json
import math
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from starlette.requests import Request


class BodyTooLargeError(Exception):
    """The request body is over the size limit (HTTP 413)."""


class MalformedJSONError(ValueError):
    """The request body is not valid JSON (HTTP 400)."""


class ApiKeys:
    """The keys a caller may present as ``Authorization: Bearer KEY`` (or ``X-API-Key``); empty: no check."""

    def __init__(self, keys: Iterable[str] = ()) -> None:
        self._keys = [k.encode() for k in keys if k]

    @classmethod
    def load(cls, keys: Iterable[str] = (), key_file: str | os.PathLike[str] | None = None) -> ApiKeys:
        """Keys given directly plus those in ``key_file`` (one per line; blank lines and ``#`` comments skipped)."""
        found = [k.strip() for k in keys if k and k.strip()]
        if key_file is not None:
            for line in Path(key_file).read_text().splitlines():
                line = line.strip()
                if line and not line.startswith("#"):
                    found.append(line)
        return cls(found)

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def __repr__(self) -> str:
        return f"ApiKeys({len(self._keys)} key(s))"

    def allows(self, request: Request) -> bool:
        """Whether the request carries one of the keys (always, when no key is configured)."""
        if not self._keys:
            return True
        presented = _presented_key(request)
        if presented is None:
            return False
        candidate = presented.encode()
        # Compare with every key, no early exit, so the timing says nothing about which key nearly matched.
        return sum(hmac.compare_digest(candidate, key) for key in self._keys) > 0


def _presented_key(request: Request) -> str | None:
    auth = request.headers.get("authorization")
    if auth:
        scheme, _, token = auth.partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
    return request.headers.get("x-api-key")


async def read_json(request: Request, max_bytes: int) -> Any:
    """The request's JSON body, reading at most ``max_bytes`` (``BodyTooLargeError`` beyond)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise BodyTooLargeError(f"the request body is {declared} bytes, over the limit of {max_bytes}")
    chunks: list[bytes] = []
    size = 0
    async for part in request.stream():
        size += len(part)
        if size > max_bytes:
            raise BodyTooLargeError(f"the request body is over the limit of {max_bytes} bytes")
        chunks.append(part)
    raw = b"".join(chunks)
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MalformedJSONError(f"the request body is not valid JSON: {exc}") from None


class Admission:
    """Counts requests in progress; past ``limit`` new ones are refused (429) rather than queued.

    One event loop owns it (the server's), so plain integers suffice. ``retry_after`` estimates when
    room frees up from a moving average of how long requests take.
    """

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"the queue limit must be a positive integer, got {limit}")
        self.limit = limit
        self.active = 0
        self._avg_s = 1.0

    def try_acquire(self, slots: int = 1) -> bool:
        if self.active + slots > self.limit:
            return False
        self.active += slots
        return True

    def release(self, slots: int = 1, elapsed_s: float | None = None) -> None:
        self.active = max(0, self.active - slots)
        if elapsed_s is not None:
            self._avg_s = 0.8 * self._avg_s + 0.2 * elapsed_s

    @property
    def retry_after(self) -> int:
        """Seconds to suggest in ``Retry-After`` (whole seconds, at least 1)."""
        return max(1, math.ceil(self._avg_s))
