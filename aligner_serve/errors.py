"""Which HTTP status each failure becomes, in OpenAI's error shape.

The proxy fails closed: when the correction fails, the client gets an error, never the uncorrected answer.
"""

from __future__ import annotations

from starlette.responses import JSONResponse

from aligner_core.errors import (
    AlignerError,
    AlignerOutOfMemoryError,
    ContextOverflowError,
    CorrectionTimeoutError,
    EmptyAnswerError,
    EngineClosedError,
    EngineUnavailableError,
    GenerationOptionError,
    InvalidInputError,
    ServerRequestError,
    TemplateError,
    UnreadableContentError,
)

from .openai_schema import error_body
from .upstream import UpstreamError, UpstreamStatusError


def json_error(
    status: int,
    message: str,
    *,
    type: str,
    code: str | None = None,
    param: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    return JSONResponse(
        error_body(message, type=type, code=code, param=param), status_code=status, headers=headers
    )


def aligner_status(exc: AlignerError) -> tuple[int, str, str]:
    """``(status, type, code)`` for an Aligner failure."""
    if isinstance(
        exc, UnreadableContentError
    ):  # the upstream sent content the Aligner cannot read: fail closed
        return 502, "upstream_error", "unreadable_content"
    if isinstance(exc, ContextOverflowError):  # before ServerRequestError: the server variant is both
        return 400, "invalid_request_error", "context_length_exceeded"
    if isinstance(exc, (InvalidInputError, EmptyAnswerError, GenerationOptionError)):
        return 400, "invalid_request_error", "invalid_input"
    if isinstance(exc, CorrectionTimeoutError):
        return 504, "aligner_timeout", "correction_timeout"
    if isinstance(exc, (EngineUnavailableError, EngineClosedError, AlignerOutOfMemoryError)):
        return 503, "aligner_unavailable", "aligner_unavailable"
    if isinstance(
        exc, (ServerRequestError, TemplateError)
    ):  # the proxy's Aligner is misconfigured, not the request
        return 502, "aligner_error", "aligner_rejected_request"
    return 500, "aligner_error", "aligner_failed"


def aligner_error_response(exc: AlignerError, retry_after: int) -> JSONResponse:
    status, kind, code = aligner_status(exc)
    headers = {"Retry-After": str(retry_after)} if status == 503 else None
    return json_error(status, failure_message(exc), type=kind, code=code, headers=headers)


def failure_message(exc: AlignerError) -> str:
    """What the client reads: an unreadable upstream answer is not passed on, any other failure is the correction's."""
    if isinstance(exc, UnreadableContentError):
        return f"{exc}; the answer is not passed on uncorrected"
    return f"the correction failed: {exc}"


def upstream_error_response(exc: UpstreamError) -> JSONResponse:
    """The upstream's own error (status and body) when it sent one; 502/504 when it never answered."""
    headers = {"Retry-After": exc.retry_after} if exc.retry_after else None
    if isinstance(exc, UpstreamStatusError) and isinstance(exc.body, dict):
        return JSONResponse(exc.body, status_code=exc.status, headers=headers)
    return json_error(exc.status, str(exc), type=exc.type, code=exc.code, headers=headers)
