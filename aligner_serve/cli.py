"""``aligner serve``: run the correction proxy (imports nothing heavy until the command runs).

``--config serve.toml`` gives the defaults of every option and the API keys with their policies (``config``);
options given explicitly win (``settings``). Anything that stops the start (a bad file, a key file without keys,
limits that could never admit a request) is one line on stderr and exit code 2, before a model is loaded.
"""

from __future__ import annotations

import ipaddress
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer

if TYPE_CHECKING:
    from .config import ServeConfig

logger = logging.getLogger("aligner_serve")

_UP = "Upstream"
_AL = "Aligner"
_SEC = "Security and limits"


def serve_command(
    ctx: typer.Context,
    config: Annotated[
        Path | None,
        typer.Option(
            "--config",
            dir_okay=False,
            help="A TOML file with the upstream, the Aligner, the limits and the API keys with "
            "their policies (mode correct, inspect or off; whether a request may choose). Options given here win over it.",
            rich_help_panel=_SEC,
        ),
    ] = None,
    upstream: Annotated[
        str | None,
        typer.Option(
            "--upstream",
            help="The upstream model's OpenAI-compatible URL, e.g. "
            "http://127.0.0.1:8001/v1 (or [upstream] url in --config).",
            rich_help_panel=_UP,
        ),
    ] = None,
    upstream_model: Annotated[
        str | None,
        typer.Option(
            "--upstream-model",
            help="The upstream model this proxy serves: requests naming it (or --served-model-name) "
            "are sent as it; any other name goes upstream as it came, and the upstream answers it.",
            rich_help_panel=_UP,
        ),
    ] = None,
    model_map: Annotated[
        list[str] | None,
        typer.Option(
            "--model-map",
            help="NAME=UPSTREAM: send requests for NAME as the upstream's UPSTREAM (repeat for several; "
            "'*=UPSTREAM' for every name not mapped otherwise). Listed by /v1/models with the upstream model's fields.",
            rich_help_panel=_UP,
        ),
    ] = None,
    upstream_api_key: Annotated[
        str | None,
        typer.Option(
            "--upstream-api-key",
            envvar="ALIGNER_UPSTREAM_API_KEY",
            show_envvar=False,
            help="Key sent to the upstream only (or $ALIGNER_UPSTREAM_API_KEY); never echoed.",
            rich_help_panel=_UP,
        ),
    ] = None,
    upstream_timeout: Annotated[
        float,
        typer.Option(
            "--upstream-timeout",
            min=0.001,
            help="Seconds the whole upstream call may take, however the upstream "
            "trickles its answer (504 beyond).",
            rich_help_panel=_UP,
        ),
    ] = 120.0,
    max_upstream_bytes: Annotated[
        int,
        typer.Option(
            "--max-upstream-bytes",
            min=1,
            help="Largest upstream response read (502 beyond, at once).",
            rich_help_panel=_UP,
        ),
    ] = 8_388_608,
    served_model_name: Annotated[
        str | None,
        typer.Option(
            "--served-model-name",
            help="Another name clients may use for --upstream-model (listed by /v1/models).",
            rich_help_panel=_UP,
        ),
    ] = None,
    aligner: Annotated[
        str | None,
        typer.Option(
            "--aligner",
            help="Aligner model: hub id, local directory or GGUF file (default: the packaged "
            "SmolLM2-135M-Instruct); with --aligner-server use --aligner-model.",
            rich_help_panel=_AL,
        ),
    ] = None,
    aligner_server: Annotated[
        str | None,
        typer.Option(
            "--aligner-server",
            help="Run the Aligner on this OpenAI-compatible server instead of in this process.",
            rich_help_panel=_AL,
        ),
    ] = None,
    aligner_model: Annotated[
        str | None,
        typer.Option(
            "--aligner-model",
            help="The Aligner's served name on --aligner-server (default: its only model).",
            rich_help_panel=_AL,
        ),
    ] = None,
    aligner_api_key: Annotated[
        str | None,
        typer.Option(
            "--aligner-api-key",
            envvar="ALIGNER_API_KEY",
            show_envvar=False,
            help="Key of --aligner-server (or $ALIGNER_API_KEY).",
            rich_help_panel=_AL,
        ),
    ] = None,
    aligner_engine: Annotated[
        str,
        typer.Option(
            "--aligner-engine",
            help="Engine of a local Aligner: transformers (default: with many clients at once its planned "
            "batches served 3.3x the requests of llama.cpp on a 2-core CPU, benchmarks/serve.py), llama.cpp "
            "(a GGUF; a little sooner for one client at a time), vllm, or auto (llama.cpp for a GGUF on a "
            "CPU-only machine when installed, else transformers).",
            rich_help_panel=_AL,
        ),
    ] = "transformers",
    template: Annotated[
        str | None,
        typer.Option(
            "--template", help="Prompt template (default: chosen for the model).", rich_help_panel=_AL
        ),
    ] = None,
    max_new_tokens: Annotated[
        int,
        typer.Option(
            "--max-new-tokens",
            min=1,
            help="Token limit of a short answer's correction; a longer answer's correction "
            "gets room to restate it (its length plus a quarter). A client's max_tokens bounds the upstream's answer, "
            "never the correction.",
            rich_help_panel=_AL,
        ),
    ] = 512,
    device: Annotated[
        str | None, typer.Option("--device", help="cpu, cuda, mps (local Aligner).", rich_help_panel=_AL)
    ] = None,
    dtype: Annotated[
        str,
        typer.Option(
            "--dtype", help="auto, float32, bfloat16, float16 (local Aligner).", rich_help_panel=_AL
        ),
    ] = "auto",
    inspector: Annotated[
        str | None,
        typer.Option(
            "--inspector",
            help="An inspector (hub id or directory, e.g. from aligner train-inspector): answers it "
            "scores at or above --threshold pass unchanged, without generation.",
            rich_help_panel=_AL,
        ),
    ] = None,
    threshold: Annotated[
        float,
        typer.Option(
            "--threshold",
            min=0.0,
            max=1.0,
            help="Inspector score at or above which an answer passes unchanged.",
            rich_help_panel=_AL,
        ),
    ] = 0.5,
    correct_structured: Annotated[
        bool,
        typer.Option(
            "--correct-structured",
            help="Correct structured answers too (JSON mode, a JSON schema), keeping a correction "
            "only if it still parses and validates; by default they pass through unchanged. A request's "
            '"aligner": {"correct_structured": ...} field overrides it.',
            rich_help_panel=_AL,
        ),
    ] = False,
    correction_timeout: Annotated[
        float,
        typer.Option(
            "--correction-timeout",
            min=0.001,
            help="Seconds one correction may take (504 beyond).",
            rich_help_panel=_AL,
        ),
    ] = 120.0,
    host: Annotated[
        str,
        typer.Option(
            "--host", help="Address to bind; keep 127.0.0.1 unless API keys are set.", rich_help_panel=_SEC
        ),
    ] = "127.0.0.1",
    port: Annotated[
        int, typer.Option("--port", min=0, max=65535, help="Port to listen on.", rich_help_panel=_SEC)
    ] = 8080,
    api_key: Annotated[
        list[str] | None,
        typer.Option(
            "--api-key",
            envvar="ALIGNER_SERVE_API_KEY",
            show_envvar=False,
            help="A key clients must send as 'Authorization: Bearer KEY' (repeat for several; or "
            "$ALIGNER_SERVE_API_KEY).",
            rich_help_panel=_SEC,
        ),
    ] = None,
    api_key_file: Annotated[
        Path | None,
        typer.Option(
            "--api-key-file",
            exists=True,
            dir_okay=False,
            readable=True,
            help="File of accepted keys, one per line (# comments, blank lines and a UTF-8 BOM ignored); a file that "
            "holds no key, or is not UTF-8, refuses to start.",
            rich_help_panel=_SEC,
        ),
    ] = None,
    max_body_bytes: Annotated[
        int,
        typer.Option(
            "--max-body-bytes", min=1, help="Largest request body (413 beyond).", rich_help_panel=_SEC
        ),
    ] = 1_000_000,
    max_queue: Annotated[
        int,
        typer.Option(
            "--max-queue",
            min=1,
            help="Places in progress at once: a request takes "
            "one per choice (n), a batch one per item (429 with Retry-After beyond).",
            rich_help_panel=_SEC,
        ),
    ] = 256,
    max_batch_items: Annotated[
        int | None,
        typer.Option(
            "--max-batch-items",
            min=1,
            help="Most items in one /v1/corrections request (default 64, or --max-queue when smaller).",
            rich_help_panel=_SEC,
        ),
    ] = None,
    max_n: Annotated[
        int | None,
        typer.Option(
            "--max-n",
            min=1,
            help="Most choices (n) in one chat request, 400 beyond (default 16, or --max-queue when "
            "smaller).",
            rich_help_panel=_SEC,
        ),
    ] = None,
    read_timeout: Annotated[
        float,
        typer.Option(
            "--read-timeout",
            min=0.001,
            help="Seconds a client has to send a request's headers (else the connection is "
            "closed) and again its body (else 408).",
            rich_help_panel=_SEC,
        ),
    ] = 30.0,
    shutdown_grace: Annotated[
        float,
        typer.Option(
            "--shutdown-grace",
            min=0.0,
            help="Seconds requests in progress may finish after SIGTERM; those still running then get 503.",
            rich_help_panel=_SEC,
        ),
    ] = 30.0,
    hide_original: Annotated[
        bool,
        typer.Option(
            "--hide-original",
            help="Leave the uncorrected answer out of responses (streams never carry it).",
            rich_help_panel=_SEC,
        ),
    ] = False,
    log_level: Annotated[str, typer.Option("--log-level", help="debug, info, warning, error.")] = "info",
) -> None:
    """Serve an OpenAI-compatible chat API whose answers are corrected by the Aligner.

    POST /v1/chat/completions (streaming too), POST /v1/corrections, GET /v1/models, /health, /metrics.
    """
    try:
        from . import http_server  # noqa: F401 - the [serve] extra is checked before anything else
        from .config import ConfigError
        from .settings import resolve
    except ImportError as exc:
        _fail(f'aligner serve needs the [serve] extra: pip install "llm-aligner[serve]" ({exc})')
    try:
        options, file = resolve(ctx, config)
    except ConfigError as exc:  # one clean line, before anything is loaded
        _fail(str(exc))
    _serve(options, file)


