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
    assert (
        config.option("upstream") == "http://127.0.0.1:8001/v1"
        and config.option("upstream_api_key") == "sk-up"
    )
    assert (
        config.option("aligner_server") == "http://127.0.0.1:8000/v1"
        and config.option("aligner_model") == "aligner"
    )
    assert (
        config.option("aligner") is None and config.option("max_queue") == 8 and config.option("port") is None
    )
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
        ('[defaults]\nmode = "sometimes"\n', {}, "mode must be one of correct, inspect, off"),
        ('[[keys]]\nname = "a"\n', {}, "exactly one of key, key_env or key_sha256"),
        ('[[keys]]\nkey_env = "MISSING"\n', {}, "environment variable 'MISSING' is not set"),
        ('[[keys]]\nkey_sha256 = "abc"\n', {}, "64 hexadecimal digits"),
        ('[[keys]]\nkey = "k"\n[[keys]]\nkey = "k"\n', {}, "same API key appears"),
        ('[[keys]]\nkey = "k"\nmode = "inspect"\n', {}, "names no inspector"),
        ("[limits]\nhide_original = 1\n", {}, "hide_original must be a bool"),
        ("[limits\n", {}, "not valid TOML"),
    ],
)
def test_a_bad_file_stops_the_proxy_with_a_message_naming_the_entry(tmp_path, text, env, message):
    with pytest.raises(ConfigError, match=message):
        load_config(write(tmp_path, text), env)


def test_a_file_that_is_not_utf8_or_missing_is_a_clean_error(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_bytes(b'[upstream]\nurl = "\xff"\n')
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
    for headers, body, status in (
        ({"x-aligner-mode": "off"}, "correct", 400),
        ({}, "loud", 400),
        ({}, 3, 400),
    ):
        with pytest.raises(PolicyError) as bad:
            requested_mode(headers, body)
        assert bad.value.status == status


def test_command_line_keys_get_the_default_policy_and_no_keys_means_everyone_has_it():
    ring = KeyRing.build(["k1", " k2 "], default=Policy("inspect", True))
    assert ring.policy_for("k2") == Policy("inspect", True, "key 2") and ring.enabled
    assert KeyRing(default=Policy("off")).policy_for(None) == Policy("off")


def test_an_inspector_given_on_the_command_line_serves_an_inspect_policy(tmp_path):
    config = load_config(
        write(tmp_path, '[[keys]]\nkey = "k"\nmode = "inspect"\n'), {}, inspector_elsewhere=True
    )
    assert config.keys[0].policy.mode == "inspect"


# -- aligner serve --config ---------------------------------------------------------------------------------------

SERVE = """
[upstream]
url = "http://127.0.0.1:9/v1"
model = "fake-up"
served_model_name = "assistant"
model_map = { "gpt-4o" = "fake-up" }
api_key = "file-upstream-key"

[aligner]
correct_structured = true

[limits]
max_queue = 8
max_n = 4

[server]
shutdown_grace = 3

[[keys]]
name = "reports"
key = "file-key"
mode = "off"
"""


def serve(args, env=None):
    from typer.testing import CliRunner

    from aligner_core.cli import app as cli

    return CliRunner().invoke(cli, ["serve", *args], env=env)


@pytest.fixture
def served(tiny_aligner, monkeypatch):
    """``aligner serve`` up to the app it would run (the model load and uvicorn are stood in for)."""
    from aligner_core.jobs.choice import EngineChoice
    from aligner_serve import http_server

    out: dict = {}
    monkeypatch.setattr(EngineChoice, "load", lambda self, **kwargs: tiny_aligner)
    monkeypatch.setattr(http_server, "run", lambda app, **kwargs: out.update(app=app, **kwargs))
    return out


def test_the_file_gives_the_defaults_and_options_given_explicitly_win(tmp_path, served):
    import asyncio

    import httpx

    path = write(tmp_path, SERVE)
    run = serve(
        ["--config", str(path), "--max-queue", "6", "--api-key", "cli-key", "--port", "8123"],
        env={"ALIGNER_UPSTREAM_API_KEY": "env-upstream-key"},
    )
    assert run.exit_code == 0, run.output
    app = served["app"]
    proxy = app.state.proxy
    assert (proxy.limits.max_queue, proxy.limits.max_n, app.state.drain.grace) == (6, 4, 3)  # --max-queue won
    assert proxy.correct_structured is True and served["port"] == 8123 and served["host"] == "127.0.0.1"
    assert proxy.models.upstream_name("gpt-4o") == proxy.models.upstream_name("assistant") == "fake-up"
    assert proxy.upstream._secret == "env-upstream-key"  # its environment variable is explicit too

    async def ask(key, mode):
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app), base_url="http://proxy.test"
        ) as client:
            return await client.post(
                "/v1/chat/completions",
                headers={"Authorization": f"Bearer {key}", "x-aligner-mode": mode},
                json={"messages": [{"role": "user", "content": "q"}]},
            )

    # Both keys are accepted, each with its policy: asking for another mode is refused before the upstream is called.
    assert (
        asyncio.run(ask("file-key", "correct"))
        .json()["error"]["message"]
        .startswith("this API key runs in mode 'off'")
    )
    assert "runs in mode 'correct'" in asyncio.run(ask("cli-key", "off")).json()["error"]["message"]
    assert asyncio.run(ask("other", "off")).status_code == 401
    assert "API keys: 2; modes: correct, off" in run.stderr


@pytest.mark.parametrize(
    "text, says",
    [
        (None, "does not exist"),
        ("[limits]\nmax_queue = 0\n", "[limits] max_queue = 0: "),
        ("[aligner]\nthreshold = 2\n", "[aligner] threshold = 2: "),
        ("[limits\n", "not valid TOML"),
        ('[[keys]]\nkey = "k"\nmode = "inspect"\n', "names no inspector"),
        ("[server]\nport = 8080\n", "give the upstream's URL"),
        (
            '[upstream]\nurl = "http://127.0.0.1:9/v1"\n[limits]\nmax_queue = 2\nmax_n = 4\n',
            "max_n (4) cannot exceed",
        ),
    ],
)
def test_a_config_that_cannot_start_is_one_line_and_exit_code_2(tmp_path, served, text, says):
    path = tmp_path / "missing.toml" if text is None else write(tmp_path, text)
    run = serve(["--config", str(path)])
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert run.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and says in lines[0], (
        run.stderr
    )
    assert "app" not in served  # nothing was served


def test_a_key_given_on_the_command_line_and_in_the_file_has_the_files_policy():
    from aligner_serve.config import KeyEntry, digest

    ring = KeyRing.build(["shared"], entries=[KeyEntry(digest("shared"), Policy("off", False, "reports"))])
    assert ring.policy_for("shared") == Policy("off", False, "reports") and len(ring) == 2
