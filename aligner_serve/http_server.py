"""Running the app under uvicorn with the guards uvicorn lacks: a deadline for a request's headers (a slow-loris
client that trickles them, or a connection that never sends any, is closed), a JSON body on the 400 uvicorn sends
for a request it cannot parse, and the graceful stop of ``drain`` (SIGTERM waits ``shutdown_grace``, then 503s).

The body's own deadline is the app's (``body.read_json``, a 408), since by then a handler owns the request.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import h11
import uvicorn
from starlette.applications import Starlette
from uvicorn.protocols.http.h11_impl import H11Protocol

from .drain import Drain
from .openai_schema import error_body

logger = logging.getLogger("aligner_serve")

#: Seconds uvicorn waits past the grace for the 503s to be written before it cancels what is left.
WRITE_MARGIN_S = 5.0


class HeaderDeadlineProtocol(H11Protocol):
    """uvicorn's h11 protocol, closing a connection that has not sent a whole request head within
    ``header_timeout`` seconds of connecting or of starting its next request."""

    header_timeout: float | None = 30.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        if self._head_timer is None and self.conn.their_state is h11.IDLE:
            self._arm()  # the first bytes of the next request on a kept-alive connection
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:  # the head is in: the body has the app's deadline
            self._disarm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def on_response_complete(self) -> None:
        self._disarm()  # idle between requests: uvicorn's keep-alive timeout applies
        super().on_response_complete()

    def send_400_response(self, msg: str) -> None:
        """A request uvicorn cannot parse: the 400 in OpenAI's JSON shape instead of plain text."""
        body = json.dumps(error_body(msg, type="invalid_request_error", code="invalid_http_request")).encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),
        ]
        for event in (
            h11.Response(status_code=400, headers=headers, reason=b"Bad Request"),
            h11.Data(data=body),
            h11.EndOfMessage(),
        ):
            self.transport.write(self.conn.send(event))
        self.transport.close()

    def _arm(self) -> None:
        if self.header_timeout is not None and self._head_timer is None:
            self._head_timer = self.loop.call_later(self.header_timeout, self._expire)

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _expire(self) -> None:
        self._head_timer = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            logger.info(
                "closed a connection that sent no complete request head within %gs", self.header_timeout
            )
            self.transport.close()


class DrainingServer(uvicorn.Server):
    """uvicorn's server, starting the app's grace period as it starts to shut down."""

    def __init__(self, config: uvicorn.Config, drain: Drain) -> None:
        super().__init__(config)
        self.drain = drain

    async def shutdown(self, sockets: Any = None) -> None:
        self.drain.begin()
        await super().shutdown(sockets)


def protocol_with_deadline(header_timeout: float | None) -> type[HeaderDeadlineProtocol]:
    """The protocol class uvicorn instantiates per connection, with the header deadline set."""
    return type("HeaderDeadlineProtocol", (HeaderDeadlineProtocol,), {"header_timeout": header_timeout})


def run(app: Starlette, *, host: str, port: int, log_level: str) -> None:
    """Serve ``app`` (from ``build_app``) until SIGTERM/SIGINT, with its limits' header deadline and grace."""
    limits = app.state.proxy.limits
    drain: Drain = app.state.drain
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        lifespan="on",
        http=protocol_with_deadline(limits.read_timeout),
        timeout_graceful_shutdown=int(limits.shutdown_grace + WRITE_MARGIN_S),
    )
    DrainingServer(config, drain).run()


__all__ = ["DrainingServer", "HeaderDeadlineProtocol", "protocol_with_deadline", "run"]
