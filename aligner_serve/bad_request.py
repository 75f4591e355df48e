"""The one error every reader of a client's request raises (a leaf module, so the readers can share it)."""

from __future__ import annotations


class RequestShapeError(ValueError):
    """The request body is JSON but not a request this endpoint can serve (HTTP 400); ``param`` names the field."""

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


__all__ = ["RequestShapeError"]
