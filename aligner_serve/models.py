"""Model names: which upstream model a client's ``model`` is sent as, and what ``/v1/models`` lists.

A proxy should not answer for a model nobody asked for, so a name the operator did not map goes upstream as it
came and the upstream answers it (vLLM's 404 for a model it does not serve). Names are mapped only explicitly:
``--upstream-model X`` serves X (under ``--served-model-name`` too, when given), ``--model-map NAME=X`` adds an
alias, and ``--model-map '*=X'`` sends every other name as X. ``/v1/models`` lists the upstream's own entries with
every field it gave (``max_model_len``, ``root``, ...), an alias as a copy of its target's entry.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

WILDCARD = "*"


@dataclass(frozen=True)
class ModelMap:
    """Client model names -> the upstream names they are sent as (``"*"``: every name not mapped otherwise)."""

    aliases: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def build(
        cls,
        *,
        upstream_model: str | None = None,
        served_model: str | None = None,
        mappings: Iterable[str] = (),
    ) -> ModelMap:
        """From the CLI's options: ``--upstream-model``, ``--served-model-name`` and ``--model-map NAME=UPSTREAM``
        (repeatable). Raises ``ValueError`` naming the option at fault."""
        aliases: dict[str, str] = {}
        if served_model and not upstream_model:
            raise ValueError(
                "--served-model-name needs --upstream-model (the upstream model it stands for), or map "
                "names with --model-map NAME=UPSTREAM"
            )
        if upstream_model:
            aliases[upstream_model] = upstream_model
            if served_model:
                aliases[served_model] = upstream_model
        for item in mappings:
            name, sep, target = (part.strip() for part in item.partition("="))
            if not sep or not name or not target:
                raise ValueError(
                    f"--model-map takes NAME=UPSTREAM (or '*=UPSTREAM' for every other name), got {item!r}"
                )
            if aliases.get(name, target) != target:
                raise ValueError(f"--model-map maps {name!r} twice ({aliases[name]!r} and {target!r})")
            aliases[name] = target
        return cls(aliases)

    def upstream_name(self, requested: Any) -> Any:
        """The name sent upstream for a request's ``model`` (as it came when nothing maps it)."""
        if isinstance(requested, str) and requested in self.aliases:
            return self.aliases[requested]
        return self.aliases.get(WILDCARD, requested)

    def reported_name(self, requested: Any, upstream_reported: Any) -> Any:
        """The ``model`` a response reports: the client's name where the operator mapped it (as a server reports its
        served name), else what the upstream said."""
        if isinstance(requested, str) and self.upstream_name(requested) != requested:
            return requested
        return upstream_reported

    def listing(self, upstream: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """``/v1/models``' entries: each alias as a copy of its target's upstream entry (every field kept), then the
        upstream's own entries (reachable through the proxy under their own names)."""
        by_id = {m.get("id"): m for m in upstream}
        entries: list[dict[str, Any]] = []
        for name, target in self.aliases.items():
            if name in (WILDCARD, target):
                continue
            base = by_id.get(target) or {"object": "model", "created": 0, "owned_by": "aligner-serve"}
            entries.append({**base, "id": name})
        listed = {e["id"] for e in entries}
        entries.extend(m for m in upstream if m.get("id") not in listed)
        return entries


__all__ = ["WILDCARD", "ModelMap"]
