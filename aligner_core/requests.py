"""From a pair to a generation request: validate, render the prompt, fit it to the model's context.

One path for every entry point (``Aligner.prepare``): the question and answer are checked, the history and the
grounding context normalised, the template rendered (special-token text kept as plain text, see ``plaintext``),
and the prompt fitted to the model's context: the grounding context gives way first (the item farthest from the
question first), then ``on_overflow`` applies to the answer (an error, or the answer cut to fit). Engines that
tokenize on their side get the exact prompt, or the chat messages when a server applies the chat template.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from .context import Context, context_texts, normalize_context
from .engines.base import GenerationParams, GenerationRequest
from .errors import (
    AlignerError,
    ContextOverflowError,
    CorrectionTimeoutError,
    EmptyAnswerError,
    GenerationOptionError,
    InvalidInputError,
    TemplateError,
)
from .history import History, history_texts, normalize_history, render_prompt
from .items import as_sequence, unpack
from .plaintext import encode_plain, holds_special
from .templates import ChatTemplate

logger = logging.getLogger("aligner_core")

OverflowPolicy = Literal["error", "truncate"]
#: A conversation's earlier turns as callers pass them: ``[{"role": ..., "content": ...}, ...]`` or None.
HistoryArg = Sequence[Mapping[str, str]] | None
#: What an answer was grounded on: ``[{"type": "tool_result", "name": ..., "content": ...}, "a document", ...]``.
ContextArg = Sequence[Mapping[str, Any] | str] | str | None

#: Planning assumes a correction is at most about twice the answer (plus room for a short answer).
RESERVE_FACTOR, RESERVE_MIN = 2, 64


@dataclass(frozen=True)
class PreparedRequest:
    """A validated pair and its generation request, with what the request building recorded (``metadata``)."""

    question: str
    answer: str
    request: GenerationRequest
    metadata: dict[str, Any]
    history: History = ()
    context: Context = ()


def prepare_all(
    aligner: Any,
    pairs: Sequence[Any],
    return_exceptions: bool,
    max_new_tokens: int | Sequence[int] | None,
    generation: dict[str, Any],
) -> tuple[list[PreparedRequest | Exception], GenerationParams]:
    """Validate and render every pair; the first problem is raised unless ``return_exceptions``."""
    as_sequence(pairs)
    overflow = generation.pop("on_overflow", None)
    params = aligner.defaults.updated(generation)
    limits = _per_item_limits(max_new_tokens, len(pairs), params.max_new_tokens)
    slots: list[PreparedRequest | Exception] = []
    for i, (pair, limit) in enumerate(zip(pairs, limits)):
        try:
            item = unpack(pair, i)
            slots.append(
                prepare(
                    aligner,
                    item.question,
                    item.answer,
                    params,
                    on_overflow=overflow,
                    max_new_tokens=limit,
                    index=i,
                    history=item.history,
                    context=item.context,
                )
            )
        except AlignerError as exc:
            if not return_exceptions:
                raise
            slots.append(exc)
    return slots, params


def prepare_one(
    aligner: Any,
    question: Any,
    answer: Any,
    generation: dict[str, Any],
    history: HistoryArg = None,
    context: ContextArg = None,
) -> tuple[PreparedRequest, GenerationParams]:
    """One pair's request and the call's generation settings (``on_overflow`` is per call too)."""
    overflow = generation.pop("on_overflow", None)
    params = aligner.defaults.updated(generation)
    return prepare(
        aligner, question, answer, params, on_overflow=overflow, history=history, context=context
    ), params


def prepare(
    aligner: Any,
    question: Any,
    answer: Any,
    params: GenerationParams,
    *,
    on_overflow: OverflowPolicy | None = None,
    max_new_tokens: int | None = None,
    index: int | None = None,
    history: HistoryArg = None,
    context: ContextArg = None,
) -> PreparedRequest:
    """Validate a pair (its history and context) and turn it into a generation request (raises specific errors).

    When the prompt does not fit the model's context, grounding context is dropped first (the item farthest
    from the question first), then ``on_overflow`` applies to the answer.
    """
    where = "" if index is None else f"pair {index}: "
    turns, grounding = _checked(where, question, answer, history, context)
    policy = on_overflow or aligner.on_overflow
    if policy not in ("error", "truncate"):
        raise ValueError(f"on_overflow must be 'error' or 'truncate', got {policy!r}")
    limit = max_new_tokens or params.max_new_tokens
    metadata: dict[str, Any] = {"template": aligner.template.name, "engine": aligner.engine.name}
    if turns:
        metadata["history_turns"] = len(turns)
    user_texts = (*history_texts(turns), *context_texts(grounding))
    if ambiguous := _template_markers_in(aligner.template, question, answer, *user_texts):
        metadata["template_markers_in_text"] = ambiguous
    if not (aligner.engine.tokenizes_locally or policy == "truncate"):
        # The engine counts tokens on its side; an overlong prompt fails there with ContextOverflowError.
        if grounding:
            metadata["context_items"] = len(grounding)
        request = remote_request(aligner, question, answer, limit, turns, grounding)
        return PreparedRequest(question, answer, request, metadata, turns, grounding)
    plain = holds_special_text(aligner, question, answer, *user_texts)
    if plain:
        metadata["special_token_text"] = True  # encoded as plain text, never as control tokens
    prompt, ids = render(aligner, question, answer, plain=plain, history=turns, context=grounding)
    ctx = aligner.engine.context_length
    if grounding:
        kept = grounding
        if ctx is not None and len(ids) + limit > ctx:  # the context is the first to give way
            kept, prompt, ids = fit_context(aligner, question, answer, plain, turns, grounding, ctx - limit)
        bare = len(render(aligner, question, answer, plain=plain, history=turns)[1])
        metadata.update(context_items=len(kept), context_tokens=len(ids) - bare)
        if len(kept) < len(grounding):
            metadata["context_trimmed"] = len(grounding) - len(kept)
        grounding = kept
    answer_ids = encode_answer(aligner, answer, plain)
    cut = None
    if ctx is not None and len(ids) + limit > ctx:
        if policy == "error":
            raise ContextOverflowError(
                f"{where}the prompt is {len(ids)} tokens and max_new_tokens is {limit}, more than the model's "
                f"context of {ctx}: shorten the answer, lower max_new_tokens, or pass on_overflow='truncate'"
            )
        keep, cut, prompt, ids = _cut_answer(
            aligner,
            question,
            answer_ids,
            len(ids),
            limit,
            ctx,
            where,
            plain=plain,
            history=turns,
            context=grounding,
        )
        metadata.update(truncated=True, answer_tokens_kept=keep, answer_tokens=len(answer_ids))
        answer_ids = answer_ids[:keep]
    if not aligner.engine.tokenizes_locally:
        request = remote_request(aligner, question, cut or answer, limit, turns, grounding)
        return PreparedRequest(question, answer, request, metadata, turns, grounding)
    reserve = min(limit, max(RESERVE_MIN, RESERVE_FACTOR * len(answer_ids)))
    request = GenerationRequest(
        prompt=prompt,
        prompt_ids=tuple(ids),
        max_new_tokens=limit,
        reserve=reserve,
        draft_ids=tuple(answer_ids),
        add_special_tokens=aligner.template.add_special_tokens,
        exact_ids=plain,
    )
    return PreparedRequest(
        question=question, answer=answer, request=request, metadata=metadata, history=turns, context=grounding
    )


def _checked(
    where: str, question: Any, answer: Any, history: HistoryArg, context: ContextArg
) -> tuple[History, Context]:
    """The pair's history and context, normalised, after the checks every pair passes (specific errors)."""
    for field_name, value in (("question", question), ("answer", answer)):
        if not isinstance(value, str):
            raise InvalidInputError(f"{where}{field_name} must be a str, got {type(value).__name__}")
        _check_text(where, field_name, value)
    turns = normalize_history(history, where)
    grounding = normalize_context(context, where)
    if not answer.strip():
        raise EmptyAnswerError(f"{where}the answer is empty or whitespace: there is nothing to correct")
    return turns, grounding


