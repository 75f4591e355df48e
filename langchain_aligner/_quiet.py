"""Run the uncorrected upstream without letting its token stream reach the caller.

A safety corrector whose input streams to the user defeats its purpose: ``astream_events`` and
``stream_events`` turn every ``on_llm_new_token`` / ``on_stream_event`` of a nested chat model into
events that chat UIs forward. The upstream inside ``with_aligner`` / ``AlignedChatModel`` therefore
runs with *muted* copies of the caller's handlers: the same handler state (its runs start and end
as usual, so tracing and ``on_chat_model_start``/``end`` stay), minus token and chunk events. Its
runs carry the tag ``aligner:uncorrected`` so a UI can also filter them explicitly.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import AsyncIterator, Iterator
from typing import Any

from langchain_core.callbacks import (
    AsyncCallbackManager,
    BaseCallbackHandler,
    BaseCallbackManager,
    CallbackManager,
)
from langchain_core.runnables import RunnableConfig
from langchain_core.runnables.config import patch_config

logger = logging.getLogger("langchain_aligner")

#: Tag on every run of the wrapped (uncorrected) model or chain.
UNCORRECTED_TAG = "aligner:uncorrected"

_MUTED: dict[type, type] = {}


def _muted_class(cls: type) -> type:
    if cls in _MUTED:
        return _MUTED[cls]
    if inspect.iscoroutinefunction(getattr(cls, "on_llm_new_token", None)):

        async def on_llm_new_token(self: Any, *args: Any, **kwargs: Any) -> None:
            return None

        async def on_stream_event(self: Any, *args: Any, **kwargs: Any) -> None:
            return None
    else:

        def on_llm_new_token(self: Any, *args: Any, **kwargs: Any) -> None:  # type: ignore[misc]
            return None

        def on_stream_event(self: Any, *args: Any, **kwargs: Any) -> None:  # type: ignore[misc]
            return None

    def tap_output_iter(self: Any, run_id: Any, output: Iterator[Any]) -> Iterator[Any]:
        return output

    def tap_output_aiter(self: Any, run_id: Any, output: AsyncIterator[Any]) -> AsyncIterator[Any]:
        return output

    body: dict[str, Any] = {
        "on_llm_new_token": on_llm_new_token,
        "on_stream_event": on_stream_event,
        "__doc__": f"{cls.__name__} without token and chunk events (langchain_aligner)",
    }
    if hasattr(cls, "tap_output_iter"):
        body.update(tap_output_iter=tap_output_iter, tap_output_aiter=tap_output_aiter)
    muted = type(f"Muted{cls.__name__}", (cls,), body)
    _MUTED[cls] = muted
    return muted


def mute(handler: BaseCallbackHandler) -> BaseCallbackHandler:
    """The same handler (shared state) without token events; handlers without a ``__dict__`` are dropped."""
    if type(handler).__name__.startswith("Muted") and type(handler) in _MUTED.values():
        return handler
    try:
        state = handler.__dict__
    except AttributeError:
        logger.warning("dropping callback handler %s from the uncorrected run: it cannot be muted", handler)
        return None  # type: ignore[return-value]
    muted = object.__new__(_muted_class(type(handler)))
    muted.__dict__ = state  # runs started through the copy end in the original's maps
    return muted


def mute_manager(manager: BaseCallbackManager) -> None:
    """Replace the manager's handlers (inheritable ones too) by their muted copies, in place."""
    copies: dict[int, BaseCallbackHandler | None] = {}

    def muted(handlers: list[BaseCallbackHandler]) -> list[BaseCallbackHandler]:
        out = []
        for h in handlers:
            if id(h) not in copies:
                copies[id(h)] = mute(h)
            if copies[id(h)] is not None:
                out.append(copies[id(h)])
        return out  # type: ignore[return-value]

    manager.handlers = muted(manager.handlers)
    manager.inheritable_handlers = muted(manager.inheritable_handlers)


def child_config(
    config: RunnableConfig, manager: CallbackManager | AsyncCallbackManager, *, quiet: bool, tag: str | None = None
) -> RunnableConfig:
    """``config`` with ``manager`` (a run's child manager) as callbacks, muted when ``quiet``, tagged with ``tag``."""
    if quiet:
        mute_manager(manager)
    if tag:
        manager.add_tags([tag])
    return patch_config(config, callbacks=manager)
