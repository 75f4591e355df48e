"""Keep the uncorrected upstream off every stream a user sees, while tracers still record it.

A safety corrector whose input streams to the user defeats its purpose. The upstream inside ``with_aligner`` /
``AlignedChatModel`` (and the Aligner's own nested runs inside ``AlignedChatModel``) run with a child callback
manager that:

- drops the *stream surfaces*: the handlers behind ``astream_events``/``stream_events``/``astream_log`` and
  LangGraph's stream modes (LangChain marks them with ``_StreamingCallbackHandler``), so none of those streams
  sees any event of these runs: no tokens, and no end event carrying the uncorrected message;
- tags the runs ``nostream`` (``langgraph.constants.TAG_NOSTREAM``, LangGraph's own way to keep a chat model out
  of ``stream_mode="messages"``) and ``aligner:uncorrected``;
- keeps every other handler (tracers, loggers, your own) with token events muted: the same handler state, so
  their runs start and end as usual and traces stay whole.

``stream_uncorrected=True`` on the wrappers turns all of this off (only the tag stays).
"""

from __future__ import annotations

import inspect
import logging
from typing import Any

from langchain_core.callbacks import (
    AsyncCallbackManager,
    BaseCallbackHandler,
    BaseCallbackManager,
    CallbackManager,
)
from langchain_core.runnables import Runnable, RunnableConfig
from langchain_core.runnables.config import patch_config, set_config_context
from langchain_core.runnables.utils import coro_with_context

try:  # the markers LangChain and LangGraph put on the handlers that feed user-visible streams
    from langchain_core.tracers._streaming import _StreamingCallbackHandler, _V2StreamingCallbackHandler
except ImportError:  # pragma: no cover - older langchain-core
    from langchain_core.tracers._streaming import _StreamingCallbackHandler

    _V2StreamingCallbackHandler = _StreamingCallbackHandler  # type: ignore[misc,assignment]

logger = logging.getLogger("langchain_aligner")

#: Tag on every run of the wrapped (uncorrected) model or chain.
UNCORRECTED_TAG = "aligner:uncorrected"
#: LangGraph's tag for chat-model runs that ``stream_mode="messages"`` must not stream.
NOSTREAM_TAG = "nostream"

_MUTED: dict[type, type] = {}


def is_stream_surface(handler: Any) -> bool:
    """Whether ``handler`` feeds a stream a user may see (``astream_events``, ``astream_log``, LangGraph modes)."""
    return isinstance(handler, (_StreamingCallbackHandler, _V2StreamingCallbackHandler))


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

    body: dict[str, Any] = {
        "on_llm_new_token": on_llm_new_token,
        "on_stream_event": on_stream_event,
        "__doc__": f"{cls.__name__} without token and chunk events (langchain_aligner)",
    }
    muted = type(f"Muted{cls.__name__}", (cls,), body)
    _MUTED[cls] = muted
    return muted


def mute(handler: BaseCallbackHandler) -> BaseCallbackHandler | None:
    """The same handler (shared state) without token events; None for a stream surface or a handler that cannot
    be muted (no ``__dict__``): neither may see the uncorrected run."""
    if is_stream_surface(handler):
        return None
    if type(handler) in _MUTED.values():
        return handler
    try:
        state = handler.__dict__
    except AttributeError:
        logger.warning("dropping callback handler %s from the uncorrected run: it cannot be muted", handler)
        return None
    muted = object.__new__(_muted_class(type(handler)))
    muted.__dict__ = state  # runs started through the copy end in the original's maps
    return muted


def hide(manager: BaseCallbackManager) -> None:
    """Take stream surfaces out of the manager and mute the other handlers (inheritable ones too), in place."""
    copies: dict[int, BaseCallbackHandler | None] = {}

    def kept(handlers: list[BaseCallbackHandler]) -> list[BaseCallbackHandler]:
        out = []
        for h in handlers:
            if id(h) not in copies:
                copies[id(h)] = mute(h)
            if copies[id(h)] is not None:
                out.append(copies[id(h)])
        return out  # type: ignore[return-value]

    manager.handlers = kept(manager.handlers)
    manager.inheritable_handlers = kept(manager.inheritable_handlers)


def child_config(
    config: RunnableConfig, manager: CallbackManager | AsyncCallbackManager, *, quiet: bool, tag: str | None = None
) -> RunnableConfig:
    """``config`` with ``manager`` (a run's child manager) as callbacks; when ``quiet`` the runs under it are hidden
    from every stream a user sees (:func:`hide`, tag ``nostream``); ``tag`` is added either way."""
    if quiet:
        hide(manager)
        manager.add_tags([NOSTREAM_TAG])
    if tag:
        manager.add_tags([tag])
    return patch_config(config, callbacks=manager)


def invoke_in(runnable: Runnable[Any, Any], value: Any, config: RunnableConfig, **kwargs: Any) -> Any:
    """``runnable.invoke(value, config)`` with ``config`` as the ambient config too.

    LangChain merges the ambient config (inside a LangGraph node: the node's, with its stream handlers) into
    the config of every ``RunnableBinding`` it runs (``bind_tools``, ``with_retry``, ...), which would bring the
    handlers :func:`hide` took out back into the hidden runs.
    """
    with set_config_context(config) as ctx:
        return ctx.run(runnable.invoke, value, config, **kwargs)


async def ainvoke_in(runnable: Runnable[Any, Any], value: Any, config: RunnableConfig, **kwargs: Any) -> Any:
    """Async :func:`invoke_in`."""
    with set_config_context(config) as ctx:
        return await coro_with_context(runnable.ainvoke(value, config, **kwargs), ctx)


def streams_to_users(handlers: list[Any]) -> bool:
    """Whether any of ``handlers`` feeds a user-visible stream."""
    return any(is_stream_surface(h) for h in handlers)


__all__ = [
    "NOSTREAM_TAG", "UNCORRECTED_TAG", "ainvoke_in", "child_config", "hide", "invoke_in", "is_stream_surface",
    "streams_to_users",
]

