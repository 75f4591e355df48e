"""``aligner serve --config serve.toml``: one file for the upstream, the Aligner, the limits and the API keys with
their policies.

```toml
[upstream]
url = "http://127.0.0.1:8001/v1"
model = "gpt-4o-mini"            # optional
api_key_env = "UPSTREAM_KEY"     # the key itself stays out of the file (api_key = "..." also works)
timeout = 120
model_map = { "gpt-4o" = "gpt-4o-mini" }

[aligner]
model = "HuggingFaceTB/SmolLM2-135M-Instruct"   # or server = "http://127.0.0.1:8000/v1" (and model = served name)
max_new_tokens = 512
inspector = "path/to/inspector"
threshold = 0.5
correct_structured = false

[limits]
max_queue = 256
max_body_bytes = 1000000
read_timeout = 30

[server]
host = "127.0.0.1"
port = 8080
shutdown_grace = 30

[defaults]                       # for requests without a key (no [[keys]]) and for keys that set nothing
mode = "correct"                 # correct | inspect | off
allow_override = false           # may a request pick another mode (header x-aligner-mode, body "aligner")

[[keys]]
name = "chat-app"
key_env = "CHAT_APP_KEY"         # or key = "...", or key_sha256 = "<hex digest of the key>"
mode = "correct"
allow_override = true

[[keys]]
name = "analytics"
key_sha256 = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
mode = "inspect"                 # score with the inspector and report, never rewrite
```

Every value is checked when the proxy starts: an unknown key, a wrong type, a key that cannot be read (an unset
environment variable) or an ``inspect`` policy without an inspector stops it with a message naming the entry.
Command-line options given explicitly win over the file (``settings``); ``FILE_OPTIONS`` lists the options a file
can set, ``entry_name`` where.
"""

from __future__ import annotations

import hashlib
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

Mode = Literal["correct", "inspect", "off"]
MODES: tuple[str, ...] = ("correct", "inspect", "off")


class ConfigError(ValueError):
    """The config file cannot be used; the message names the file, the table and the entry."""


@dataclass(frozen=True)
class Policy:
    """What the proxy does for one caller: ``mode`` (``correct``, ``inspect`` only, ``off``), and whether a request
    may pick another mode itself (``allow_override``: the ``x-aligner-mode`` header or the body's ``aligner``
    field; a request that tries without leave gets 403)."""

    mode: Mode = "correct"
    allow_override: bool = False
    name: str = "default"


@dataclass(frozen=True)
class KeyEntry:
    """An accepted API key, stored as its SHA-256 digest, and its policy."""

    digest: bytes
    policy: Policy


@dataclass(frozen=True)
class ServeConfig:
    """What a config file sets: plain option values by table (``upstream``, ``aligner``, ``limits``, ``server``),
    the default policy and the keys."""

    upstream: dict[str, Any] = field(default_factory=dict)
    aligner: dict[str, Any] = field(default_factory=dict)
    limits: dict[str, Any] = field(default_factory=dict)
    server: dict[str, Any] = field(default_factory=dict)
    defaults: Policy = Policy()
    keys: tuple[KeyEntry, ...] = ()

    def option(self, name: str) -> Any:
        """The value the file gives a command-line option (``upstream_model`` -> ``[upstream] model``), or None."""
        return _option(self, name)


#: Which entries each table takes, and their types.
_TABLES: dict[str, dict[str, tuple[type, ...]]] = {
    "upstream": {
        "url": (str,),
        "model": (str,),
        "api_key": (str,),
        "api_key_env": (str,),
        "timeout": (int, float),
        "served_model_name": (str,),
        "model_map": (dict,),
    },
    "aligner": {
        "model": (str,),
        "server": (str,),
        "engine": (str,),
        "api_key_env": (str,),
        "template": (str,),
        "max_new_tokens": (int,),
        "device": (str,),
        "dtype": (str,),
        "inspector": (str,),
        "threshold": (int, float),
        "correct_structured": (bool,),
        "correction_timeout": (int, float),
    },
    "limits": {
        "max_queue": (int,),
        "max_body_bytes": (int,),
        "max_batch_items": (int,),
        "max_n": (int,),
        "hide_original": (bool,),
        "max_upstream_bytes": (int,),
        "read_timeout": (int, float),
    },
    "server": {"host": (str,), "port": (int,), "log_level": (str,), "shutdown_grace": (int, float)},
    "defaults": {"mode": (str,), "allow_override": (bool,)},
}
_KEY_FIELDS: dict[str, tuple[type, ...]] = {
    "name": (str,),
    "key": (str,),
    "key_env": (str,),
    "key_sha256": (str,),
    "mode": (str,),
    "allow_override": (bool,),
}


