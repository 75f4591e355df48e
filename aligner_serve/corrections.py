"""``POST /v1/corrections``: correct answers the client already has.

``{question, answer[, history][, context][, max_new_tokens]}`` -> one ``Correction`` as JSON;
``{"items": [...]}`` -> ``{"items": [...]}`` in order, each item succeeding or failing on its own: a malformed
item is that item's 400, never the batch's. Without ``max_new_tokens`` each correction gets room to restate its
answer (``budget``).

The request's mode (the key's policy, or ``x-aligner-mode`` / ``"aligner": {"mode": ...}`` where the key allows
choosing) holds here too, for the whole request: ``off`` returns each answer unchanged (``skipped: "disabled"``),
``inspect`` each answer unchanged with the inspector's verdict (``skipped: "inspect_only"``, ``metadata.inspector_*``),
in the same ``Correction`` shape, so a client reads every mode alike.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

from starlette.responses import JSONResponse, Response

from aligner_core import Correction
from aligner_core.context import Context, normalize_context
from aligner_core.errors import AlignerError, EmptyAnswerError, InvalidInputError

from . import inspection, tracing
from . import openai_schema as oa
from .bad_request import RequestShapeError
from .config import Mode
from .errors import aligner_status, json_error
from .options import read_options
from .outcome_headers import ChoiceOutcome, outcome_headers
from .policy import Caller
from .proxy import CorrectionProxy, grounding

Pair = tuple[str, str, list[dict[str, str]], Context]


class Corrections:
    """The endpoint, bound to one proxy."""

    def __init__(self, proxy: CorrectionProxy) -> None:
        self.proxy = proxy

    async def __call__(self, body: Any, caller: Caller | None = None) -> Response:
        if not isinstance(body, dict):
            return json_error(400, "the body must be a JSON object", type="invalid_request_error")
        try:
            asked = read_options(body, ("mode",)).mode
        except RequestShapeError as exc:
            return json_error(400, str(exc), type="invalid_request_error", param=exc.param)
        mode = (caller or Caller()).mode(asked, inspector=self.proxy.inspects)  # PolicyError: 403/400
        tracing.annotate({"aligner.mode": mode})
        limit = body.get("max_new_tokens")
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
            return json_error(
                400,
                f"'max_new_tokens' must be a positive integer, got {limit!r}",
                type="invalid_request_error",
                param="max_new_tokens",
            )
        if "items" not in body:
            return await self._one(body, limit, mode)
        items = body["items"]
        if not isinstance(items, list) or not items:
            return json_error(
                400,
                "'items' must be a non-empty list of {question, answer} objects",
                type="invalid_request_error",
                param="items",
            )
        most = self.proxy.limits.batch_items
        if len(items) > most:
            return json_error(
                413,
                f"{len(items)} items is over the limit of {most} per request (--max-batch-items): "
                "split the batch",
                type="invalid_request_error",
                code="too_many_items",
            )
        return JSONResponse(
            {"object": "list", "items": await self._batch(items, limit, mode)},
            headers=outcome_headers(mode, None),
        )

    async def _one(self, body: Mapping[str, Any], limit: int | None, mode: Mode) -> Response:
        try:
            question, answer, history, context = read_pair(body, "")
        except RequestShapeError as exc:
            return json_error(400, str(exc), type="invalid_request_error", param=exc.param)
        with self.proxy.slot():
            if mode == "correct":
                correction = await self.proxy.correct(
                    question, answer, history, context, max_new_tokens=limit
                )
            else:
                (result,) = await self._unchanged([(question, answer, history, context)], mode)
                if isinstance(result, BaseException):
                    raise result
                correction = result
        out = correction_json(correction)
        return JSONResponse(out, headers=outcome_headers(mode, [ChoiceOutcome.of(out)]))

    async def _batch(self, items: list[Any], limit: int | None, mode: Mode) -> list[dict[str, Any]]:
        """Every item's result in order: a correction, or that item's own error with its status."""
        results: list[dict[str, Any] | None] = [None] * len(items)
        pairs: dict[int, Pair] = {}
        for i, item in enumerate(items):
            try:
                pairs[i] = read_pair(item, f"items[{i}].")
            except RequestShapeError as exc:
                results[i] = {
                    **oa.error_body(str(exc), type="invalid_request_error", param=exc.param),
                    "status": 400,
                }
        if pairs:
            with self.proxy.slot(len(pairs)):
                if mode == "correct":
                    outputs = await self._corrected(pairs, limit)
                else:
                    outputs = dict(zip(pairs, await self._unchanged(list(pairs.values()), mode)))
            for i, out in outputs.items():
                if isinstance(out, Correction):
                    if mode == "correct":
                        self.proxy.metrics.record_correction(out)
                    results[i] = correction_json(out)
                else:
                    results[i] = self._failure(out)
        return [r for r in results if r is not None]

    async def _corrected(
        self, pairs: dict[int, Pair], limit: int | None
    ) -> dict[int, Correction | BaseException]:
        """Each pair's correction (one batch, each with room to restate its answer unless ``limit``), or the error
        that stopped it."""
        limits = await asyncio.gather(
            *(self._limit(p[1], limit) for p in pairs.values()), return_exceptions=True
        )
        out: dict[int, Correction | BaseException] = {
            i: n for i, n in zip(pairs, limits) if not isinstance(n, int)
        }
        ready = {i: (pairs[i], n) for i, n in zip(pairs, limits) if isinstance(n, int)}
        if ready:
            done = await asyncio.wait_for(
                self.proxy.aligner.acorrect_batch(
                    [{"question": q, "answer": a, **grounding(h, c)} for (q, a, h, c), _ in ready.values()],
                    return_exceptions=True,
                    max_new_tokens=[n for _, n in ready.values()],
                ),
                self.proxy.limits.correction_timeout,
            )
            out.update(zip(ready, done))
        return out

    async def _unchanged(self, pairs: list[Pair], mode: Mode) -> list[Correction | AlignerError]:
        """``off``: each answer as it is; ``inspect``: each answer with the inspector's verdict (an empty answer is
        that item's 400, as a correction of it would be)."""
        results: list[Correction | AlignerError] = []
        if mode == "off":
            results = [inspection.disabled_correction(q, a) for q, a, _, _ in pairs]
        else:
            scored = [(q, a, c) for q, a, _, c in pairs if a.strip()]
            verdicts = iter(await self.proxy.verdicts(scored))
            for q, a, _, _ in pairs:
                results.append(
                    inspection.inspected_correction(q, a, next(verdicts))
                    if a.strip()
                    else EmptyAnswerError(
                        "the answer is empty or whitespace only: there is nothing to inspect"
                    )
                )
        for result in results:
            if isinstance(result, Correction):
                self.proxy.metrics.skipped.labels(reason=str(result.metadata.get("skipped"))).inc()
        return results

    async def _limit(self, answer: str, asked: int | None) -> int:
        return asked if asked is not None else await self.proxy.budget.limit(answer)

    @staticmethod
    def _failure(exc: BaseException) -> dict[str, Any]:
        """An item's error as its own result; anything but an Aligner error fails the request."""
        if not isinstance(exc, AlignerError):
            raise exc
        status, kind, code = aligner_status(exc)
        return {**oa.error_body(str(exc), type=kind, code=code), "status": status}


def read_pair(item: Any, where: str) -> Pair:
    """``(question, answer, history, context)`` of a corrections item; ``RequestShapeError`` says what is wrong."""
    if not isinstance(item, dict):
        raise RequestShapeError(
            f"{where.rstrip('.') or 'the body'} must be an object with 'question' and 'answer'",
            param=where.rstrip(".") or None,
        )
    for key in ("question", "answer"):
        if not isinstance(item.get(key), str):
            raise RequestShapeError(f"'{where}{key}' must be a string", param=f"{where}{key}")
    history = item.get("history", item.get("chat_history")) or []
    if not isinstance(history, list):
        raise RequestShapeError(
            f"'{where}history' must be a list of {{role, content}} turns", param=f"{where}history"
        )
    try:
        context = normalize_context(item.get("context"), where)
    except InvalidInputError as exc:
        raise RequestShapeError(str(exc), param=f"{where}context") from None
    return item["question"], item["answer"], history, context


def correction_json(correction: Correction) -> dict[str, Any]:
    return {"object": "correction", **correction.to_dict(), "template": correction.metadata.get("template")}


__all__ = ["Corrections", "correction_json", "read_pair"]
