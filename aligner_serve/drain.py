"""A graceful stop: on SIGTERM, requests in progress get ``shutdown_grace`` seconds to finish; those still
running then are cancelled and answered with an OpenAI-shaped 503 (a stream ends with an ``error`` event), never
uvicorn's text/plain 500 for a cancelled task.

``http_server.DrainingServer`` calls ``begin`` when uvicorn starts shutting down; the request handlers race their
work against ``wait()``.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections.abc import AsyncIterator

logger = logging.getLogger("aligner_serve")

MESSAGE = "the correction proxy is shutting down: retry the request"


class Drain:
    """The shutdown state one app shares with its server."""

    def __init__(self, grace: float) -> None:
        self.grace = grace
        self.draining = False
        self.expired = False
        self._events: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Event] = (
            weakref.WeakKeyDictionary()
        )

    async def wait(self) -> None:
        """Until the grace is over (an event per event loop: an app may be driven from several, as tests do)."""
        loop = asyncio.get_running_loop()
        event = self._events.get(loop)
        if event is None:
            event = self._events[loop] = asyncio.Event()
        if self.expired:
            event.set()
        await event.wait()

    def begin(self) -> None:
        """The server stopped accepting connections: start the grace period (once)."""
        if self.draining:
            return
        self.draining = True
        logger.info("shutting down: requests in progress have %gs to finish", self.grace)
        asyncio.get_running_loop().call_later(self.grace, self._expire)

    def _expire(self) -> None:
        if not self.expired:
            logger.warning(
                "the shutdown grace of %gs is over: requests still in progress get 503", self.grace
            )
        self.expired = True
        for event in list(self._events.values()):
            event.set()

    async def guard(self, events: AsyncIterator[bytes], closing: bytes) -> AsyncIterator[bytes]:
        """``events`` until the grace is over, then ``closing`` (an SSE ``error`` event) in place of the rest."""
        waiter = asyncio.ensure_future(self.wait())
        step: asyncio.Future[bytes] | None = None
        try:
            while True:
                step = asyncio.ensure_future(anext(events))
                await asyncio.wait({step, waiter}, return_when=asyncio.FIRST_COMPLETED)
                if not step.done():  # the grace is over
                    await _cancel(step)
                    yield closing
                    return
                done, step = step, None
                try:
                    event = done.result()
                except StopAsyncIteration:
                    return
                yield event
        finally:  # also when the client went away: stop the pending step before closing the stream
            waiter.cancel()
            if step is not None:
                await _cancel(step)
            aclose = getattr(events, "aclose", None)
            if aclose is not None:
                await aclose()


async def _cancel(task: asyncio.Future[bytes]) -> None:
    """Cancel ``task`` and let it unwind (a generator being stepped cannot be closed)."""
    task.cancel()
    await asyncio.wait({task})
    if not task.cancelled() and task.exception() is not None:
        logger.debug("a stream step failed while it was cancelled", exc_info=task.exception())


__all__ = ["MESSAGE", "Drain"]
