"""The limits one proxy enforces, checked once at start-up so a proxy that could never admit a request refuses
to start instead of refusing every request.

Limits that count places in the queue (``max_n``, ``max_batch_items``) default to the queue's size when it is
smaller than their usual default: ``--max-queue 8`` alone is a valid configuration.
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_MAX_N = 16
DEFAULT_MAX_BATCH_ITEMS = 64


@dataclass(frozen=True)
class ServeLimits:
    """The limits one proxy enforces (``None`` where a limit can be off)."""

    max_body_bytes: int = 1_000_000
    """Largest request body; larger ones get 413 before they are read in full."""
    max_queue: int = 256
    """Places in the queue: a request takes one per choice it asks for (``n``), a batch one per item; past it 429
    with ``Retry-After``."""
    max_batch_items: int | None = None
    """Most items in one ``/v1/corrections`` batch (413 beyond); default 64, or ``max_queue`` when smaller."""
    max_n: int | None = None
    """Most choices (``n``) one chat request may ask for (400 beyond); default 16, or ``max_queue`` when smaller."""
    correction_timeout: float | None = 120.0
    """Seconds one correction may take before the request fails with 504."""
    include_original: bool = True
    """Put the upstream's uncorrected answer in the ``aligner`` field of non-streamed responses."""
    max_upstream_bytes: int = 8_388_608
    """Largest upstream response read (its JSON body); past it the request fails at once with 502."""
    read_timeout: float | None = 30.0
    """Seconds a client has to send a request's headers, and again its body (408 for a body; a connection that
    never completes its headers is closed). Guards against slow-loris clients holding connections."""
    shutdown_grace: float = 30.0
    """Seconds requests in progress may still finish after SIGTERM; the rest then get 503."""

    def __post_init__(self) -> None:
        for name in ("max_body_bytes", "max_queue", "max_upstream_bytes"):
            _positive_int(name, getattr(self, name))
        for name, default in (("max_batch_items", DEFAULT_MAX_BATCH_ITEMS), ("max_n", DEFAULT_MAX_N)):
            value = getattr(self, name)
            if value is None:  # follows the queue: never a default that could not be admitted
                object.__setattr__(self, name, min(default, self.max_queue))
                continue
            _positive_int(name, value)
            if value > self.max_queue:
                raise ValueError(
                    f"{name} ({value}) cannot exceed max_queue ({self.max_queue}): such a request could "
                    "never be admitted"
                )
        for name in ("correction_timeout", "read_timeout"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"{name} must be a positive number of seconds or None, got {value!r}")
        if not self.shutdown_grace >= 0:
            raise ValueError(f"shutdown_grace must be a number of seconds >= 0, got {self.shutdown_grace!r}")

    @property
    def batch_items(self) -> int:
        """``max_batch_items`` as resolved (never None after construction)."""
        assert self.max_batch_items is not None
        return self.max_batch_items

    @property
    def choices(self) -> int:
        """``max_n`` as resolved (never None after construction)."""
        assert self.max_n is not None
        return self.max_n


def _positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


__all__ = ["DEFAULT_MAX_BATCH_ITEMS", "DEFAULT_MAX_N", "ServeLimits"]
