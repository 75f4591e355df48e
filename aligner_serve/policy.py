"""Who may do what: each API key's policy, and the mode one request runs in.

A key's policy (from ``--config``, see ``config.py``; keys given with ``--api-key`` get the default policy) sets the
mode: ``correct`` (the Aligner corrects the answer), ``inspect`` (the inspector scores it and the verdict is
reported, the answer is never rewritten) or ``off`` (the upstream's answer as it is). A request may ask for another
mode with the ``x-aligner-mode`` header or its body's ``"aligner": {"mode": ...}`` field, only where its key's
policy allows it (``allow_override``); otherwise it gets 403 (a client cannot switch the corrector off behind the
operator's back). Keys are kept as SHA-256 digests and compared in constant time.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from .config import MODES, KeyEntry, Mode, Policy, digest

#: The request header that picks a mode (where the key's policy allows it).
MODE_HEADER = "x-aligner-mode"
#: Correct, no choosing: the policy of a proxy started without a config file.
DEFAULT_POLICY = Policy()


class PolicyError(Exception):
    """A request asks for what its key may not do (403), or names no valid mode (400)."""

    def __init__(self, message: str, *, status: int) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class KeyRing:
    """The accepted keys and their policies; with no key, every request has the default policy."""

    entries: tuple[KeyEntry, ...] = ()
    default: Policy = DEFAULT_POLICY

    @classmethod
    def build(
        cls, keys: Iterable[str] = (), entries: Iterable[KeyEntry] = (), default: Policy = DEFAULT_POLICY
    ) -> KeyRing:
        """Keys from the command line (the default policy) and the config file's entries."""
        plain = [
            KeyEntry(digest(k.strip()), Policy(default.mode, default.allow_override, f"key {i + 1}"))
            for i, k in enumerate(keys)
            if k and k.strip()
        ]
        return cls((*plain, *entries), default)

    @property
    def enabled(self) -> bool:
        return bool(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def policy_for(self, presented: str | None) -> Policy | None:
        """The policy of the presented key; None when keys are required and it is not one of them."""
        if not self.entries:
            return self.default
        if not presented:
            return None
        candidate = digest(presented)
        found: Policy | None = None
        for (
            entry
        ) in self.entries:  # every entry is compared: the timing says nothing about which nearly matched
            if hmac.compare_digest(candidate, entry.digest):
                found = entry.policy
        return found


def requested_mode(headers: Mapping[str, str], body_option: Any) -> Mode | None:
    """The mode a request asks for (header or body), or None; asking for two different ones is a 400."""
    header = headers.get(MODE_HEADER)
    asked = {m.strip().lower() for m in (header, body_option) if isinstance(m, str) and m.strip()}
    if body_option is not None and not isinstance(body_option, str):
        raise PolicyError(
            f"'aligner.mode' must be one of {', '.join(MODES)}, got {body_option!r}", status=400
        )
    if len(asked) > 1:
        raise PolicyError(
            f"the {MODE_HEADER} header and the body's aligner.mode ask for different modes", status=400
        )
    mode = next(iter(asked), None)
    if mode is not None and mode not in MODES:
        raise PolicyError(f"unknown correction mode {mode!r}: use one of {', '.join(MODES)}", status=400)
    return mode  # type: ignore[return-value]


@dataclass(frozen=True)
class Caller:
    """Who sent a request (its key's policy) and the mode its ``x-aligner-mode`` header asked for, as the key check
    found them; the endpoint adds the body's ``aligner.mode`` and gets the mode the request runs in."""

    policy: Policy = DEFAULT_POLICY
    mode_header: str | None = None

    def mode(self, body_option: Any = None, *, inspector: bool) -> Mode:
        """The request's mode (``PolicyError`` 403/400 as ``mode_for`` and ``requested_mode`` say); ``inspect``
        needs an inspector to score with (400 where this proxy has none)."""
        headers = {} if self.mode_header is None else {MODE_HEADER: self.mode_header}
        mode = mode_for(self.policy, requested_mode(headers, body_option))
        if mode == "inspect" and not inspector:
            raise PolicyError(
                "mode 'inspect' needs an inspector and this proxy has none (--inspector or [aligner] "
                "inspector)",
                status=400,
            )
        return mode


def mode_for(policy: Policy, asked: Mode | None) -> Mode:
    """The mode the request runs in: its key's, or the one it asked for where the key allows choosing."""
    if asked is None or asked == policy.mode:
        return policy.mode
    if not policy.allow_override:
        raise PolicyError(
            f"this API key runs in mode {policy.mode!r} and may not choose another "
            f"(asked for {asked!r}); the operator can allow it with allow_override",
            status=403,
        )
    return asked


__all__ = ["DEFAULT_POLICY", "MODE_HEADER", "Caller", "KeyRing", "PolicyError", "mode_for", "requested_mode"]
