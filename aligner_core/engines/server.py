"""The server engine: any OpenAI-compatible endpoint (vLLM, SGLang, TGI, llama.cpp server, Ollama).

The exact rendered template is sent as a raw prompt to ``/v1/completions``, never wrapped in a chat
turn: released Aligner checkpoints need the paper's bytes. Only the ``chat`` template, when no
local tokenizer can render it, goes to ``/v1/chat/completions`` as messages (the server applies the
model's own chat template).

Async-first: ``agenerate``/``astream`` run on the caller's event loop with one ``httpx.AsyncClient``
and one concurrency limit per loop; the sync entry points run the same coroutines on one private
I/O thread. Faults stay with their request: connection errors, timeouts, 429 and 5xx are retried
with exponential backoff (honouring ``Retry-After``) up to ``max_retries``; 4xx fail at once with
the server's own message.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import threading
import time
import weakref
from collections.abc import Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import (
    EngineClosedError,
    ServerError,
    ServerRequestError,
    ServerTimeoutError,
    ServerUnavailableError,
    TemplateError,
    missing,
)
from ..plaintext import encode_text
from ..progress import Progress
from . import server_faults as faults
from .aio import EventLoopThread, gather_in_order, result_or_cancel
from .base import GenerationOutput, GenerationParams, GenerationRequest, ResultCallback, TextSink

logger = logging.getLogger("aligner_core")

_OFFICIAL = re.compile(r"(^|/)aligner[-_]?\d+b[-_]", re.I)


@dataclass
class _LoopState:
    client: Any  # httpx.AsyncClient bound to one event loop
    limit: asyncio.Semaphore


class ServerEngine:
    """Runs the Aligner on an OpenAI-compatible server. See ``Aligner.from_server``."""

    name = "server"

    def __init__(
        self,
        base_url: str,
        *,
        model: str | None = None,
        api_key: str | None = None,
        timeout: float = 60.0,
        max_retries: int = 3,
        max_concurrency: int = 64,
        tokenizer: Any = None,
        extra_body: Mapping[str, Any] | None = None,
        backoff: float = 0.5,
    ) -> None:
        try:
            import httpx
        except ImportError as exc:  # pragma: no cover - httpx comes with the [server] extra
            raise missing("httpx", "server", "Aligner.from_server") from exc
        if not isinstance(base_url, str) or not re.match(r"^https?://[^/]+", base_url):
            raise ValueError(
                f"base_url must be an http(s) URL such as 'http://127.0.0.1:8000/v1', got {base_url!r}"
            )
        if not (isinstance(timeout, (int, float)) and timeout > 0):
            raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
        if not (isinstance(max_retries, int) and max_retries >= 0):
            raise ValueError(f"max_retries must be an integer >= 0, got {max_retries!r}")
        if not (isinstance(max_concurrency, int) and max_concurrency >= 1):
            raise ValueError(f"max_concurrency must be a positive integer, got {max_concurrency!r}")
        url = base_url.rstrip("/")
        self.base_url = url if url.endswith("/v1") else url + "/v1"
        self.root_url = self.base_url[: -len("/v1")]  # vLLM's /tokenize and /health live at the root
        self.timeout = float(timeout)
        self.max_retries = max_retries
        self.max_concurrency = max_concurrency
        self.backoff = backoff
        self.extra_body = dict(extra_body or {})
        key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY")
        self._headers = {"Authorization": f"Bearer {key}"} if key else {}
        self._httpx = httpx
        self._limits = httpx.Limits(
            max_connections=max_concurrency, max_keepalive_connections=max_concurrency
        )
        self._sync = httpx.Client(timeout=self.timeout, headers=self._headers)
        self._states: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _LoopState] = (
            weakref.WeakKeyDictionary()
        )
        self._states_lock = threading.Lock()
        self._io: EventLoopThread | None = None
        self._io_lock = threading.Lock()
        self._closed = False
        self.tokenizer = _load_tokenizer(tokenizer)
        self.tokenizes_locally = self.tokenizer is not None
        self.model_info: dict[str, Any] = {}
        self.model_name = model
        self._discover(required=model is None)

    # -- discovery ----------------------------------------------------------------------------

    def _discover(self, *, required: bool) -> None:
        """Ask ``/v1/models`` for the model and its context; tolerated to fail when ``model`` is given."""
        try:
            resp = self._request_sync("GET", f"{self.base_url}/models", timeout=min(self.timeout, 10.0))
            served = [m for m in resp.json().get("data", []) if isinstance(m, dict)]
        except ServerError:
            if required:
                raise
            logger.warning(
                "could not list the models of %s; going on with model=%r", self.base_url, self.model_name
            )
            return
        names = [str(m.get("id")) for m in served]
        if self.model_name is None:
            if len(served) != 1:
                raise ServerRequestError(
                    f"{self.base_url} serves {len(served)} models ({', '.join(names) or 'none'}): pass model=NAME",
                    url=self.base_url,
                )
            self.model_name = names[0]
        info = next((m for m in served if m.get("id") == self.model_name), None)
        if info is None:
            logger.warning("%s does not list model %r (it serves %s)", self.base_url, self.model_name, names)
        self.model_info = info or {}
        self.served_models = names

    @property
    def context_length(self) -> int | None:
        """``max_model_len`` as vLLM (and SGLang) report it in ``/v1/models``; None when unknown."""
        value = self.model_info.get("max_model_len") or self.model_info.get("context_length")
        return int(value) if isinstance(value, int) and value > 0 else None

    def choose_template(self) -> str:
        """The template the served model expects, from what the server and this machine can tell."""
        names = [self.model_name or "", str(self.model_info.get("root") or "")]
        root = self.model_info.get("root")
        if isinstance(root, str) and Path(root).is_dir():
            from ..loading import read_recorded_template

            recorded = read_recorded_template(root)
            if recorded is not None:
                logger.info("template %r chosen for %s: recorded in %s", recorded, self.model_name, root)
                return recorded
        if any(_OFFICIAL.search(n) for n in names):
            logger.info("template 'aligner-v1' chosen for %s: official Aligner checkpoint", self.model_name)
            return "aligner-v1"
        if self.tokenizer is not None and not getattr(self.tokenizer, "chat_template", None):
            raise TemplateError(
                f"cannot tell which prompt template {self.model_name!r} expects and its tokenizer has no chat "
                "template: pass template='aligner-v1', 'aligner-general' or your own"
            )
        where = "rendered with the local tokenizer" if self.tokenizer is not None else "applied by the server"
        logger.info("template 'chat' chosen for %s (%s; an untrained corrector)", self.model_name, where)
        return "chat"

    # -- tokens -------------------------------------------------------------------------------

    def encode(self, text: str, *, add_special_tokens: bool, split_special_tokens: bool = False) -> list[int]:
        if self.tokenizer is not None:
            return encode_text(
                self.tokenizer,
                text,
                add_special_tokens=add_special_tokens,
                split_special_tokens=split_special_tokens,
            )
        body = {"model": self.model_name, "prompt": text, "add_special_tokens": add_special_tokens}
        return list(self._tokenizer_call("tokenize", body)["tokens"])

    def encode_messages(self, messages: Sequence[Mapping[str, str]]) -> list[int]:
        """Tokens of ``messages`` under the served model's chat template (vLLM's ``/tokenize``)."""
        body = {
            "model": self.model_name,
            "messages": [dict(m) for m in messages],
            "add_generation_prompt": True,
        }
        return list(self._tokenizer_call("tokenize", body)["tokens"])

    def decode(self, token_ids: Sequence[int]) -> str:
        if self.tokenizer is not None:
            return self.tokenizer.decode(list(token_ids), skip_special_tokens=True)
        return str(
            self._tokenizer_call("detokenize", {"model": self.model_name, "tokens": list(token_ids)})[
                "prompt"
            ]
        )

    def _tokenizer_call(self, what: str, body: dict[str, Any]) -> dict[str, Any]:
        try:
            return self._request_sync("POST", f"{self.root_url}/{what}", json=body).json()
        except ServerRequestError as exc:
            raise ServerRequestError(
                f"{self.root_url} cannot {what} ({exc}); only vLLM-style servers can: pass tokenizer=... "
                "(a hub id, directory or tokenizer object) to Aligner.from_server to count tokens locally",
                url=self.root_url,
                status=exc.status,
            ) from exc

    def _request_sync(self, method: str, url: str, **kwargs: Any) -> Any:
        httpx = self._httpx
        for attempt in range(self.max_retries + 1):
            try:
                resp = self._sync.request(method, url, **kwargs)
            except httpx.TimeoutException as exc:
                error: ServerError = faults.timed_out(self, url, exc)
            except httpx.TransportError as exc:
                error = faults.unavailable(self, url, exc)
            else:
                if resp.status_code < 400:
                    return resp
                error = faults.status_error(
                    self, url, resp.status_code, resp.text, retry_after=resp.headers.get("retry-after")
                )
                if not isinstance(error, ServerUnavailableError):
                    raise error
            if attempt == self.max_retries:
                raise error
            time.sleep(faults.delay(self, attempt, error))
        raise AssertionError("unreachable")  # pragma: no cover

    # -- the Engine entry points --------------------------------------------------------------

    def generate(
        self,
        requests: Sequence[GenerationRequest],
        params: GenerationParams,
        *,
        fail_fast: bool = True,
        on_result: ResultCallback | None = None,
        progress: Progress | None = None,
    ) -> list[GenerationOutput | BaseException]:
        """All requests at once, at most ``max_concurrency`` in flight; the server batches them."""
        if not requests:
            return []
        return result_or_cancel(
            self._io_thread().run(
                gather_in_order(
                    requests,
                    lambda r: self.agenerate(r, params),
                    fail_fast=fail_fast,
                    on_result=on_result,
                    progress=progress,
                )
            )
        )

    def submit(self, request: GenerationRequest, params: GenerationParams) -> Future[GenerationOutput]:
        return self._io_thread().run(self.agenerate(request, params))

    async def agenerate(self, request: GenerationRequest, params: GenerationParams) -> GenerationOutput:
        state = self._state()
        async with state.limit:
            return await self._complete(state.client, request, params, None)

    def stream(
        self, request: GenerationRequest, params: GenerationParams, on_text: TextSink
    ) -> Future[GenerationOutput]:
        return self._io_thread().run(self.astream(request, params, on_text))

    async def astream(
        self, request: GenerationRequest, params: GenerationParams, on_text: TextSink
    ) -> GenerationOutput:
        state = self._state()
        async with state.limit:
            return await self._complete(state.client, request, params, on_text)

    def close(self) -> None:
        """Close connections and the I/O thread; later calls raise ``EngineClosedError``."""
        if self._closed:
            return
        self._closed = True
        with self._states_lock:
            states = list(self._states.items())
        for loop, state in states:
            if self._io is not None and loop is self._io.loop:
                continue
            if not loop.is_closed() and loop.is_running():
                asyncio.run_coroutine_threadsafe(state.client.aclose(), loop)
        if self._io is not None:
            io_state = self._states.get(self._io.loop)
            if io_state is not None:
                with contextlib.suppress(Exception):  # best effort: the connections die with the loop anyway
                    self._io.run(io_state.client.aclose()).result(timeout=10)
            self._io.stop(timeout=10)
        self._sync.close()

    def __repr__(self) -> str:
        return f"ServerEngine({self.base_url!r}, model={self.model_name!r})"

    # -- internals ----------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise EngineClosedError(
                f"this Aligner's connection to {self.base_url} is closed: create a new one"
            )

    def _io_thread(self) -> EventLoopThread:
        self._check_open()
        if self._io is None:
            with self._io_lock:
                if self._io is None:
                    self._io = EventLoopThread("aligner-server-io")
        return self._io

    def _state(self) -> _LoopState:
        self._check_open()
        loop = asyncio.get_running_loop()
        with self._states_lock:
            state = self._states.get(loop)
            if state is None:
                client = self._httpx.AsyncClient(
                    timeout=self.timeout, headers=self._headers, limits=self._limits
                )
                state = self._states[loop] = _LoopState(client, asyncio.Semaphore(self.max_concurrency))
        return state

    def _body(
        self, request: GenerationRequest, params: GenerationParams, stream: bool
    ) -> tuple[str, dict[str, Any]]:
        body: dict[str, Any] = {"model": self.model_name, "max_tokens": request.max_new_tokens}
        if request.messages is not None:
            path = "/chat/completions"
            body["messages"] = [dict(m) for m in request.messages]
        else:
            path = "/completions"
            body["prompt"] = (
                list(request.prompt_ids) if request.exact_ids and request.prompt_ids else request.prompt
            )
            if not request.add_special_tokens:
                body["add_special_tokens"] = False  # vLLM: the rendered chat template holds its own BOS
        if params.do_sample:
            body.update(temperature=params.temperature, top_p=params.top_p)
            if params.top_k:
                body["top_k"] = params.top_k
        else:
            body["temperature"] = 0.0
        if params.repetition_penalty != 1.0:
            body["repetition_penalty"] = params.repetition_penalty
        if params.stop:
            body["stop"] = list(params.stop)
        if params.seed is not None:
            body["seed"] = params.seed
        if stream:
            body.update(stream=True, stream_options={"include_usage": True})
        body.update(self.extra_body)
        return self.base_url + path, body

    async def _complete(
        self, client: Any, request: GenerationRequest, params: GenerationParams, on_text: TextSink | None
    ) -> GenerationOutput:
        url, body = self._body(request, params, stream=on_text is not None)
        httpx = self._httpx
        start = time.perf_counter()
        for attempt in range(self.max_retries + 1):
            progress = _Progress()
            try:
                if on_text is None:
                    resp = await client.post(url, json=body)
                    if resp.status_code >= 400:
                        error: ServerError = faults.status_error(
                            self,
                            url,
                            resp.status_code,
                            resp.text,
                            retry_after=resp.headers.get("retry-after"),
                        )
                    else:
                        return self._parse(resp.json(), request, start)
                else:
                    async with client.stream("POST", url, json=body) as resp:
                        if resp.status_code >= 400:
                            text = (await resp.aread()).decode("utf-8", "replace")
                            error = faults.status_error(
                                self, url, resp.status_code, text, retry_after=resp.headers.get("retry-after")
                            )
                        else:
                            return await self._read_events(resp, request, start, on_text, progress)
            except httpx.TimeoutException as exc:
                error = faults.timed_out(self, url, exc)
            except httpx.TransportError as exc:
                error = faults.unavailable(self, url, exc)
            if not isinstance(error, (ServerUnavailableError, ServerTimeoutError)):
                raise error
            if attempt == self.max_retries or progress.emitted:  # text already streamed cannot be taken back
                raise error
            await asyncio.sleep(faults.delay(self, attempt, error))
        raise AssertionError("unreachable")  # pragma: no cover

    def _parse(self, data: dict[str, Any], request: GenerationRequest, start: float) -> GenerationOutput:
        choice = (data.get("choices") or [{}])[0]
        text = choice.get("text")
        if text is None:
            text = (choice.get("message") or {}).get("content") or ""
        usage = data.get("usage") or {}
        return _output(text, choice.get("finish_reason"), usage, start, fallback_tokens=None)

    async def _read_events(
        self, resp: Any, request: GenerationRequest, start: float, on_text: TextSink, progress: _Progress
    ) -> GenerationOutput:
        text, finish, usage, chunks = "", None, {}, 0
        async for line in resp.aiter_lines():
            if not line.startswith("data:"):
                continue
            payload = line[5:].strip()
            if payload == "[DONE]":
                break
            event = json.loads(payload)
            if "error" in event:  # vLLM reports failures after a 200 inside the stream
                err = event["error"]
                message = err.get("message", err) if isinstance(err, dict) else err
                code = err.get("code") if isinstance(err, dict) else None
                kind = ServerUnavailableError if isinstance(code, int) and code >= 500 else ServerRequestError
                raise kind(
                    f"{resp.url} failed the stream ({code}): {message}", url=str(resp.url), status=code
                )
            if event.get("usage"):
                usage = event["usage"]
            for choice in event.get("choices") or []:
                piece = choice.get("text")
                if piece is None:
                    piece = (choice.get("delta") or {}).get("content")
                if piece:
                    text += piece
                    chunks += 1
                    progress.emitted = True
                    on_text(text)
                if choice.get("finish_reason"):
                    finish = choice["finish_reason"]
        return _output(text, finish, usage, start, fallback_tokens=chunks)


class _Progress:
    emitted = False


def _output(
    text: str, finish: Any, usage: Mapping[str, Any], start: float, *, fallback_tokens: int | None
) -> GenerationOutput:
    completion = usage.get("completion_tokens")
    if not isinstance(completion, int):
        completion = fallback_tokens or 0
    prompt = usage.get("prompt_tokens")
    metadata = {} if finish in ("stop", "length", None) else {"server_finish_reason": finish}
    return GenerationOutput(
        text=text.strip(),
        completion_tokens=completion,
        finish_reason="length" if finish == "length" else "stop",
        latency_s=time.perf_counter() - start,
        metadata=metadata,
        prompt_tokens=prompt if isinstance(prompt, int) else None,
    )


def _load_tokenizer(tokenizer: Any) -> Any:
    """A tokenizer object as given, or one loaded from a hub id or directory (transformers)."""
    if not isinstance(tokenizer, (str, os.PathLike)):
        return tokenizer
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(os.fspath(tokenizer))


__all__ = ["ServerEngine"]
