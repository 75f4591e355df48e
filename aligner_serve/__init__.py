"""``aligner serve``: an OpenAI-compatible proxy that corrects an upstream model's answers with an Aligner.

Install with ``pip install "llm-aligner[serve]"``. ``build_app(aligner, Upstream(url))`` gives the ASGI
app; the names below are imported lazily, so ``import aligner_serve`` (and the ``aligner`` CLI) stays
cheap and works without the extra.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .app import build_app
    from .config import Policy, load_config
    from .limits import ServeLimits
    from .models import ModelMap
    from .policy import KeyRing
    from .security import ApiKeys
    from .upstream import Upstream

_LAZY = {
    "build_app": "app",
    "ServeLimits": "limits",
    "ModelMap": "models",
    "ApiKeys": "security",
    "Upstream": "upstream",
    "KeyRing": "policy",
    "Policy": "config",
    "load_config": "config",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'aligner_serve' has no attribute {name!r}")
    from importlib import import_module

    try:
        return getattr(import_module(f".{module}", __name__), name)
    except ImportError as exc:
        from aligner_core.errors import missing

        raise missing(exc.name or "starlette", "serve", "aligner_serve") from exc


__all__ = ["ApiKeys", "KeyRing", "ModelMap", "Policy", "ServeLimits", "Upstream", "build_app", "load_config"]
