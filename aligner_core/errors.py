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


class InspectorError(AlignerError, ValueError):
    """An inspector returned something other than one score in [0, 1] per pair, or a threshold is out of range."""


class UnreadableContentError(AlignerError, ValueError):
    """An answer's content is neither text nor parts the Aligner knows (a number, an unknown part type, ...).

    Fail closed: such an answer is an error, never passed on uncorrected as if it had been handled.
    """


class UnsafeStreamError(AlignerError, RuntimeError):
    """Running as asked would let uncorrected text reach a stream a user sees; the message says what to write."""


class GenerationOptionError(AlignerError, TypeError):
    """An unknown or invalid generation option (e.g. a misspelled keyword)."""


class ModelLoadError(AlignerError, OSError):
    """The model could not be found or loaded (offline, missing files, unsafe weights)."""


class OutputExistsError(AlignerError, FileExistsError):
    """The output file exists and neither resume nor overwrite was asked for."""


class OutputPathError(AlignerError, OSError):
    """The output cannot be written there (a directory, a path under a file, a folder without write permission)."""


class MissingDependencyError(AlignerError, ImportError):
    """An optional dependency is needed for the requested feature."""


class AlignerOutOfMemoryError(AlignerError, RuntimeError):
    """Even a batch of one request ran out of accelerator memory."""


class EngineClosedError(AlignerError, RuntimeError):
    """The Aligner (or its engine) was closed; no new requests are accepted."""


class EngineUnavailableError(AlignerError, RuntimeError):
    """The engine cannot serve right now (server down or not answering in time, after retries).

    Transient: nothing is wrong with the request, so file jobs stop instead of recording the row as
    failed, and ``--resume`` picks up from there once the engine is back.
    """


class CorrectionTimeoutError(AlignerError, TimeoutError):
    """A correction did not finish within the caller's ``timeout``; the request was cancelled."""


class ServerError(AlignerError, RuntimeError):
    """An OpenAI-compatible server failed a request; ``url`` and ``status`` say where and how."""

    def __init__(self, message: str, *, url: str = "", status: int | None = None) -> None:
        super().__init__(message)
        self.url = url
        self.status = status


class ServerUnavailableError(ServerError, EngineUnavailableError, ConnectionError):
    """The server refused or dropped the connection, or kept answering 429/5xx, after every retry."""


class ServerTimeoutError(ServerError, EngineUnavailableError, TimeoutError):
    """The server did not answer within ``timeout`` seconds, after every retry."""


class ServerRequestError(ServerError, ValueError):
    """The server rejected the request (4xx: unknown model, bad option, bad key); not retried."""


class ServerContextOverflowError(ServerRequestError, ContextOverflowError):
    """The server said the prompt plus ``max_new_tokens`` exceeds the model's context."""


def missing(package: str, extra: str | None = None, feature: str = "this feature") -> MissingDependencyError:
    """Build the install hint for an optional dependency."""
    hint = f'pip install "llm-aligner[{extra}]"' if extra else f"pip install {package}"
    return MissingDependencyError(f"{feature} needs the '{package}' package: install it with {hint}")
