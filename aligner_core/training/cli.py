"""``aligner train``: the command is built from ``TrainConfig``'s fields, so each setting is
declared (and documented) once. ``register(app)`` adds it to a typer app."""

from __future__ import annotations

import inspect
import logging
import typing
from dataclasses import MISSING, fields
from typing import Any

import typer

from .config import TrainConfig

HELP = (
    "Train an Aligner on question/answer/correction records: the identity warm-up (Q-A-A), then the "
    "correction stage (Q-A-C). Multi-GPU, DeepSpeed, FSDP: run it under `accelerate launch -m aligner_core train ...`."
)


def _flags(name: str, kind: Any, default: Any, declared: tuple[str, ...]) -> tuple[str, ...]:
    if declared:
        return declared
    flag = "--" + name.replace("_", "-")
    if kind is bool and default is True:
        return (f"{flag}/--no-{name.replace('_', '-')}",)
    return (flag,)


def config_parameters(config_class: type = TrainConfig) -> list[inspect.Parameter]:
    """Typer parameters from a settings dataclass's fields (help, flags and argument-ness in their metadata)."""
    hints = typing.get_type_hints(config_class)
    params = []
    for f in fields(config_class):
        meta = f.metadata
        kind = meta.get("cli_type", hints[f.name])
        default = f.default if f.default is not MISSING else ...
        if meta.get("argument"):
            info = typer.Argument(default, help=meta["help"], show_default=False)
        else:
            info = typer.Option(
                default, *_flags(f.name, kind, default, meta.get("flags", ())), help=meta["help"]
            )
        params.append(
            inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=info, annotation=kind)
        )
    return params


def train(**settings: Any) -> None:
    """Run ``train_aligner`` with the parsed settings; errors print one clear line and exit 2."""
    from ..errors import AlignerError
    from .trainer import train_aligner

    logging.getLogger("aligner_core.training").setLevel(logging.INFO)
    try:
        out = train_aligner(TrainConfig(**settings))
    except AlignerError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    how = (
        f"Aligner.from_pretrained({settings['base_model']!r}, adapter={str(out)!r})"
        if (settings.get("lora") and not settings.get("merge_lora"))
        else f"Aligner.from_pretrained({str(out)!r})"
    )
    typer.echo(f"trained Aligner written to {out}; load it with {how}", err=True)


params = config_parameters()
train.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
train.__annotations__ = {p.name: p.annotation for p in params} | {"return": None}


def register(app: typer.Typer) -> None:
    """Add the ``train`` command to ``app`` (the ``aligner`` CLI calls this)."""
    app.command("train", help=HELP, no_args_is_help=True)(train)


__all__ = ["register", "train"]
