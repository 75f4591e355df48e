"""Reading a client's JSON body: capped in size and time, and strict about what JSON it accepts.

Python's ``json`` accepts what no OpenAI-compatible server does (``NaN``/``Infinity`` literals, lone ``\\ud800``
surrogates that cannot be encoded again) and fails deep inside on 40,000-deep nesting; each of those used to
surface later as a 500. Here they are a 400 at the door, as vLLM answers them. A client that hangs up while
sending is a 499, a client too slow to send its body a 408: neither is the proxy's failure.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from starlette.requests import ClientDisconnect, Request

#: Deepest nesting of arrays and objects a request may hold (a JSON schema in ``response_format`` nests a few
#: dozen levels at most).
MAX_DEPTH = 128


class BodyTooLargeError(Exception):
    """The request body is over the size limit (HTTP 413)."""


class MalformedJSONError(ValueError):
    """The request body is not JSON this proxy accepts (HTTP 400)."""


class ClientClosedError(Exception):
    """The client hung up before its body was read (HTTP 499, logged without a traceback)."""


class BodyTimeoutError(Exception):
    """The client did not send its whole body within the read timeout (HTTP 408, connection closed)."""


async def read_json(request: Request, max_bytes: int, *, timeout: float | None = None) -> Any:
    """The request's JSON body, reading at most ``max_bytes`` within ``timeout`` seconds."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise BodyTooLargeError(f"the request body is {declared} bytes, over the limit of {max_bytes}")
    try:
        raw = await asyncio.wait_for(_read(request, max_bytes), timeout)
    except asyncio.TimeoutError:
        raise BodyTimeoutError(f"the request body was not sent within {timeout:g}s") from None
    except ClientDisconnect:
        raise ClientClosedError("the client closed the connection while sending the body") from None
    return parse_json(raw)


async def _read(request: Request, max_bytes: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    async for part in request.stream():
        size += len(part)
        if size > max_bytes:
            raise BodyTooLargeError(f"the request body is over the limit of {max_bytes} bytes")
        chunks.append(part)
    return b"".join(chunks)


def parse_json(raw: bytes | str) -> Any:
    """Strict JSON: no ``NaN``/``Infinity``, no lone surrogates, at most ``MAX_DEPTH`` levels deep."""
    try:
        value = json.loads(raw, parse_constant=_refuse_constant)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MalformedJSONError(f"the request body is not valid JSON: {exc}") from None
    except RecursionError:
        raise MalformedJSONError(f"the request body nests deeper than {MAX_DEPTH} levels") from None
    _check(value)
    return value


def _refuse_constant(name: str) -> Any:
    raise MalformedJSONError(f"the request body is not valid JSON: {name} is not a JSON number")


def _check(value: Any) -> None:
    """Walk ``value`` (without recursion): its depth, and every string and key encodable as UTF-8."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, str):
            _encodable(item)
        elif isinstance(item, (dict, list)):
            if depth > MAX_DEPTH:
                raise MalformedJSONError(f"the request body nests deeper than {MAX_DEPTH} levels")
            if isinstance(item, dict):
                for key, child in item.items():
                    _encodable(key)
                    stack.append((child, depth + 1))
            else:
                stack.extend((child, depth + 1) for child in item)


def _encodable(text: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise MalformedJSONError(
            f"the request body holds a lone surrogate {text[exc.start]!r} (an unpaired \\ud800-\\udfff escape): it is "
            "not valid Unicode text"
        ) from None


__all__ = [
    "MAX_DEPTH",
    "BodyTimeoutError",
    "BodyTooLargeError",
    "ClientClosedError",
    "MalformedJSONError",
    "parse_json",
    "read_json",
]
