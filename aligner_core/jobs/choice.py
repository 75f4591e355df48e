"""Where an Aligner runs, as a command line or a job describes it, and the one function that builds it.

A server (``server``, with ``model`` its served name) corrects over HTTP; otherwise ``model`` (default: the packaged
SmolLM2) loads into this process on the ``engine`` named: ``auto`` (llama.cpp for a GGUF on a machine without an
accelerator when llama-cpp-python is installed, else transformers: ``engines.choosing``), ``transformers``,
``llama.cpp`` (alias ``llamacpp``) or ``vllm``. File jobs,
Ray replicas and every ``aligner`` command build their Aligner through :meth:`EngineChoice.load`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..aligner import Aligner

ENGINES = ("auto", "transformers", "llama.cpp", "llamacpp", "vllm")
#: Engines that run the model in this process beside a --server (none: the server runs it).
_NOT_WITH_SERVER = ("llama.cpp", "llamacpp", "vllm")


@dataclass(frozen=True)
class EngineChoice:
    """Where the Aligner runs, as the command line said."""

    model: str | None = None
    server: str | None = None
    engine: str = "auto"
    api_key: str | None = None
    timeout: float = 60.0
    max_retries: int = 3
    max_concurrency: int = 64

    def __post_init__(self) -> None:
        if self.engine not in ENGINES:
            raise ValueError(f"--engine must be one of {', '.join(ENGINES)}, got {self.engine!r}")
        if self.server and self.engine in _NOT_WITH_SERVER:
            raise ValueError("--server and --engine contradict each other: the server runs the model")

    @property
    def where(self) -> str:
        if self.server:
            return f"server {self.server}"
        return "local engine (auto)" if self.engine == "auto" else f"{self.engine} engine"

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
        from ..aligner import Aligner
        from ..loading import DEFAULT_MODEL

        if self.server:
            return Aligner.from_server(
                self.server,
                model=self.model,
                template=template,
                api_key=self.api_key,
                timeout=self.timeout,
                max_retries=self.max_retries,
                max_concurrency=self.max_concurrency,
                max_new_tokens=max_new_tokens,
                on_overflow=on_overflow,  # type: ignore[arg-type]
            )
        model = self.model or DEFAULT_MODEL
        if self.engine == "vllm":
            extra: dict[str, Any] = {} if dtype == "auto" else {"dtype": dtype}
            return Aligner.from_pretrained(
                model,
                template=template,
                engine="vllm",
                max_new_tokens=max_new_tokens,
                on_overflow=on_overflow,
                **extra,
            )  # type: ignore[arg-type]
        options: dict[str, Any] = {} if max_batch_tokens is None else {"max_batch_tokens": max_batch_tokens}
        return Aligner.from_pretrained(
            model,
            template=template,
            engine=self.engine,  # type: ignore[arg-type]
            device=device,
            dtype=dtype,
            max_new_tokens=max_new_tokens,
            on_overflow=on_overflow,  # type: ignore[arg-type]
            **options,
        )


__all__ = ["ENGINES", "EngineChoice"]