def _serve(o: dict[str, Any], file: ServeConfig | None) -> None:
    """Build and run the proxy from the merged options ``o`` and the config file read (or None)."""
    from aligner_core.errors import AlignerError
    from aligner_core.jobs.choice import EngineChoice

    from . import http_server
    from .app import build_app
    from .limits import ServeLimits
    from .models import ModelMap
    from .policy import DEFAULT_POLICY, KeyRing
    from .security import KeyFileError, read_key_file
    from .upstream import Upstream

    if not o["upstream"]:
        _fail("give the upstream's URL: --upstream URL, or [upstream] url in --config")
    if o["aligner_server"] and o["aligner"]:
        _fail("--aligner names a model to load here; with --aligner-server use --aligner-model")
    if o["aligner_model"] and not o["aligner_server"]:
        _fail("--aligner-model applies to --aligner-server; to load a model here use --aligner")
    try:
        plain = [*(o["api_key"] or ()), *(read_key_file(o["api_key_file"]) if o["api_key_file"] else ())]
    except KeyFileError as exc:
        _fail(str(exc))
    keys = KeyRing.build(
        plain, entries=file.keys if file else (), default=file.defaults if file else DEFAULT_POLICY
    )
    if not keys.enabled and not _is_loopback(o["host"]):
        logger.warning(
            "serving on %s without API keys: anyone who reaches this address can use the upstream "
            "model; pass --api-key, --api-key-file or [[keys]] in --config",
            o["host"],
        )
    try:
        limits = ServeLimits(
            max_body_bytes=o["max_body_bytes"],
            max_queue=o["max_queue"],
            max_batch_items=o["max_batch_items"],
            max_n=o["max_n"],
            correction_timeout=o["correction_timeout"],
            include_original=not o["hide_original"],
            max_upstream_bytes=o["max_upstream_bytes"],
            read_timeout=o["read_timeout"],
            shutdown_grace=o["shutdown_grace"],
        )
        up = Upstream(
            o["upstream"],
            model=o["upstream_model"],
            api_key=o["upstream_api_key"],
            timeout=o["upstream_timeout"],
            max_response_bytes=o["max_upstream_bytes"],
        )
        names = ModelMap.build(
            upstream_model=o["upstream_model"],
            served_model=o["served_model_name"],
            mappings=o["model_map"] or (),
        )
    except ValueError as exc:
        _fail(str(exc))
    log_level = o["log_level"]
    logging.getLogger("aligner_serve").setLevel(log_level.upper())
    try:
        choice = EngineChoice(
            model=o["aligner_model"] if o["aligner_server"] else o["aligner"],
            server=o["aligner_server"],
            engine=o["aligner_engine"],
            api_key=o["aligner_api_key"],
            timeout=o["correction_timeout"],
            max_concurrency=max(64, o["max_queue"]),
        )
    except ValueError as exc:
        _fail(str(exc).replace("--engine", "--aligner-engine"))
    typer.echo(f"loading the Aligner ({choice.where}) ...", err=True)
    try:
        corrector = choice.load(
            template=o["template"], device=o["device"], dtype=o["dtype"], max_new_tokens=o["max_new_tokens"]
        )
        if o["inspector"] is not None:
            from aligner_core.inspector import Inspector

            corrector.inspector = Inspector.from_pretrained(o["inspector"], device=o["device"])
            corrector.threshold = o["threshold"]
    except AlignerError as exc:
        _fail(str(exc))
    try:
        app = build_app(
            corrector,
            up,
            api_keys=keys,
            limits=limits,
            models=names,
            correct_structured=o["correct_structured"],
        )
    except ValueError as exc:
        _fail(str(exc))
    modes = sorted({e.policy.mode for e in keys.entries} | {keys.default.mode})
    typer.echo(
        f"correcting {up.base_url} with {corrector.name} ({corrector.template.name} template) on "
        f"http://{o['host']}:{o['port']}/v1; API keys: {len(keys) or 'none'}; modes: {', '.join(modes)}",
        err=True,
    )
    http_server.run(app, host=o["host"], port=o["port"], log_level=log_level.lower())


def _fail(message: str) -> NoReturn:
    """Stop the start with one line on stderr and exit code 2."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def register(app: typer.Typer) -> None:
    """Add the ``serve`` command to the ``aligner`` app (``aligner_core.cli`` calls this)."""
    app.command("serve", no_args_is_help=True)(serve_command)


__all__ = ["register", "serve_command"]
