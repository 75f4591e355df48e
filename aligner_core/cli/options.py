"""The engine options every ``aligner`` command takes (``aligner_core.jobs.choice`` builds the Aligner from them).

``--server URL [--model NAME]`` corrects through an OpenAI-compatible server, ``--engine vllm`` loads the
model into vLLM in this process, ``--engine llama.cpp`` runs a GGUF on llama.cpp, ``--engine transformers`` on the
library's transformers engine; the default (``auto``) picks llama.cpp for a GGUF on a machine without an
accelerator when llama-cpp-python is installed, else transformers (``engines.choosing``); ``aligner correct``
also takes ``--ray`` to spread a file over a Ray cluster.
"""

from __future__ import annotations

from typing import Annotated, Any

import typer

from ..jobs.choice import EngineChoice

ModelOpt = Annotated[
    str | None,
    typer.Option(
        "--model",
        "-m",
        help="Hub id, local directory or GGUF file; with --server, the served model name "
        "(default: the packaged SmolLM2-135M-Instruct, or the server's only model).",
    ),
]
ServerOpt = Annotated[
    str | None,
    typer.Option(
        "--server",
        help="OpenAI-compatible server URL (vLLM, SGLang, TGI, llama.cpp, Ollama), "
        "e.g. http://127.0.0.1:8000/v1.",
        rich_help_panel="Engine",
    ),
]
EngineOpt = Annotated[
    str,
    typer.Option(
        "--engine",
        help="Local engine: auto (llama.cpp for a GGUF on a CPU-only machine when "
        "installed, else transformers), transformers, llama.cpp or vllm.",
        rich_help_panel="Engine",
    ),
]
ApiKeyOpt = Annotated[
    str | None,
    typer.Option(
        "--api-key",
        envvar="ALIGNER_API_KEY",
        help="API key of --server (default: $OPENAI_API_KEY).",
        rich_help_panel="Engine",
        show_envvar=False,
    ),
]
TimeoutOpt = Annotated[
    float,
    typer.Option("--timeout", min=0.001, help="Seconds per --server request.", rich_help_panel="Engine"),
]
RetriesOpt = Annotated[
    int,
    typer.Option(
        "--max-retries", min=0, help="Retries of a failed --server request.", rich_help_panel="Engine"
    ),
]
ConcurrencyOpt = Annotated[
    int,
    typer.Option(
        "--max-concurrency", min=1, help="--server requests in flight at once.", rich_help_panel="Engine"
    ),
]


def engine_choice(**options: Any) -> EngineChoice:
    """An ``EngineChoice`` from command-line options; contradictory ones are a usage error, not a traceback."""
    try:
        return EngineChoice(**options)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None


__all__ = ["EngineChoice", "engine_choice"]
