"""Train your own Aligner: the residual-correction recipe with the identity warm-up (docs/training.md).

``train_aligner(TrainConfig(data=..., base_model=..., output_dir=...)) -> Path``; the same from the
shell as ``aligner train DATA --base-model M --output DIR``. Importing this package is cheap:
torch, transformers, peft and datasets load only when training starts.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .config import TrainConfig, TrainConfigError
from .data import Fields, Record, TrainingDataError, load_records
from .encode import IGNORE_INDEX, Example, ExampleEncoder
from .trainer import train_aligner

if TYPE_CHECKING:
    import typer


def register(app: typer.Typer) -> None:
    """Add the ``train`` command to a typer app (``aligner_core.cli`` calls this)."""
    from .cli import register as _register

    _register(app)


__all__ = [
    "IGNORE_INDEX",
    "Example",
    "ExampleEncoder",
    "Fields",
    "Record",
    "TrainConfig",
    "TrainConfigError",
    "TrainingDataError",
    "load_records",
    "register",
    "train_aligner",
]