def load_config(
    path: str | os.PathLike[str],
    environ: Mapping[str, str] | None = None,
    *,
    inspector_elsewhere: bool = False,
) -> ServeConfig:
    """Read and check ``path`` (TOML); ``environ`` (default: the process's) resolves ``*_env`` entries.
    ``inspector_elsewhere``: an inspector is given outside the file (``--inspector``), so an ``inspect`` policy
    has one to score with even where ``[aligner]`` names none."""
    env = os.environ if environ is None else environ
    where = str(path)
    try:
        data = tomllib.loads(Path(path).read_bytes().decode("utf-8-sig"))
    except FileNotFoundError:
        raise ConfigError(f"the config file {where!r} does not exist") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"the config file {where!r} is not UTF-8 text (byte {exc.start})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"the config file {where!r} is not valid TOML: {exc}") from None
    unknown = sorted(set(data) - {*_TABLES, "keys"})
    if unknown:
        raise ConfigError(f"{where}: unknown table(s) {unknown}; the tables are {sorted([*_TABLES, 'keys'])}")
    tables = {name: _table(data.get(name, {}), name, spec, where) for name, spec in _TABLES.items()}
    upstream = tables["upstream"]
    if "api_key_env" in upstream:
        upstream["api_key"] = _env(env, upstream.pop("api_key_env"), f"{where} [upstream] api_key_env")
    model_map = upstream.get("model_map", {})
    if not all(isinstance(v, str) and v for v in model_map.values()):
        raise ConfigError(
            f"{where}: [upstream] model_map maps names to upstream model names (strings), got {model_map!r}"
        )
    aligner = tables["aligner"]
    if "api_key_env" in aligner:
        aligner["api_key"] = _env(env, aligner.pop("api_key_env"), f"{where} [aligner] api_key_env")
    defaults = _policy(tables["defaults"], "default", f"{where} [defaults]")
    keys = data.get("keys", [])
    if not isinstance(keys, list) or not all(isinstance(k, dict) for k in keys):
        raise ConfigError(f"{where}: 'keys' must be an array of tables ([[keys]] entries)")
    entries = tuple(_key(k, i, defaults, env, where) for i, k in enumerate(keys))
    if len({e.digest for e in entries}) != len(entries):
        raise ConfigError(f"{where}: the same API key appears in two [[keys]] entries")
    inspects = "inspect" in {defaults.mode, *(e.policy.mode for e in entries)}
    if inspects and "inspector" not in aligner and not inspector_elsewhere:
        raise ConfigError(
            f'{where}: a policy has mode = "inspect" but [aligner] names no inspector to score with'
        )
    return ServeConfig(
        upstream=upstream,
        aligner=aligner,
        limits=tables["limits"],
        server=tables["server"],
        defaults=defaults,
        keys=entries,
    )


def digest(key: str) -> bytes:
    """The SHA-256 digest keys are stored and compared as (a file may hold only the digest)."""
    return hashlib.sha256(key.encode("utf-8")).digest()


