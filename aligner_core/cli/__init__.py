"""The ``aligner`` command: ``main`` and the Typer app (``commands``), the engine options every command takes
(``options``), ``aligner demo`` (``demo``) and ``aligner cache`` (``cache``).

``app`` and ``main`` load on first use: the feature commands (``pairs``, ``eval``...) import ``options`` from
here, and building the app registers those same commands, so an eager import would be circular."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .commands import app, main

__all__ = ["app", "main"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from . import commands

        return getattr(commands, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
