"""Nest the runs ``AlignedChatModel`` makes (the wrapped model's, the correction stage's) under its own run.

A chat model's hooks get a run manager only sometimes: ``BaseChatModel`` calls ``_generate`` with one but ``_stream``
without, and neither sees the caller's ``configurable`` values, which must reach the wrapped model (a configurable
``init_chat_model()``). So each entry point of ``AlignedChatModel`` gives its run an id up front (the public
``run_id`` config key) and keeps the caller's config for the call (:func:`calling`); the hooks build their child
configs from it (:func:`inner_configs`), as ``ParentRunManager.get_child`` would.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar
from typing import Any
from uuid import uuid4

from langchain_core.callbacks import BaseCallbackManager, CallbackManager
from langchain_core.runnables import RunnableConfig
from langchain_core.runnables.config import ensure_config

from ._quiet import UNCORRECTED_TAG, child_config

_CALL: ContextVar[tuple[Any, RunnableConfig] | None] = ContextVar("langchain_aligner_call", default=None)


@contextlib.contextmanager
def calling(owner: Any, config: RunnableConfig | None) -> Iterator[RunnableConfig]:
    """``config`` with the id ``owner``'s run will get, known to ``owner``'s hooks while the call runs."""
    config = ensure_config(config)
    config["run_id"] = config.get("run_id") or uuid4()
    token = _CALL.set((owner, config))
    try:
        yield config
    finally:
        with contextlib.suppress(
            ValueError
        ):  # a generator closed from another context: nothing to restore there
            _CALL.reset(token)


def _child(run_id: Any, parent: BaseCallbackManager) -> CallbackManager:
    """A manager whose runs nest under ``run_id``, with ``parent``'s inheritable handlers, tags and metadata."""
    child = CallbackManager(handlers=[], parent_run_id=run_id)
    child.set_handlers(parent.inheritable_handlers)
    child.add_tags(parent.inheritable_tags)
    child.add_metadata(parent.inheritable_metadata)
    return child


def inner_configs(
    owner: Any, run_manager: Any, *, hide_upstream: bool
) -> tuple[RunnableConfig, RunnableConfig]:
    """Configs of the wrapped model's run and of the stage's, nested under ``owner``'s run and hidden from user
    streams: the wrapped model's tokens are uncorrected (unless not ``hide_upstream``), and the correction's go out
    as ``owner``'s own tokens."""
    call = _CALL.get()
    config: RunnableConfig = call[1] if call is not None and call[0] is owner else {}
    parent: BaseCallbackManager | None = run_manager
    run_id = getattr(run_manager, "run_id", None)
    if run_manager is None and "run_id" in config:
        parent = CallbackManager.configure(
            config.get("callbacks"),
            inheritable_tags=config.get("tags"),
            inheritable_metadata=config.get("metadata"),
        )
        run_id = config["run_id"]

    def child(quiet: bool, tag: str | None) -> RunnableConfig:
        # no run to nest under: an empty manager, never the caller's handlers unmuted
        manager = _child(run_id, parent) if parent is not None else CallbackManager(handlers=[])
        return child_config(config, manager, quiet=quiet, tag=tag)

    return child(hide_upstream, UNCORRECTED_TAG), child(True, None)


__all__ = ["calling", "inner_configs"]
