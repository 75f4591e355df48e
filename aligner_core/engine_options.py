"""The engine options every ``aligner`` command takes, and the one function that builds an Aligner from them.

``--server URL [--model NAME]`` corrects through an OpenAI-compatible server, ``--engine vllm`` loads the
model into vLLM in this process, the default runs the library's transformers engine; ``aligner correct``
also takes ``--ray`` to spread a file over a Ray cluster.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any

import typer

if TYPE_CHECKING:
    from .aligner import Aligner

ENGINES = ("transformers", "vllm")

ModelOpt = Annotated[
    str | None,
    typer.Option("--model", "-m", help="Hub id, local directory or GGUF file; with --server, the served model name "
                 "(default: the packaged SmolLM2-135M-Instruct, or the server's only model)."),
]
ServerOpt = Annotated[
    str | None,
    typer.Option("--server", help="OpenAI-compatible server URL (vLLM, SGLang, TGI, llama.cpp, Ollama), "
                 "e.g. http://127.0.0.1:8000/v1.", rich_help_panel="Engine"),
]
EngineOpt = Annotated[
    str,
    typer.Option("--engine", help="Local engine: transformers or vllm (vLLM in this process).", rich_help_panel="Engine"),
]
ApiKeyOpt = Annotated[
    str | None,
    typer.Option("--api-key", envvar="ALIGNER_API_KEY", help="API key of --server (default: $OPENAI_API_KEY).",
                 rich_help_panel="Engine", show_envvar=False),
]
TimeoutOpt = Annotated[float, typer.Option("--timeout", min=0.001, help="Seconds per --server request.", rich_help_panel="Engine")]
RetriesOpt = Annotated[int, typer.Option("--max-retries", min=0, help="Retries of a failed --server request.", rich_help_panel="Engine")]
ConcurrencyOpt = Annotated[
    int, typer.Option("--max-concurrency", min=1, help="--server requests in flight at once.", rich_help_panel="Engine")
]


@dataclass(frozen=True)
class EngineChoice:
    """Where the Aligner runs, as the command line said."""

    model: str | None = None
    server: str | None = None
    engine: str = "transformers"
    api_key: str | None = None
    timeout: float = 60.0
    max_retries: int = 3
    max_concurrency: int = 64

    def __post_init__(self) -> None:
        if self.engine not in ENGINES:
            raise typer.BadParameter(f"--engine must be one of {', '.join(ENGINES)}, got {self.engine!r}")
        if self.server and self.engine != "transformers":
            raise typer.BadParameter("--server and --engine contradict each other: the server runs the model")

    @property
    def where(self) -> str:
        return f"server {self.server}" if self.server else f"{self.engine} engine"

    def load(
        self,
        *,
        template: str | None = None,
        device: str | None = None,
        dtype: str = "auto",
        max_new_tokens: int = 1024,
        max_batch_tokens: int | None = None,
        on_overflow: str = "error",
    ) -> Aligner:
        """Build the Aligner these options describe (device/dtype/batch tokens apply to local engines)."""
        from .aligner import Aligner
        from .loading import DEFAULT_MODEL

        if self.server:
            return Aligner.from_server(
                self.server, model=self.model, template=template, api_key=self.api_key, timeout=self.timeout,
                max_retries=self.max_retries, max_concurrency=self.max_concurrency, max_new_tokens=max_new_tokens,
                on_overflow=on_overflow,  # type: ignore[arg-type]
            )
        model = self.model or DEFAULT_MODEL
        if self.engine == "vllm":
            extra: dict[str, Any] = {} if dtype == "auto" else {"dtype": dtype}
            return Aligner.from_pretrained(model, template=template, engine="vllm", max_new_tokens=max_new_tokens,
                                           on_overflow=on_overflow, **extra)  # type: ignore[arg-type]
        options: dict[str, Any] = {} if max_batch_tokens is None else {"max_batch_tokens": max_batch_tokens}
        return Aligner.from_pretrained(model, template=template, device=device, dtype=dtype,
                                       max_new_tokens=max_new_tokens, on_overflow=on_overflow,  # type: ignore[arg-type]
                                       **options)


__all__ = ["EngineChoice"]
