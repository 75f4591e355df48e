"""``aligner train-inspector``: the command is built from ``InspectorConfig``'s fields (as ``aligner train`` is
from ``TrainConfig``'s), so each setting is declared and documented once."""

from __future__ import annotations

import inspect
import logging
from typing import Any

import typer

from .cli import config_parameters
from .inspector import InspectorConfig

HELP = (
    "Train an inspector: a sequence classifier scoring whether an answer is already aligned (1) or not (0), "
    "on {question, answer, label} records or on correction records (answer -> 0, correction -> 1). "
    "Load it with Inspector.from_pretrained(OUTPUT) and pass it as inspector=."
)


def train_inspector_command(**settings: Any) -> None:
    """Check the input and output, then run ``train_inspector``; errors print one clear line and exit 2."""
    from pathlib import Path

    from ..errors import AlignerError
    from ..jobs.records import check_input
    from .inspector import check_inspector_output, train_inspector

    logging.getLogger("aligner_core.training").setLevel(logging.INFO)
    try:
        config = InspectorConfig(**settings)
        check_input(config.data)  # type: ignore[arg-type]
        if config.eval_data is not None:
            check_input(config.eval_data)
        check_inspector_output(Path(config.output_dir).expanduser(), config.overwrite)
        out = train_inspector(config)
    except AlignerError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    typer.echo(
        f"trained inspector written to {out}; load it with Inspector.from_pretrained({str(out)!r})", err=True
    )


params = config_parameters(InspectorConfig)
train_inspector_command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
train_inspector_command.__annotations__ = {p.name: p.annotation for p in params} | {"return": None}


def register(app: typer.Typer) -> None:
    """Add the ``train-inspector`` command to ``app`` (the ``aligner`` CLI calls this)."""
    app.command("train-inspector", help=HELP, no_args_is_help=True)(train_inspector_command)


__all__ = ["register", "train_inspector_command"]
