"""Asyncio plumbing shared by the engines that are async inside (server, vLLM).

An engine owns one event loop on a daemon thread for its sync entry points; a batch is run as one
task per request, results kept in request order, each failure confined to its own request.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

from .base import GenerationOutput, GenerationRequest, ResultCallback

if TYPE_CHECKING:
    from ..progress import Progress


class EventLoopThread:
    """One event loop running forever on a daemon thread; ``run`` hands it a coroutine from any thread."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self.thread.start()

    def run(self, coro: Awaitable[Any]) -> Future[Any]:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)  # type: ignore[arg-type]

    def stop(self, timeout: float = 30.0) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=timeout)
        if not self.thread.is_alive():
            self.loop.close()  # later run() calls fail at once instead of waiting forever


def result_or_cancel(future: Future[Any]) -> Any:
    """Wait for a future run on an engine's loop; if the wait ends early (Ctrl-C), cancel what still runs."""
    try:
        return future.result()
    except BaseException:
        future.cancel()
        raise


async def gather_in_order(
    requests: Sequence[GenerationRequest],
    run_one: Callable[[GenerationRequest], Awaitable[GenerationOutput]],
    *,
    fail_fast: bool,
    on_result: ResultCallback | None,
    progress: Progress | None = None,
) -> list[GenerationOutput | BaseException]:
    """Run every request at once; outputs (or the request's own exception) in request order.

    With ``fail_fast`` the first failure cancels the rest and is raised. ``on_result`` is called as
    each request finishes, in completion order, and ``progress`` counts the row and its tokens then.
    """
    results: list[GenerationOutput | BaseException | None] = [None] * len(requests)

    async def one(i: int) -> None:
        try:
            out: GenerationOutput | BaseException = await run_one(requests[i])
        except Exception as exc:
            if fail_fast:
                raise
            out = exc
        results[i] = out
        if progress is not None:
            progress.update(tokens=0 if isinstance(out, BaseException) else out.completion_tokens, rows=1)
        if on_result is not None:
            on_result(i, out)

    tasks = [asyncio.ensure_future(one(i)) for i in range(len(requests))]
    try:
        await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
    return results  # type: ignore[return-value]
