"""``aligner serve``: run the correction proxy (imports nothing heavy until the command runs)."""

from __future__ import annotations

import ipaddress
import logging
from pathlib import Path
from typing import Annotated

import typer

logger = logging.getLogger("aligner_serve")

_UP = "Upstream"
_AL = "Aligner"
_SEC = "Security and limits"


def serve_command(
    upstream: Annotated[str, typer.Option("--upstream", help="The upstream model's OpenAI-compatible URL, e.g. "
                                          "http://127.0.0.1:8001/v1.", rich_help_panel=_UP)],
    upstream_model: Annotated[str | None, typer.Option(
        "--upstream-model", help="The upstream model this proxy serves: requests naming it (or --served-model-name) "
        "are sent as it; any other name goes upstream as it came, and the upstream answers it.",
        rich_help_panel=_UP)] = None,
    model_map: Annotated[list[str] | None, typer.Option(
        "--model-map", help="NAME=UPSTREAM: send requests for NAME as the upstream's UPSTREAM (repeat for several; "
        "'*=UPSTREAM' for every name not mapped otherwise). Listed by /v1/models with the upstream model's fields.",
        rich_help_panel=_UP)] = None,
    upstream_api_key: Annotated[str | None, typer.Option(
        "--upstream-api-key", envvar="ALIGNER_UPSTREAM_API_KEY", show_envvar=False,
        help="Key sent to the upstream only (or $ALIGNER_UPSTREAM_API_KEY); never echoed.", rich_help_panel=_UP)] = None,
    upstream_timeout: Annotated[float, typer.Option(
        "--upstream-timeout", min=0.001, help="Seconds the whole upstream call may take, however the upstream "
        "trickles its answer (504 beyond).", rich_help_panel=_UP)] = 120.0,
    max_upstream_bytes: Annotated[int, typer.Option(
        "--max-upstream-bytes", min=1, help="Largest upstream response read (502 beyond, at once).",
        rich_help_panel=_UP)] = 8_388_608,
    served_model_name: Annotated[str | None, typer.Option(
        "--served-model-name", help="Another name clients may use for --upstream-model (listed by /v1/models).",
        rich_help_panel=_UP)] = None,
    aligner: Annotated[str | None, typer.Option(
        "--aligner", help="Aligner model: hub id, local directory or GGUF file (default: the packaged "
        "SmolLM2-135M-Instruct); with --aligner-server use --aligner-model.", rich_help_panel=_AL)] = None,
    aligner_server: Annotated[str | None, typer.Option(
        "--aligner-server", help="Run the Aligner on this OpenAI-compatible server instead of in this process.",
        rich_help_panel=_AL)] = None,
    aligner_model: Annotated[str | None, typer.Option(
        "--aligner-model", help="The Aligner's served name on --aligner-server (default: its only model).",
        rich_help_panel=_AL)] = None,
    aligner_api_key: Annotated[str | None, typer.Option(
        "--aligner-api-key", envvar="ALIGNER_API_KEY", show_envvar=False,
        help="Key of --aligner-server (or $ALIGNER_API_KEY).", rich_help_panel=_AL)] = None,
    template: Annotated[str | None, typer.Option("--template", help="Prompt template (default: chosen for the model).",
                                                 rich_help_panel=_AL)] = None,
    max_new_tokens: Annotated[int, typer.Option(
        "--max-new-tokens", min=1, help="Token limit of a short answer's correction; a longer answer's correction "
        "gets room to restate it (its length plus a quarter). A client's max_tokens bounds the upstream's answer, "
        "never the correction.", rich_help_panel=_AL)] = 512,
    device: Annotated[str | None, typer.Option("--device", help="cpu, cuda, mps (local Aligner).",
                                               rich_help_panel=_AL)] = None,
    dtype: Annotated[str, typer.Option("--dtype", help="auto, float32, bfloat16, float16 (local Aligner).",
                                       rich_help_panel=_AL)] = "auto",
    inspector: Annotated[str | None, typer.Option(
        "--inspector", help="An inspector (hub id or directory, e.g. from aligner train-inspector): answers it "
        "scores at or above --threshold pass unchanged, without generation.", rich_help_panel=_AL)] = None,
    threshold: Annotated[float, typer.Option("--threshold", min=0.0, max=1.0, help="Inspector score at or above "
                                             "which an answer passes unchanged.", rich_help_panel=_AL)] = 0.5,
    correct_structured: Annotated[bool, typer.Option(
        "--correct-structured", help="Correct structured answers too (JSON mode, a JSON schema), keeping a correction "
        "only if it still parses and validates; by default they pass through unchanged. A request's "
        '"aligner": {"correct_structured": ...} field overrides it.', rich_help_panel=_AL)] = False,
    correction_timeout: Annotated[float, typer.Option("--correction-timeout", min=0.001,
                                                      help="Seconds one correction may take (504 beyond).",
                                                      rich_help_panel=_AL)] = 120.0,
    host: Annotated[str, typer.Option("--host", help="Address to bind; keep 127.0.0.1 unless API keys are set.",
                                      rich_help_panel=_SEC)] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=0, max=65535, help="Port to listen on.",
                                      rich_help_panel=_SEC)] = 8080,
    api_key: Annotated[list[str] | None, typer.Option(
        "--api-key", envvar="ALIGNER_SERVE_API_KEY", show_envvar=False,
        help="A key clients must send as 'Authorization: Bearer KEY' (repeat for several; or "
        "$ALIGNER_SERVE_API_KEY).", rich_help_panel=_SEC)] = None,
    api_key_file: Annotated[Path | None, typer.Option(
        "--api-key-file", exists=True, dir_okay=False, readable=True,
        help="File of accepted keys, one per line (# comments, blank lines and a UTF-8 BOM ignored); a file that "
        "holds no key, or is not UTF-8, refuses to start.", rich_help_panel=_SEC)] = None,
    max_body_bytes: Annotated[int, typer.Option("--max-body-bytes", min=1, help="Largest request body (413 beyond).",
                                                rich_help_panel=_SEC)] = 1_000_000,
    max_queue: Annotated[int, typer.Option("--max-queue", min=1, help="Places in progress at once: a request takes "
                                           "one per choice (n), a batch one per item (429 with Retry-After beyond).",
                                           rich_help_panel=_SEC)] = 256,
    max_batch_items: Annotated[int | None, typer.Option(
        "--max-batch-items", min=1, help="Most items in one /v1/corrections request (default 64, or --max-queue "
        "when smaller).", rich_help_panel=_SEC)] = None,
    max_n: Annotated[int | None, typer.Option(
        "--max-n", min=1, help="Most choices (n) in one chat request, 400 beyond (default 16, or --max-queue when "
        "smaller).", rich_help_panel=_SEC)] = None,
    read_timeout: Annotated[float, typer.Option(
        "--read-timeout", min=0.001, help="Seconds a client has to send a request's headers (else the connection is "
        "closed) and again its body (else 408).", rich_help_panel=_SEC)] = 30.0,
    shutdown_grace: Annotated[float, typer.Option(
        "--shutdown-grace", min=0.0, help="Seconds requests in progress may finish after SIGTERM; those still "
        "running then get 503.", rich_help_panel=_SEC)] = 30.0,
    hide_original: Annotated[bool, typer.Option("--hide-original", help="Leave the uncorrected answer out of "
                                                "responses (streams never carry it).", rich_help_panel=_SEC)] = False,
    log_level: Annotated[str, typer.Option("--log-level", help="debug, info, warning, error.")] = "info",
) -> None:
    """Serve an OpenAI-compatible chat API whose answers are corrected by the Aligner.

    POST /v1/chat/completions (streaming too), POST /v1/corrections, GET /v1/models, /health, /metrics.
    """
    try:
        from . import http_server
        from .app import build_app
        from .limits import ServeLimits
        from .models import ModelMap
        from .security import ApiKeys, KeyFileError
        from .upstream import Upstream
    except ImportError as exc:
        typer.echo(f'error: aligner serve needs the [serve] extra: pip install "llm-aligner[serve]" ({exc})', err=True)
        raise typer.Exit(2) from exc
    from aligner_core.engine_options import EngineChoice
    from aligner_core.errors import AlignerError

    if aligner_server and aligner:
        raise typer.BadParameter("--aligner names a model to load here; with --aligner-server use --aligner-model")
    if aligner_model and not aligner_server:
        raise typer.BadParameter("--aligner-model applies to --aligner-server; to load a model here use --aligner")
    try:
        keys = ApiKeys.load(api_key or (), api_key_file)
    except KeyFileError as exc:  # one clean line, before anything is loaded
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    if not keys.enabled and not _is_loopback(host):
        logger.warning("serving on %s without API keys: anyone who reaches this address can use the upstream "
                       "model; pass --api-key or --api-key-file", host)
    try:
        limits = ServeLimits(max_body_bytes=max_body_bytes, max_queue=max_queue, max_batch_items=max_batch_items,
                             max_n=max_n, correction_timeout=correction_timeout, include_original=not hide_original,
                             max_upstream_bytes=max_upstream_bytes, read_timeout=read_timeout,
                             shutdown_grace=shutdown_grace)
        up = Upstream(upstream, model=upstream_model, api_key=upstream_api_key, timeout=upstream_timeout,
                      max_response_bytes=max_upstream_bytes)
        names = ModelMap.build(upstream_model=upstream_model, served_model=served_model_name,
                               mappings=model_map or ())
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    logging.getLogger("aligner_serve").setLevel(log_level.upper())
    choice = EngineChoice(model=aligner_model if aligner_server else aligner, server=aligner_server,
                          api_key=aligner_api_key, timeout=correction_timeout, max_concurrency=max(64, max_queue))
    typer.echo(f"loading the Aligner ({choice.where}) ...", err=True)
    try:
        corrector = choice.load(template=template, device=device, dtype=dtype, max_new_tokens=max_new_tokens)
        if inspector is not None:
            from aligner_core.inspector import Inspector

            corrector.inspector, corrector.threshold = Inspector.from_pretrained(inspector, device=device), threshold
    except AlignerError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    app = build_app(corrector, up, api_keys=keys, limits=limits, models=names, correct_structured=correct_structured)
    typer.echo(f"correcting {up.base_url} with {corrector.name} ({corrector.template.name} template) on "
               f"http://{host}:{port}/v1; API keys: {len(keys) or 'none'}", err=True)
    http_server.run(app, host=host, port=port, log_level=log_level.lower())


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