def _cut_answer(
    aligner: Any,
    question: str,
    answer_ids: list[int],
    prompt_len: int,
    limit: int,
    ctx: int,
    where: str,
    **render_kw: Any,
) -> tuple[int, str, str, list[int]]:
    """Cut the answer's tail until the prompt and ``limit`` new tokens fit ``ctx``: (tokens kept, the cut answer,
    its prompt and ids)."""
    keep = len(answer_ids) - (prompt_len + limit - ctx)
    if keep < 1:
        raise ContextOverflowError(
            f"{where}even with the answer cut to nothing the prompt and max_new_tokens={limit} exceed the "
            f"context of {ctx} tokens: lower max_new_tokens or shorten the question"
        )
    cut = aligner.engine.decode(answer_ids[:keep])
    prompt, ids = render(aligner, question, cut, **render_kw)
    while len(ids) + limit > ctx and keep > 1:  # re-tokenizing at the seam can add a token
        keep -= 1
        cut = aligner.engine.decode(answer_ids[:keep])
        prompt, ids = render(aligner, question, cut, **render_kw)
    return keep, cut, prompt, ids


def fit_context(
    aligner: Any, question: str, answer: str, plain: bool, turns: History, grounding: Context, budget: int
) -> tuple[Context, str, list[int]]:
    """The longest tail of ``grounding`` whose prompt fits ``budget`` tokens (the items farthest from the
    question go first), found by bisection; the empty context when none fits."""
    low, high = 1, len(grounding)  # drop at least one item, at most all of them
    best: tuple[Context, str, list[int]] | None = None
    while low <= high:
        drop = (low + high) // 2
        kept = grounding[drop:]
        prompt, ids = render(aligner, question, answer, plain=plain, history=turns, context=kept)
        if len(ids) <= budget:
            best, high = (kept, prompt, ids), drop - 1
        else:
            low = drop + 1
    if best is None:
        prompt, ids = render(aligner, question, answer, plain=plain, history=turns)
        return (), prompt, ids
    return best