def _table(value: Any, name: str, spec: dict[str, tuple[type, ...]], where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: [{name}] must be a table")
    out: dict[str, Any] = {}
    for key, item in value.items():
        if key not in spec:
            raise ConfigError(f"{where}: unknown entry {key!r} in [{name}]; it takes {sorted(spec)}")
        types = spec[key]
        if isinstance(item, bool) and bool not in types or not isinstance(item, types):
            wanted = " or ".join(t.__name__ for t in types)
            raise ConfigError(f"{where}: [{name}] {key} must be a {wanted}, got {item!r}")
        out[key] = item
    return out


def _policy(values: Mapping[str, Any], name: str, where: str, base: Policy | None = None) -> Policy:
    base = base or Policy()
    mode = values.get("mode", base.mode)
    if mode not in MODES:
        raise ConfigError(f"{where}: mode must be one of {', '.join(MODES)}, got {mode!r}")
    return Policy(mode=mode, allow_override=values.get("allow_override", base.allow_override), name=name)


def _key(
    entry: Mapping[str, Any], index: int, defaults: Policy, env: Mapping[str, str], where: str
) -> KeyEntry:
    label = f"{where} [[keys]] #{index + 1}"
    values = _table(dict(entry), "keys", _KEY_FIELDS, where)
    given = [k for k in ("key", "key_env", "key_sha256") if k in values]
    if len(given) != 1:
        raise ConfigError(f"{label}: give exactly one of key, key_env or key_sha256 (got {given or 'none'})")
    if "key_sha256" in values:
        try:
            raw = bytes.fromhex(values["key_sha256"])
        except ValueError:
            raw = b""
        if len(raw) != 32:
            raise ConfigError(f"{label}: key_sha256 must be 64 hexadecimal digits (a SHA-256 digest)")
    else:
        key = values["key"] if "key" in values else _env(env, values["key_env"], f"{label} key_env")
        if not key.strip():
            raise ConfigError(f"{label}: the key is empty")
        raw = digest(key.strip())
    name = values.get("name") or f"key {index + 1}"
    return KeyEntry(raw, _policy(values, name, label, defaults))


def _env(env: Mapping[str, str], name: str, label: str) -> str:
    value = env.get(name)
    if not value:
        raise ConfigError(f"{label}: the environment variable {name!r} is not set")
    return value


#: Command-line option -> (table, entry) of the file that gives its value.
_ENTRIES: dict[str, tuple[str, str]] = {
    "upstream": ("upstream", "url"),
    "upstream_model": ("upstream", "model"),
    "upstream_api_key": ("upstream", "api_key"),
    "upstream_timeout": ("upstream", "timeout"),
    "served_model_name": ("upstream", "served_model_name"),
    "model_map": ("upstream", "model_map"),
    "aligner": ("aligner", "model"),
    "aligner_server": ("aligner", "server"),
    "aligner_model": ("aligner", "model"),
    "aligner_api_key": ("aligner", "api_key"),
    "aligner_engine": ("aligner", "engine"),
    "template": ("aligner", "template"),
    "max_new_tokens": ("aligner", "max_new_tokens"),
    "device": ("aligner", "device"),
    "dtype": ("aligner", "dtype"),
    "inspector": ("aligner", "inspector"),
    "threshold": ("aligner", "threshold"),
    "correct_structured": ("aligner", "correct_structured"),
    "correction_timeout": ("aligner", "correction_timeout"),
    "max_queue": ("limits", "max_queue"),
    "max_body_bytes": ("limits", "max_body_bytes"),
    "max_batch_items": ("limits", "max_batch_items"),
    "max_n": ("limits", "max_n"),
    "hide_original": ("limits", "hide_original"),
    "max_upstream_bytes": ("limits", "max_upstream_bytes"),
    "read_timeout": ("limits", "read_timeout"),
    "host": ("server", "host"),
    "port": ("server", "port"),
    "log_level": ("server", "log_level"),
    "shutdown_grace": ("server", "shutdown_grace"),
}

#: The command-line options a config file can set.
FILE_OPTIONS: tuple[str, ...] = tuple(_ENTRIES)


def entry_name(option: str) -> str:
    """Where the file gives ``option``, for messages: ``max_queue`` -> ``[limits] max_queue``."""
    table, key = _ENTRIES[option]
    return f"[{table}] {key}"


def _option(config: ServeConfig, name: str) -> Any:
    if name not in _ENTRIES:
        return None
    served = (
        "server" in config.aligner
    )  # [aligner] model is the served name on a server, else the model to load
    if (name == "aligner" and served) or (name == "aligner_model" and not served):
        return None
    table, key = _ENTRIES[name]
    value = getattr(config, table).get(key)
    if name == "model_map" and value is not None:
        return [f"{k}={v}" for k, v in value.items()]
    return value


__all__ = [
    "FILE_OPTIONS",
    "MODES",
    "ConfigError",
    "KeyEntry",
    "Mode",
    "Policy",
    "ServeConfig",
    "digest",
    "entry_name",
    "load_config",
]
