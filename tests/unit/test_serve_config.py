"""``aligner serve --config``: the file is checked whole at start, and each key's policy decides a request's mode."""

from __future__ import annotations

import hashlib

import pytest

pytest.importorskip("starlette")

from aligner_serve.config import ConfigError, Policy, load_config  # noqa: E402
from aligner_serve.policy import KeyRing, PolicyError, mode_for, requested_mode  # noqa: E402

FULL = """
[upstream]
url = "http://127.0.0.1:8001/v1"
model = "gpt-4o-mini"
api_key_env = "UP_KEY"
timeout = 30

[aligner]
server = "http://127.0.0.1:8000/v1"
model = "aligner"
inspector = "/models/inspector"
threshold = 0.7

[limits]
max_queue = 8

[defaults]
mode = "correct"

[[keys]]
name = "chat-app"
key_env = "APP_KEY"
allow_override = true

[[keys]]
name = "analytics"
key_sha256 = "{digest}"
mode = "inspect"
"""


def write(tmp_path, text: str):
    path = tmp_path / "serve.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_a_full_file_maps_to_the_command_line_options_and_key_policies(tmp_path):
    text = FULL.replace("{digest}", hashlib.sha256(b"analytics-key").hexdigest())
    config = load_config(write(tmp_path, text), {"UP_KEY": "sk-up", "APP_KEY": "app-key"})
    assert config.option("upstream") == "http://127.0.0.1:8001/v1" and config.option("upstream_api_key") == "sk-up"
    assert config.option("aligner_server") == "http://127.0.0.1:8000/v1" and config.option("aligner_model") == "aligner"
    assert config.option("aligner") is None and config.option("max_queue") == 8 and config.option("port") is None
    ring = KeyRing.build(entries=config.keys, default=config.defaults)
    assert ring.policy_for("app-key") == Policy("correct", True, "chat-app")
    assert ring.policy_for("analytics-key") == Policy("inspect", False, "analytics")
    assert ring.policy_for("nope") is None and ring.policy_for(None) is None and len(ring) == 2


@pytest.mark.parametrize(
    ("text", "env", "message"),
    [
        ("[upstream]\nurl = 3\n", {}, r"\[upstream\] url must be a str"),
        ("[upstream]\nport = 1\n", {}, "unknown entry 'port' in"),
        ("[mystery]\n", {}, "unknown table"),
        ("[defaults]\nmode = \"sometimes\"\n", {}, "mode must be one of correct, inspect, off"),
        ("[[keys]]\nname = \"a\"\n", {}, "exactly one of key, key_env or key_sha256"),
        ("[[keys]]\nkey_env = \"MISSING\"\n", {}, "environment variable 'MISSING' is not set"),
        ("[[keys]]\nkey_sha256 = \"abc\"\n", {}, "64 hexadecimal digits"),
        ("[[keys]]\nkey = \"k\"\n[[keys]]\nkey = \"k\"\n", {}, "same API key appears"),
        ("[[keys]]\nkey = \"k\"\nmode = \"inspect\"\n", {}, "names no inspector"),
        ("[limits]\nhide_original = 1\n", {}, "hide_original must be a bool"),
        ("[limits\n", {}, "not valid TOML"),
    ],
)
def test_a_bad_file_stops_the_proxy_with_a_message_naming_the_entry(tmp_path, text, env, message):
    with pytest.raises(ConfigError, match=message):
        load_config(write(tmp_path, text), env)


def test_a_file_that_is_not_utf8_or_missing_is_a_clean_error(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_bytes(b"[upstream]\nurl = \"\xff\"\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(bad, {})
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.toml", {})
    bom = tmp_path / "bom.toml"
    bom.write_bytes("\ufeff[server]\nport = 9000\n".encode())
    assert load_config(bom, {}).option("port") == 9000


def test_a_request_picks_a_mode_only_where_its_key_allows_it():
    strict, open_ = Policy("correct", False, "app"), Policy("inspect", True, "lab")
    assert mode_for(strict, None) == "correct" and mode_for(strict, "correct") == "correct"
    with pytest.raises(PolicyError, match="may not choose") as refused:
        mode_for(strict, "off")
    assert refused.value.status == 403
    assert mode_for(open_, "off") == "off"
    assert requested_mode({"x-aligner-mode": "OFF"}, None) == "off"
    assert requested_mode({}, "inspect") == "inspect" and requested_mode({}, None) is None
    for headers, body, status in (({"x-aligner-mode": "off"}, "correct", 400), ({}, "loud", 400), ({}, 3, 400)):
        with pytest.raises(PolicyError) as bad:
            requested_mode(headers, body)
        assert bad.value.status == status


def test_command_line_keys_get_the_default_policy_and_no_keys_means_everyone_has_it():
    ring = KeyRing.build(["k1", " k2 "], default=Policy("inspect", True))
    assert ring.policy_for("k2") == Policy("inspect", True, "key 2") and ring.enabled
    assert KeyRing(default=Policy("off")).policy_for(None) == Policy("off")
