"""What guards the proxy: API keys and admission (429 past the queue limit).

Keys are compared in constant time and never logged (``policy.KeyRing`` holds them as SHA-256 digests with each
key's policy), and a key file that yields no key refuses to start (an empty key set would serve everyone);
admission is a counter, so a full proxy answers at once instead of queueing without bound. Bodies are read by
``body`` (capped in size and time).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from pathlib import Path

from starlette.requests import Request

from .policy import KeyRing


class KeyFileError(ValueError):
    """An API key file that cannot be used: unreadable as UTF-8 text, or holding no key at all. The proxy refuses to
    start rather than serve everyone, as an empty key set would."""


class ApiKeys:
    """Plain keys a caller may present as ``Authorization: Bearer KEY`` (or ``X-API-Key``), all with the default
    policy; empty: no check. ``build_app`` takes a ``policy.KeyRing`` (keys with policies, from ``--config``) or
    this; both check through the ring, in constant time."""

    def __init__(self, keys: Iterable[str] = ()) -> None:
        self._keys = [k.encode() for k in keys if k]

    @classmethod
    def load(cls, keys: Iterable[str] = (), key_file: str | os.PathLike[str] | None = None) -> ApiKeys:
        """Keys given directly plus those in ``key_file`` (one per line; blank lines and ``#`` comments skipped; a
        UTF-8 byte-order mark ignored). A key file that is not UTF-8 text, or holds no key, raises ``KeyFileError``:
        an operator who names a key file means to require keys."""
        found = [k.strip() for k in keys if k and k.strip()]
        if key_file is not None:
            found.extend(read_key_file(key_file))
        return cls(found)

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def __repr__(self) -> str:
        return f"ApiKeys({len(self._keys)} key(s))"

    def ring(self) -> KeyRing:
        """These keys with the default policy (correct, no choosing)."""
        return KeyRing.build(k.decode() for k in self._keys)

    def allows(self, request: Request) -> bool:
        """Whether the request carries one of the keys (always, when no key is configured)."""
        return self.ring().policy_for(presented_key(request)) is not None


def read_key_file(path: str | os.PathLike[str]) -> list[str]:
    """The keys in ``path``: one per line, blank lines and ``#`` comments skipped, a leading BOM stripped."""
    try:
        text = Path(path).read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise KeyFileError(
            f"the API key file {str(path)!r} is not UTF-8 text (byte {exc.start}): save it as UTF-8, "
            "one key per line"
        ) from None
    except OSError as exc:
        raise KeyFileError(f"cannot read the API key file {str(path)!r}: {exc.strerror or exc}") from None
    keys = [line.strip() for line in text.splitlines()]
    keys = [k for k in keys if k and not k.startswith("#")]
    if not keys:
        raise KeyFileError(
            f"the API key file {str(path)!r} holds no key (only blank lines or # comments): the proxy "
            "would serve everyone; add one key per line"
        )
    return keys


def presented_key(request: Request) -> str | None:
    """The key a request presents: ``Authorization: Bearer KEY``, else ``X-API-Key``."""
    auth = request.headers.get("authorization")
    if auth:
        scheme, _, token = auth.partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
    return request.headers.get("x-api-key")


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
