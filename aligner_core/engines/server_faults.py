"""What a failed exchange with an OpenAI-compatible server means: the library's error (with the server's own
message and what to do about it), whether it is worth retrying, and how long to wait before the next try.

``engine`` is a ``ServerEngine``: its ``max_retries``, ``timeout``, ``backoff``, ``model_name`` and
``served_models`` go into the messages and the backoff.
"""

from __future__ import annotations

import json
import random
import re
from typing import Any

from ..errors import (
    ServerContextOverflowError,
    ServerError,
    ServerRequestError,
    ServerTimeoutError,
    ServerUnavailableError,
)

#: Statuses worth another try (the server is busy, restarting or briefly failing).
RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}
#: Words a server's 400/413/422 uses when the prompt does not fit the model's context.
CONTEXT_WORDS = re.compile(
    r"context length|max_model_len|maximum context|too long|context window|exceed", re.I
)


def delay(engine: Any, attempt: int, error: ServerError) -> float:
    """Seconds before the next try: the server's ``Retry-After`` (at most 30 s), else jittered exponential backoff."""
    retry_after = getattr(error, "retry_after", None)
    if retry_after is not None:
        return min(retry_after, 30.0)
    return min(engine.backoff * 2**attempt, 8.0) * (0.75 + random.random() / 2)


def unavailable(engine: Any, url: str, exc: BaseException) -> ServerUnavailableError:
    """The connection failed on every try."""
    return ServerUnavailableError(
        f"cannot reach {url} ({type(exc).__name__}: {exc or 'connection failed'}) after {engine.max_retries} "
        "retries: is the server running and the URL right? Start it, or raise max_retries/timeout",
        url=url,
    )


def timed_out(engine: Any, url: str, exc: BaseException) -> ServerTimeoutError:
    """No answer within ``timeout`` on every try."""
    return ServerTimeoutError(
        f"{url} did not answer within timeout={engine.timeout:g}s ({type(exc).__name__}), after "
        f"{engine.max_retries} retries: the server is overloaded or the request too long; raise timeout, "
        "lower max_new_tokens or max_concurrency",
        url=url,
    )


def status_error(
    engine: Any, url: str, status: int, text: str, *, retry_after: str | None = None
) -> ServerError:
    """An HTTP error status as the library's error: retryable ones as ``ServerUnavailableError`` (carrying
    ``retry_after``), a prompt too long for the context as ``ServerContextOverflowError``, the rest at once."""
    message = server_message(text)
    if status in RETRY_STATUS:
        error: ServerError = ServerUnavailableError(
            f"{url} answered {status} ({message}) after {engine.max_retries} retries: the server is busy or "
            "failing; retry later, lower max_concurrency, or raise max_retries",
            url=url,
            status=status,
        )
        try:
            error.retry_after = float(retry_after) if retry_after else None  # type: ignore[attr-defined]
        except ValueError:
            error.retry_after = None  # type: ignore[attr-defined]
        return error
    if status in (401, 403):
        return ServerRequestError(
            f"{url} refused the API key ({status}: {message}): pass api_key=...", url=url, status=status
        )
    if status == 404 and "model" in message.lower():
        served = getattr(engine, "served_models", None)
        hint = f" (it serves: {', '.join(served)})" if served else ""
        return ServerRequestError(
            f"{url} does not serve model {engine.model_name!r}{hint}: {message}", url=url, status=status
        )
    if status in (400, 413, 422) and CONTEXT_WORDS.search(message):
        return ServerContextOverflowError(
            f"{url} refused the prompt as too long for the model's context: {message} -- shorten the answer, "
            "lower max_new_tokens, or pass on_overflow='truncate'",
            url=url,
            status=status,
        )
    return ServerRequestError(f"{url} rejected the request ({status}): {message}", url=url, status=status)


def server_message(text: str) -> str:
    """The human part of an error body: OpenAI's ``{"error": {"message"}}``, vLLM's, or the raw text."""
    try:
        data = json.loads(text)
    except ValueError:
        return text.strip()[:500] or "no message"
    if isinstance(data, dict):
        err = data.get("error", data)
        if isinstance(err, dict):
            return str(err.get("message") or err.get("detail") or err)[:500]
        if isinstance(data.get("detail"), str):
            return data["detail"][:500]
        return str(err)[:500]
    return str(data)[:500]


__all__ = ["RETRY_STATUS", "delay", "server_message", "status_error", "timed_out", "unavailable"]
