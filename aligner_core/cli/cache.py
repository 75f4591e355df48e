"""``aligner cache list|clear``: see and free the dequantized models this library keeps on disk."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

cache_app = typer.Typer(
    name="cache",
    help="Show or free the dequantized GGUF models cached under LLM_ALIGNER_CACHE (default ~/.cache/llm-aligner).",
    no_args_is_help=True,
    rich_markup_mode=None,
)


def _size(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"  # pragma: no cover - the loop always returns


def _age(created: float) -> str:
    seconds = max(0.0, time.time() - created)
    for unit, span in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if seconds >= span:
            count = int(seconds // span)
            return f"{count} {unit}{'s' if count > 1 else ''} ago"
    return "just now"


_NOTES = {
    "legacy": "  [unused: path-keyed copy from an older version]",
    "partial": "  [left by an interrupted conversion]",
    "current": "",
}


@cache_app.command("list", short_help="List the cached models and their total size.")
def list_command() -> None:
    """List each cached model (name, size, age, the GGUF files it came from) and the total."""
    from ..loading.cache import gguf_cache_dir, list_entries

    entries = list_entries()
    root = gguf_cache_dir()
    if not entries:
        typer.echo(f"the model cache is empty ({root})")
        return
    typer.echo(f"cached models in {root}:")
    for entry in entries:
        typer.echo(
            f"{entry.name}  {_size(entry.size)}  {_age(entry.created)}  {entry.path.name}{_NOTES[entry.state]}"
        )
        for source in entry.sources:
            gone = "" if Path(source).exists() else "  (gone)"
            typer.echo(f"    from {source}{gone}")
    total = sum(e.size for e in entries)
    typer.echo(
        f"total: {_size(total)} in {len(entries)} entr{'y' if len(entries) == 1 else 'ies'}"
        " (free it with: aligner cache clear)"
    )


@cache_app.command("clear", short_help="Delete the cached models.")
def clear_command(
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
) -> None:
    """Delete every cached model; the next load of a GGUF converts it again."""
    from ..loading.cache import clear, gguf_cache_dir, list_entries

    entries = list_entries()
    root = gguf_cache_dir()
    if not entries:
        typer.echo(f"the model cache is empty ({root})")
        return
    total = sum(e.size for e in entries)
    if not yes:
        typer.confirm(f"delete {len(entries)} cached model(s), {_size(total)}, from {root}?", abort=True)
    count, freed = clear()
    typer.echo(f"deleted {count} cached model(s), freed {_size(freed)}")


def register(app: typer.Typer) -> None:
    """Add the ``cache`` command group to the ``aligner`` app."""
    app.add_typer(cache_app, name="cache")


__all__ = ["cache_app", "register"]
