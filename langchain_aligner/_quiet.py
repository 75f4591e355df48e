"""Keep the uncorrected upstream off every stream a user sees, while tracers still record it.

A safety corrector whose input streams to the user defeats its purpose. The upstream inside ``with_aligner`` /
``AlignedChatModel`` (and the stage's own runs inside ``AlignedChatModel``, whose tokens go out as the chat model's)
run with a child callback manager that:

- drops the *stream surfaces*, the handlers behind ``astream_events``/``astream_log`` and LangGraph's stream modes,
  so none of those streams sees any event of these runs: no tokens, and no end event carrying the uncorrected text;
- tags the runs ``nostream`` (LangGraph's own way to keep a chat model out of ``stream_mode="messages"``) and
  ``aligner:uncorrected``;
- keeps every other handler (tracers, loggers, your own) with its token events muted, so runs start and end as
  usual and traces stay whole, but a handler forwarding tokens to a UI gets none of the uncorrected ones.

Two of these have no public LangChain mechanism, so each is kept to its smallest form here:

- *Which handlers are stream surfaces.* LangChain has no public marker; it recognises them itself (to decide
  whether ``invoke`` streams) by the private ``_StreamingCallbackHandler`` protocol, which LangGraph's handlers
  implement too. :func:`is_stream_surface` is the one place that reads it.
- *Muting tokens.* Handlers can ignore whole event families (``ignore_llm``, ``ignore_chat_model``), never tokens
  alone, and ``disable_streaming`` only reaches a chat model we hold, not the models inside a wrapped chain, behind
  ``with_retry``/``bind``/``with_fallbacks``, or built with ``streaming=True``. So each other handler is replaced by
  an instance of a subclass of its own class (made once per class) whose ``on_llm_new_token``/``on_stream_event``
  do nothing, sharing the original's ``__dict__``: its runs end in the original's maps, and ``isinstance`` checks
  (the LangSmith tracer's de-duplication) still hold, which a wrapping proxy would break.

``stream_uncorrected=True`` on the wrappers turns this off (only the tag stays).
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

logger = logging.getLogger("langchain_aligner")

#: Tag on every run of the wrapped (uncorrected) model or chain.
UNCORRECTED_TAG = "aligner:uncorrected"
#: LangGraph's tag (``langgraph.constants.TAG_NOSTREAM``) for chat-model runs ``stream_mode="messages"`` skips.
NOSTREAM_TAG = "nostream"

_MUTED: dict[type, type] = {}


def is_stream_surface(handler: Any) -> bool:
    """Whether ``handler`` feeds a stream a user may see (``astream_events``, ``astream_log``, LangGraph's modes).

    The package's one import of a private LangChain name: there is no public marker, so this reads the one
    ``BaseChatModel`` itself checks, the ``_StreamingCallbackHandler`` protocol (and ``_V2StreamingCallbackHandler``
    for v2 event streams, newer than langchain-core 1.0), which LangGraph's stream handlers implement too.
    """
    from langchain_core.tracers import _streaming

    markers = tuple(
        getattr(_streaming, name)
        for name in ("_StreamingCallbackHandler", "_V2StreamingCallbackHandler")
        if hasattr(_streaming, name)
    )
    return isinstance(handler, markers)


def streams_to_users(handlers: list[Any]) -> bool:
    """Whether any of ``handlers`` feeds a user-visible stream."""
    return any(is_stream_surface(h) for h in handlers)


def _muted_class(cls: type) -> type:
    if cls not in _MUTED:
        if inspect.iscoroutinefunction(cls.on_llm_new_token):  # type: ignore[attr-defined]

            async def skip(self: Any, *args: Any, **kwargs: Any) -> None:
                return None
        else:

            def skip(self: Any, *args: Any, **kwargs: Any) -> None:  # type: ignore[misc]
                return None

        doc = f"{cls.__name__} without token events (langchain_aligner)"
        _MUTED[cls] = type(
            f"Muted{cls.__name__}",
            (cls,),
            {"on_llm_new_token": skip, "on_stream_event": skip, "__doc__": doc},
        )
    return _MUTED[cls]


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
    """Take stream surfaces out of ``manager`` and mute its other handlers (inheritable ones too), in place."""
    copies: dict[int, BaseCallbackHandler | None] = {}

    def kept(handlers: list[BaseCallbackHandler]) -> list[BaseCallbackHandler]:
        for h in handlers:
            if id(h) not in copies:
                copies[id(h)] = mute(h)
        return [m for h in handlers if (m := copies[id(h)]) is not None]

    manager.handlers = kept(manager.handlers)
    manager.inheritable_handlers = kept(manager.inheritable_handlers)


def child_config(
    config: RunnableConfig,
    manager: CallbackManager | AsyncCallbackManager,
    *,
    quiet: bool,
    tag: str | None = None,
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

    ``RunnableBinding`` (``bind_tools``, ``with_retry``, ...) merges the ambient config (inside a LangGraph node:
    the node's, with its stream handlers) into the config it is given, which would bring the handlers :func:`hide`
    took out back into the hidden runs; ``set_config_context`` makes the hidden config the ambient one.
    """
    with set_config_context(config) as ctx:
        return ctx.run(runnable.invoke, value, config, **kwargs)


async def ainvoke_in(runnable: Runnable[Any, Any], value: Any, config: RunnableConfig, **kwargs: Any) -> Any:
    """Async :func:`invoke_in`."""
    with set_config_context(config) as ctx:
        return await coro_with_context(runnable.ainvoke(value, config, **kwargs), ctx)


__all__ = [
    "NOSTREAM_TAG",
    "UNCORRECTED_TAG",
    "ainvoke_in",
    "child_config",
    "hide",
    "invoke_in",
    "is_stream_surface",
    "streams_to_users",
]
