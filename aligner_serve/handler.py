"""Wrapping an endpoint: read its JSON body (capped in size and time), hand it the caller (its key's policy and
the mode header), map every failure to its OpenAI-shaped status (a mode the key may not use: 403), cancel the work
of a client that hung up (499) or of a request the shutdown grace ran out on (503), time it and count it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from starlette.requests import Request
from starlette.responses import Response

from aligner_core.errors import AlignerError

from . import tracing
from .drain import MESSAGE as SHUTTING_DOWN
from .drain import Drain
from .errors import aligner_error_response, json_error, upstream_error_response
from .policy import MODE_HEADER, Caller, PolicyError
from .proxy import CorrectionProxy, Rejected
from .upstream import UpstreamError

logger = logging.getLogger("aligner_serve")

Endpoint = Callable[..., Awaitable[Response]]

#: Where the key check leaves the caller's policy in the ASGI scope.
POLICY_SCOPE_KEY = "aligner_serve.policy"


def endpoint(
    proxy: CorrectionProxy, path: str, fn: Endpoint, *, reads_body: bool
) -> Callable[[Request], Awaitable[Response]]:
    """The Starlette handler of ``fn``: ``fn(body, caller)`` for a POST endpoint, ``fn(request)`` otherwise.

    Once the body is read, a client that hangs up cancels its request: its places in the queue (and a correction
    not yet started) are freed instead of being computed for nobody.
    """

    async def handle(request: Request) -> Response:
        start = time.perf_counter()
        tracing.route(request.method, path)
        try:
            if reads_body and proxy.drain.draining:  # no new work once SIGTERM came (health still answers)
                response = shutting_down()
            elif reads_body:
                body = await proxy.body(request)
                caller = caller_of(request)
                tracing.annotate({"aligner.key": caller.policy.name})  # the operator's label, never the key
                response = await _race(request, proxy.drain, fn(body, caller))
            else:
                response = await fn(request)
        except PolicyError as exc:
            code = "mode_not_allowed" if exc.status == 403 else "invalid_mode"
            kind = "permission_error" if exc.status == 403 else "invalid_request_error"
            response = json_error(exc.status, str(exc), type=kind, code=code)
        except Rejected as rejected:
            response = rejected.response
        except UpstreamError as exc:
            logger.warning("upstream failure on %s: %s", path, type(exc).__name__)
            response = upstream_error_response(exc)
        except AlignerError as exc:
            response = aligner_error_response(exc, proxy.admission.retry_after)
        except asyncio.TimeoutError:  # a whole batch past the correction timeout
            response = json_error(
                504,
                "the corrections took longer than the proxy's correction timeout",
                type="aligner_timeout",
                code="correction_timeout",
            )
        except Exception:
            logger.exception("unexpected failure on %s", path)
            response = json_error(500, "internal error in the correction proxy", type="server_error")
        if response.status_code == 499:
            logger.info("the client closed the connection before its request on %s was answered", path)
        proxy.metrics.requests.labels(endpoint=path, status=str(response.status_code)).inc()
        proxy.metrics.latency.labels(endpoint=path).observe(time.perf_counter() - start)
        return response

    return handle


def caller_of(request: Request) -> Caller:
    """The caller as the key check found it (the default policy where no check ran: an app without keys)."""
    policy = request.scope.get(POLICY_SCOPE_KEY)
    header = request.headers.get(MODE_HEADER)
    return Caller(policy, header) if policy is not None else Caller(mode_header=header)


def shutting_down() -> Response:
    return json_error(
        503,
        SHUTTING_DOWN,
        type="service_unavailable",
        code="shutting_down",
        headers={"Retry-After": "1", "Connection": "close"},
    )


async def _race(request: Request, drain: Drain, work: Awaitable[Response]) -> Response:
    """Run ``work``; cancel it if the client disconnects first (499, the body is read so ``receive`` only reports
    the disconnect) or if the shutdown grace runs out (503)."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(request.receive())
    expiry = asyncio.ensure_future(drain.wait())
    try:
        await asyncio.wait({task, watcher, expiry}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            return task.result()
        if drain.expired or watcher.result().get("type") == "http.disconnect":
            task.cancel()
            await asyncio.wait({task})
            if drain.expired:
                return shutting_down()
            return json_error(499, "client closed the request", type="client_closed", code="client_closed")
        return await task  # pragma: no cover - receive() reports only disconnects once the body is read
    finally:
        for t in (task, watcher, expiry):
            t.cancel()


__all__ = ["POLICY_SCOPE_KEY", "caller_of", "endpoint", "shutting_down"]
