"""The upstream model: any OpenAI-compatible chat-completions server, called with httpx.

Its errors come back as the status it sent (so clients see the upstream's 400, 401, 429 ...), a dead
or silent upstream as 502/504; its API key is sent to it alone and scrubbed from anything passed back.
Two bounds hold whatever the upstream does: ``timeout`` is a deadline for the whole call (an upstream that
trickles a byte at a time cannot hold a request past it), and ``max_response_bytes`` caps what is read (a
runaway answer is a fast 502, never tens of megabytes parsed and tokenized).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import Mapping
from typing import Any

import httpx

from .memory import release_memory_soon

logger = logging.getLogger("aligner_serve")


#: Responses larger than this are parsed in a worker thread, and the memory they took is handed back after.
LARGE_RESPONSE_BYTES = 1_048_576


class UpstreamError(Exception):
    """The upstream did not give a usable answer; ``status`` is what the proxy answers with."""

    status = 502
    type = "upstream_error"
    code = "upstream_error"

    def __init__(
        self, message: str, *, status: int | None = None, body: Any = None, retry_after: str | None = None
    ) -> None:
        super().__init__(message)
        if status is not None:
            self.status = status
        self.body = body
        self.retry_after = retry_after


class UpstreamStatusError(UpstreamError):
    """The upstream answered with an error status: passed back with that status and its error body."""


class UpstreamUnavailableError(UpstreamError):
    """The upstream refused or dropped the connection, or sent something that is not a chat completion (502)."""


class UpstreamTooLargeError(UpstreamError):
    """The upstream's response is over ``max_response_bytes`` (502): reading stops there."""

    code = "upstream_response_too_large"


class UpstreamTimeoutError(UpstreamError):
    """The upstream did not answer within the timeout (504)."""

    status = 504
    type = "upstream_timeout"
    code = "upstream_timeout"


