"""``aligner serve``'s settings: the command line's options over the ``--config`` file's.

The file gives the defaults; an option given explicitly (on the command line, or by its environment variable) wins
over it, as in most servers' configuration. Where the Aligner runs is one choice: ``--aligner`` or
``--aligner-server`` on the command line sets it aside in the file as a whole (``[aligner] model``/``server``), so a
local model on the command line never meets a server from the file. Every value the file gives goes through the
option's own type and range checks, and a value they refuse is a ``ConfigError`` naming the file's entry.
"""

from __future__ import annotations

import os
from typing import Any

import typer

from .config import FILE_OPTIONS, ConfigError, ServeConfig, entry_name, load_config

#: Options that say where the Aligner runs; one given on the command line sets the file's choice aside.
_ALIGNER_PLACE = frozenset({"aligner", "aligner_server"})
#: Where an explicit value came from (``ParameterSource`` names: typer carries its own copy of click's enum).
_EXPLICIT = frozenset({"COMMANDLINE", "ENVIRONMENT"})


def resolve(
    ctx: typer.Context, path: str | os.PathLike[str] | None
) -> tuple[dict[str, Any], ServeConfig | None]:
    """The options to serve with, and the config file read (None without ``--config``)."""
    params = dict(ctx.params)
    if path is None:
        return params, None
    config = load_config(path, inspector_elsewhere=params.get("inspector") is not None)
    return merge(ctx, params, config, str(path)), config


def merge(ctx: typer.Context, params: dict[str, Any], config: ServeConfig, where: str) -> dict[str, Any]:
    """``params`` with the file's value for every option not given explicitly."""
    explicit = {name for name in params if getattr(ctx.get_parameter_source(name), "name", None) in _EXPLICIT}
    if explicit & _ALIGNER_PLACE:
        explicit |= {*_ALIGNER_PLACE, "aligner_model"}
    options = {p.name: p for p in ctx.command.params}
    merged = dict(params)
    for name in FILE_OPTIONS:
        value = config.option(name)
        if name in explicit or value is None or name not in options:
            continue
        try:
            merged[name] = options[name].process_value(ctx, value)  # the option's own type and range checks
        except typer.BadParameter as exc:
            raise ConfigError(f"{where}: {entry_name(name)} = {value!r}: {exc.message}") from None
    return merged


__all__ = ["merge", "resolve"]