def holds_special_text(aligner: Any, *texts: str) -> bool:
    """Whether the pair (or its history) holds special-token strings of a tokenizer this side can encode with."""
    tokenizer = getattr(aligner.engine, "tokenizer", None)
    return tokenizer is not None and holds_special(tokenizer, texts)


def encode_answer(aligner: Any, answer: str, plain: bool) -> list[int]:
    if plain:
        return aligner.engine.encode(answer, add_special_tokens=False, split_special_tokens=True)
    return aligner.engine.encode(answer, add_special_tokens=False)


def render(
    aligner: Any,
    question: str,
    answer: str,
    *,
    plain: bool = False,
    history: History = (),
    context: Context = (),
) -> tuple[str, list[int]]:
    """The prompt and its tokens (a chat template left to a server is counted by the server).

    With ``plain``, the user's texts (question, answer, history, context) are encoded as plain text
    (see ``plaintext``).
    """
    if isinstance(aligner.template, ChatTemplate) and aligner.template.tokenizer is None:
        encode_messages = getattr(aligner.engine, "encode_messages", None)
        if encode_messages is None:
            raise TemplateError(
                f"the {aligner.engine.name!r} engine cannot render the chat template without a tokenizer"
            )
        messages = aligner.template.messages(
            question=question, answer=answer, history=history, context=context
        )
        return "", encode_messages(messages)
    prompt = render_prompt(aligner.template, question, answer, history, context)
    special = aligner.template.add_special_tokens
    if plain:
        texts = (question, answer, *history_texts(history), *context_texts(context))
        ids = encode_plain(aligner.engine.encode, prompt, texts, add_special_tokens=special)
        if ids is None:
            raise InvalidInputError(
                f"the {aligner.template.name!r} template rewrote the question or answer, so its special-token text "
                "cannot be kept as plain text: remove the special-token strings from the text"
            )
        return prompt, ids
    return prompt, aligner.engine.encode(prompt, add_special_tokens=special)


def remote_request(
    aligner: Any, question: str, answer: str, limit: int, history: History = (), context: Context = ()
) -> GenerationRequest:
    """A request for an engine that tokenizes on its side: the exact prompt, or chat messages
    when the model's chat template is left to the server."""
    template = aligner.template
    if isinstance(template, ChatTemplate) and template.tokenizer is None:
        messages = template.messages(question=question, answer=answer, history=history, context=context)
        return GenerationRequest(
            prompt="", prompt_ids=(), max_new_tokens=limit, reserve=limit, messages=tuple(messages)
        )
    prompt = render_prompt(template, question, answer, history, context)
    return GenerationRequest(
        prompt=prompt,
        prompt_ids=(),
        max_new_tokens=limit,
        reserve=limit,
        add_special_tokens=template.add_special_tokens,
    )


