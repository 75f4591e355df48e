"""Handing memory back to the operating system after a large response.

CPython frees a parsed multi-megabyte answer at once, but glibc's allocator keeps the freed pages (in each
thread's arena, and the worker threads that parse and count tokens have arenas of their own), so a proxy that
once read a large answer stayed gigabytes large. ``malloc_trim(0)`` returns them. It runs a moment after the
large response, in a worker thread, once for any number of large responses meanwhile; without glibc it does
nothing.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import logging
import sys
import threading
from collections.abc import Callable

logger = logging.getLogger("aligner_serve")

#: Seconds between a large response and the trim: by then the request that read it has usually let it go.
DELAY_S = 1.0

_pending = threading.Lock()


def _load_trim() -> Callable[[int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc.malloc_trim  # type: ignore[no-any-return]
    except (OSError, AttributeError):  # musl and others have no malloc_trim
        return None


_TRIM = _load_trim()


def release_memory_soon() -> None:
    """Trim the allocator ``DELAY_S`` from now (once, however many large responses arrive meanwhile)."""
    if _TRIM is None or not _pending.acquire(blocking=False):
        return
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        _pending.release()
        return
    loop.call_later(DELAY_S, lambda: loop.run_in_executor(None, _trim))


def _trim() -> None:
    try:
        assert _TRIM is not None
        _TRIM(0)
    except Exception:  # pragma: no cover - best effort
        logger.debug("malloc_trim failed", exc_info=True)
    finally:
        _pending.release()


__all__ = ["release_memory_soon"]