class Upstream:
    """An async client of one OpenAI-compatible server (connections pooled for the proxy's lifetime)."""

    def __init__(
        self,
        base_url: str,
        *,
        model: str | None = None,
        api_key: str | None = None,
        timeout: float = 120.0,
        max_retries: int = 2,
        max_connections: int = 256,
        max_response_bytes: int = 8_388_608,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        """``model`` is the upstream name the proxy's served name stands for (``models.ModelMap``); ``timeout`` the
        deadline of one whole call, connecting and retries included; ``transport`` replaces the network (e.g.
        ``httpx.ASGITransport(app)`` for an in-process upstream)."""
        if not re.match(r"^https?://[^/]+", base_url or ""):
            raise ValueError(
                f"the upstream URL must be http(s), e.g. http://127.0.0.1:8001/v1, got {base_url!r}"
            )
        if not timeout > 0:
            raise ValueError(f"the upstream timeout must be a positive number of seconds, got {timeout!r}")
        if (
            isinstance(max_response_bytes, bool)
            or not isinstance(max_response_bytes, int)
            or max_response_bytes < 1
        ):
            raise ValueError(f"max_response_bytes must be a positive integer, got {max_response_bytes!r}")
        url = base_url.rstrip("/")
        self.base_url = url if url.endswith("/v1") else url + "/v1"
        self.model = model
        self.timeout = float(timeout)
        self.max_retries = max_retries
        self.max_response_bytes = max_response_bytes
        self._secret = api_key or None
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = httpx.AsyncClient(
            timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)),
            headers=headers,
            limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
            transport=transport,
        )

    def __repr__(self) -> str:  # the key stays out of reprs and logs
        return f"Upstream({self.base_url!r}, model={self.model!r})"

    async def aclose(self) -> None:
        await self._client.aclose()

    async def chat(self, body: Mapping[str, Any], headers: Mapping[str, str] | None = None) -> dict[str, Any]:
        """POST ``/chat/completions`` (never streamed: the whole answer is corrected at once); ``headers`` adds
        to the request's (the trace context, ``traceparent``)."""
        data = await self._json("POST", "/chat/completions", body, headers)
        if not isinstance(data, dict) or not isinstance(data.get("choices"), list):
            raise UpstreamUnavailableError(
                f"the upstream {self.base_url} answered something that is not a chat "
                "completion (no 'choices')"
            )
        return data

    async def models(self) -> list[dict[str, Any]]:
        """The upstream's ``/models`` list."""
        data = await self._json("GET", "/models", None)
        items = data.get("data") if isinstance(data, dict) else None
        return [m for m in items or [] if isinstance(m, dict)]

    async def _json(
        self, method: str, path: str, body: Mapping[str, Any] | None, headers: Mapping[str, str] | None = None
    ) -> Any:
        """The upstream's JSON answer, within the deadline for the whole call."""
        try:
            return await asyncio.wait_for(
                self._call(method, self.base_url + path, body, headers), self.timeout
            )
        except asyncio.TimeoutError:
            raise UpstreamTimeoutError(
                f"the upstream {self.base_url} did not answer within {self.timeout:g}s"
            ) from None

    async def _call(
        self, method: str, url: str, body: Mapping[str, Any] | None, headers: Mapping[str, str] | None = None
    ) -> Any:
        for attempt in range(self.max_retries + 1):
            try:
                async with self._client.stream(method, url, json=body, headers=dict(headers or {})) as resp:
                    raw = await self._read(resp)
                break
            except httpx.ConnectError as exc:  # nothing was sent: safe to try again
                if attempt < self.max_retries:
                    await asyncio.sleep(0.25 * 2**attempt)
                    continue
                raise UpstreamUnavailableError(
                    f"cannot connect to the upstream {self.base_url}: {exc}"
                ) from None
            except httpx.TimeoutException:
                raise UpstreamTimeoutError(f"the upstream {self.base_url} did not answer in time") from None
            except httpx.HTTPError as exc:  # dropped mid-request, protocol errors
                raise UpstreamUnavailableError(
                    f"the upstream {self.base_url} failed the request ({type(exc).__name__}: {exc})"
                ) from None
        if resp.status_code >= 400:
            raise UpstreamStatusError(
                f"the upstream answered {resp.status_code}",
                status=resp.status_code,
                body=self._error_body(raw),
                retry_after=resp.headers.get("retry-after"),
            )
        try:
            if len(raw) > LARGE_RESPONSE_BYTES:  # parsing megabytes would stall every other request
                return await asyncio.to_thread(json.loads, raw)
            return json.loads(raw)
        except ValueError:
            raise UpstreamUnavailableError(f"the upstream {self.base_url} answered invalid JSON") from None
        finally:
            if len(raw) > LARGE_RESPONSE_BYTES:
                release_memory_soon()

    async def _read(self, resp: httpx.Response) -> bytes:
        """The response body, read up to ``max_response_bytes`` (``UpstreamTooLargeError`` past it)."""
        cap = self.max_response_bytes
        declared = resp.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > cap:
            raise self._too_large(f"{declared} bytes")
        parts: list[bytes] = []
        size = 0
        async for part in resp.aiter_bytes():  # decoded: a gzip bomb counts what it inflates to
            size += len(part)
            if size > cap:
                parts.clear()
                release_memory_soon()
                raise self._too_large(f"more than {cap} bytes")
            parts.append(part)
        return b"".join(parts)

    def _too_large(self, size: str) -> UpstreamTooLargeError:
        logger.warning(
            "the upstream's response is %s, over the limit of %d bytes", size, self.max_response_bytes
        )
        return UpstreamTooLargeError(
            f"the upstream's response is {size}, over the proxy's limit of "
            f"{self.max_response_bytes} bytes (--max-upstream-bytes); it is not passed on"
        )

    def _error_body(self, raw: bytes) -> Any:
        """The upstream's error body, with its API key scrubbed (some servers echo part of a bad key)."""
        try:
            body: Any = json.loads(raw)
        except ValueError:
            text = raw[:2000].decode("utf-8", "replace")
            body = {"error": {"message": text, "type": "upstream_error", "param": None, "code": None}}
        return self.scrub(body)

    def scrub(self, value: Any) -> Any:
        """``value`` with every occurrence of the upstream key (and its long prefixes) replaced."""
        if not self._secret:
            return value
        if isinstance(value, str):
            out = value.replace(self._secret, "***")
            if len(self._secret) >= 12:  # "Incorrect API key provided: sk-abc...xyz" style echoes
                out = out.replace(self._secret[:8], "***")
            return out
        if isinstance(value, dict):
            return {k: self.scrub(v) for k, v in value.items()}
        if isinstance(value, list):
            return [self.scrub(v) for v in value]
        return value