def _per_item_limits(value: int | Sequence[int] | None, n: int, default: int) -> list[int]:
    if value is None:
        return [default] * n
    if isinstance(value, int) and not isinstance(value, bool):
        items = [value] * n
    elif isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        items = list(value)
        if len(items) != n:
            raise InvalidInputError(f"max_new_tokens has {len(items)} entries for {n} pairs")
    else:
        raise GenerationOptionError(f"max_new_tokens must be an integer >= 1 or one per pair, got {value!r}")
    for v in items:
        GenerationParams(max_new_tokens=v)  # validates
    return items


def _check_text(where: str, field_name: str, value: str) -> None:
    """Text must be valid Unicode: a lone surrogate (a broken ``\\ud800`` escape) cannot be encoded."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidInputError(
            f"{where}{field_name} holds a lone surrogate {value[exc.start]!r} at character {exc.start}: it is not "
            "valid Unicode text (a broken \\uD800-\\uDFFF escape in the input?)"
        ) from None


_WARNED_MARKERS: set[str] = set()


def _template_markers_in(template: Any, *texts: str) -> list[str]:
    """The template's own separators found inside the user's text (the official formats cannot escape them)."""
    markers = getattr(template, "markers", ())
    found = sorted({m for m in markers for text in texts if m in text})
    if found and template.name not in _WARNED_MARKERS:
        _WARNED_MARKERS.add(template.name)
        logger.warning(
            "the text holds the %r template's own separators %s: the format cannot escape them, so the prompt is "
            "ambiguous for the model (kept as is; recorded in Correction.metadata['template_markers_in_text'])",
            template.name,
            found,
        )
    return found


def build(prepared: PreparedRequest, out: Any, *, latency: float | None = None) -> Any:
    """An engine's output as the public ``Correction`` of the pair it was prepared from."""
    from .correction import Correction

    return Correction.build(
        question=prepared.question,
        original=prepared.answer,
        text=out.text,
        prompt_tokens=out.prompt_tokens
        if out.prompt_tokens is not None
        else len(prepared.request.prompt_ids),
        completion_tokens=out.completion_tokens,
        finish_reason=out.finish_reason,
        latency_s=out.latency_s if latency is None else latency,
        metadata={**prepared.metadata, **out.metadata},
    )


def check_timeout(timeout: Any) -> float | None:
    """A call's ``timeout``: None, or a positive number of seconds (``GenerationOptionError`` otherwise)."""
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
        raise GenerationOptionError(f"timeout must be a positive number of seconds or None, got {timeout!r}")
    return float(timeout)


def run_one(aligner: Any, prepared: PreparedRequest, params: GenerationParams, limit: float | None) -> Any:
    """Generate one prepared request and wait at most ``limit`` seconds (then cancel it and raise
    ``CorrectionTimeoutError``, so a caller with a deadline is never held longer)."""
    import time

    start = time.perf_counter()
    future = aligner.engine.submit(prepared.request, params)
    try:
        out = future.result(timeout=limit)
    except TimeoutError as exc:
        if isinstance(exc, AlignerError):  # the engine's own timeout (a server engine), not this call's
            raise
        future.cancel()
        raise CorrectionTimeoutError(f"the correction took longer than timeout={limit:g}s") from exc
    return build(prepared, out, latency=time.perf_counter() - start)


async def arun_one(
    aligner: Any, prepared: PreparedRequest, params: GenerationParams, limit: float | None
) -> Any:
    """Async :func:`run_one`: cancelling the awaiting task (or the deadline) drops the request."""
    import asyncio
    import time

    start = time.perf_counter()
    try:
        out = await asyncio.wait_for(aligner.engine.agenerate(prepared.request, params), limit)
    except TimeoutError as exc:
        if isinstance(exc, AlignerError):
            raise
        raise CorrectionTimeoutError(f"the correction took longer than timeout={limit:g}s") from exc
    return build(prepared, out, latency=time.perf_counter() - start)
