"""The ``aligner`` command: ``main`` and the Typer app (``main``), the engine options every command takes
(``options``), ``aligner demo`` (``demo``) and ``aligner cache`` (``cache``)."""

from .main import app, main

__all__ = ["app", "main"]
