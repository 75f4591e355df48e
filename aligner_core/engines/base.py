"""The seam between the Aligner facade and whatever runs the model: the ``Engine`` protocol.

The facade renders templates, validates input and builds ``Correction`` objects; an engine only
turns prompts into generated text. One module per engine lives beside this one (``local``: the
library's own transformers loop; ``server``: any OpenAI-compatible server; ``vllm``: vLLM
in-process); Ray spreads whole datasets over many Aligners (``ray``). The facade and the
framework adapters never know which engine runs.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field, fields, replace
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from ..correction import FinishReason
from ..errors import GenerationOptionError

if TYPE_CHECKING:
    from ..progress import Progress


@dataclass(frozen=True)
class GenerationParams:
    """Decoding options shared by a call. Greedy unless ``do_sample=True``."""

    max_new_tokens: int = 512
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    #: Draft from the answer and verify in one pass (greedy only; identical output, fewer passes).
    speculative: bool = True
    #: Tokens proposed per step and row before adapting to the acceptance rate.
    num_draft_tokens: int = 8

    def __post_init__(self) -> None:
        # Every option is checked here, on the caller's thread: nothing one request carries may fail
        # later inside a worker, where the error could reach requests batched with it.
        _integer("max_new_tokens", self.max_new_tokens, minimum=1)
        _flag("do_sample", self.do_sample)
        _flag("speculative", self.speculative)
        _number("temperature", self.temperature)
        if self.temperature < 0 or (self.do_sample and self.temperature == 0):
            raise GenerationOptionError(
                f"temperature must be > 0 when sampling, got {self.temperature!r} (greedy decoding ignores it)"
            )
        _number("top_p", self.top_p)
        if not 0 < self.top_p <= 1:
            raise GenerationOptionError(f"top_p must be in (0, 1], got {self.top_p!r}")
        _integer("top_k", self.top_k, minimum=0, note=" (0 disables it)")
        _number("repetition_penalty", self.repetition_penalty)
        if self.repetition_penalty <= 0:
            raise GenerationOptionError(f"repetition_penalty must be > 0, got {self.repetition_penalty!r}")
        _integer("num_draft_tokens", self.num_draft_tokens, minimum=0)
        if self.seed is not None:
            _integer("seed", self.seed, minimum=0, maximum=MAX_SEED)
        if not isinstance(self.stop, tuple) or any(not isinstance(s, str) or not s for s in self.stop):
            raise GenerationOptionError(f"stop must be a list of non-empty strings, got {self.stop!r}")
        for name in ("temperature", "top_p", "repetition_penalty"):  # engines want floats (2 -> 2.0)
            object.__setattr__(self, name, float(getattr(self, name)))

    @property
    def drafting(self) -> bool:
        """Whether answer-anchored drafting applies: it is exact only for plain greedy decoding."""
        return (
            self.speculative
            and self.num_draft_tokens > 0
            and not self.do_sample
            and self.repetition_penalty == 1.0
        )

    def updated(self, options: Mapping[str, Any]) -> GenerationParams:
        """A copy with ``options`` applied; unknown names raise ``GenerationOptionError``."""
        known = {f.name for f in fields(self)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise GenerationOptionError(f"unknown generation option(s) {unknown}; known: {sorted(known)}")
        values = dict(options)
        if "stop" in values:
            stop = values["stop"]
            if stop is None:
                values["stop"] = ()
            elif isinstance(stop, str):
                values["stop"] = (stop,)
            elif isinstance(stop, (list, tuple)):
                values["stop"] = tuple(stop)
            else:
                raise GenerationOptionError(f"stop must be a string or a list of strings, got {stop!r}")
        return replace(self, **values)


#: The largest seed every engine takes (torch and vLLM seed with 64-bit integers).
MAX_SEED = 2**63 - 1


def _flag(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise GenerationOptionError(f"{name} must be True or False, got {value!r}")


def _number(name: str, value: Any) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or value != value
        or value in (float("inf"), float("-inf"))
    ):
        raise GenerationOptionError(f"{name} must be a finite number, got {value!r}")


def _integer(name: str, value: Any, *, minimum: int, maximum: int | None = None, note: str = "") -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, int)
        or value < minimum
        or (maximum is not None and value > maximum)
    ):
        if maximum is not None:
            bound = f"an integer in [{minimum}, {maximum}]"
        else:
            bound = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise GenerationOptionError(f"{name} must be {bound}{note}, got {value!r}")


@dataclass(frozen=True)
class GenerationRequest:
    """One prompt to complete.

    ``prompt_ids`` are empty when the engine tokenizes on its side (a server without a local
    tokenizer); ``reserve`` is the number of new tokens to plan memory for; ``draft_ids`` is the
    text the output is expected to copy from (the answer being corrected); ``add_special_tokens``
    says whether the engine should add the tokenizer's special tokens (BOS) to ``prompt``.
    ``messages`` is set instead of a rendered prompt when a chat template is left to a server.
    """

    prompt: str
    prompt_ids: tuple[int, ...]
    max_new_tokens: int
    reserve: int
    draft_ids: tuple[int, ...] = ()
    add_special_tokens: bool = True
    messages: tuple[Mapping[str, str], ...] | None = None
    #: The prompt must reach the model as ``prompt_ids``: its text would tokenize differently (user text
    #: holding special-token strings, encoded as plain text). A server then gets the ids, not the text.
    exact_ids: bool = False


@dataclass(frozen=True)
class GenerationOutput:
    """What an engine produced for one request. ``prompt_tokens`` is set by engines that count
    the prompt on their side (servers report it in ``usage``)."""

    text: str
    completion_tokens: int
    finish_reason: FinishReason
    latency_s: float
    metadata: Mapping[str, Any] = field(default_factory=dict)
    prompt_tokens: int | None = None


ResultCallback = Callable[[int, "GenerationOutput | BaseException"], None]
#: Receives the whole text generated so far (raw, before the final strip) each time it grows.
TextSink = Callable[[str], None]


@runtime_checkable
class Engine(Protocol):
    """What the Aligner facade needs from an engine.

    Five ways in, one per caller shape: ``generate`` (a batch, blocking), ``submit`` (one request
    from a thread), ``agenerate`` (one request from a coroutine, never blocking the loop), and
    ``stream`` / ``astream`` (one request whose text is handed to ``on_text`` as it grows; the
    sink raises ``StreamCancelled`` to stop generation). A failure is always confined to the
    request that caused it.
    """

    #: Short engine name recorded in ``Correction.metadata["engine"]``: "transformers", "server", "vllm".
    name: str
    #: Longest prompt + completion the model accepts, in tokens (None when unknown).
    context_length: int | None
    #: True when ``encode``/``decode`` are local and cheap, so the facade counts tokens up front.
    tokenizes_locally: bool

    def encode(self, text: str, *, add_special_tokens: bool, split_special_tokens: bool = False) -> list[int]:
        """Token ids of ``text``; ``split_special_tokens`` reads special-token strings as plain text."""
        ...

    def decode(self, token_ids: Sequence[int]) -> str: ...

    def generate(
        self,
        requests: Sequence[GenerationRequest],
        params: GenerationParams,
        *,
        fail_fast: bool = True,
        on_result: ResultCallback | None = None,
        progress: Progress | None = None,
    ) -> list[GenerationOutput | BaseException]:
        """Complete every request; results in request order.

        With ``fail_fast`` the first failure is raised; otherwise the exception takes the failed
        requests' places and the others still complete. ``on_result`` is called as each finishes.
        ``progress`` (optional; engines written before it may lack it) gets generated tokens as
        decoding runs where the engine sees them, and each row with its tokens as it finishes,
        so its totals match the outputs' ``completion_tokens``.
        """
        ...

    def submit(self, request: GenerationRequest, params: GenerationParams) -> Future[GenerationOutput]:
        """Start one request; the future resolves to its output (or its own exception)."""
        ...

    async def agenerate(self, request: GenerationRequest, params: GenerationParams) -> GenerationOutput:
        """Complete one request from a coroutine; concurrent calls share the engine's batching."""
        ...

    def stream(
        self, request: GenerationRequest, params: GenerationParams, on_text: TextSink
    ) -> Future[GenerationOutput]:
        """Start one request that reports its text as it grows; the future holds the final output."""
        ...

    async def astream(
        self, request: GenerationRequest, params: GenerationParams, on_text: TextSink
    ) -> GenerationOutput:
        """Async twin of ``stream``; ``on_text`` may be called from another thread."""
        ...

    def close(self) -> None:
        """Release workers, connections and memory; later calls fail with a clear error."""
        ...
