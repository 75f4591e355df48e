"""Exception types: one per thing that can go wrong, each with a message that says what to do."""

from __future__ import annotations


class AlignerError(Exception):
    """Base class of every error raised by llm-aligner."""


class InvalidInputError(AlignerError, TypeError):
    """A question or answer is not a string (or a pair is malformed)."""


class EmptyAnswerError(AlignerError, ValueError):
    """The answer to correct is empty or whitespace only: there is nothing to correct."""


class ContextOverflowError(AlignerError, ValueError):
    """The prompt plus the room for the correction does not fit the model's context window."""


class TemplateError(AlignerError, ValueError):
    """An unknown template name, or a template that cannot be rendered for this model."""


class GenerationOptionError(AlignerError, TypeError):
    """An unknown or invalid generation option (e.g. a misspelled keyword)."""


class ModelLoadError(AlignerError, OSError):
    """The model could not be found or loaded (offline, missing files, unsafe weights)."""


class OutputExistsError(AlignerError, FileExistsError):
    """The output file exists and neither resume nor overwrite was asked for."""


class MissingDependencyError(AlignerError, ImportError):
    """An optional dependency is needed for the requested feature."""


class AlignerOutOfMemoryError(AlignerError, RuntimeError):
    """Even a batch of one request ran out of accelerator memory."""


def missing(package: str, extra: str | None = None, feature: str = "this feature") -> MissingDependencyError:
    """Build the install hint for an optional dependency."""
    hint = f'pip install "llm-aligner[{extra}]"' if extra else f"pip install {package}"
    return MissingDependencyError(f"{feature} needs the '{package}' package: install it with {hint}")
