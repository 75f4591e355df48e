"""LLM-as-judge over any LangChain chat model: one rubric per dimension, both A/B orders."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from typing import Any

from ..errors import missing
from .judges import Comparison, Outcome, Verdict, combine_orders
from .rubrics import RETRY_PROMPT, RUBRICS, Preference, format_prompt, parse_verdict

logger = logging.getLogger("aligner_core")

#: The correction is shown as answer B first, then as answer A; the two votes cancel position bias.
_ORDER_OUTCOME: tuple[dict[Preference, Outcome], dict[Preference, Outcome]] = (
    {"B": "win", "A": "loss", "tie": "tie"},
    {"A": "win", "B": "loss", "tie": "tie"},
)


def _text(message: Any) -> str:
    content = getattr(message, "content", message)
    if isinstance(content, str):
        return content
    parts = []
    for part in content or ():
        if isinstance(part, str):
            parts.append(part)
        elif isinstance(part, Mapping) and part.get("type") == "text":
            parts.append(str(part.get("text", "")))
    return "".join(parts)


class LLMJudge:
    """Judge corrections pairwise with a chat model (GPT-4-class API or a local model).

    For each dimension the model reads that dimension's rubric, the question and the two answers
    and names the better one. With ``both_orders`` (the default) every pair is judged twice, the
    correction shown second and then first, and the votes are merged by :func:`combine_orders`. A
    reply without a readable verdict is asked again ``max_retries`` times, then recorded as
    ``invalid``. ``max_concurrency`` calls run at once (API judges); errors of the model itself raise.
    """

    def __init__(
        self,
        chat_model: Any,
        *,
        dimensions: Sequence[str] | None = None,
        rubrics: Mapping[str, str] | None = None,
        both_orders: bool = True,
        max_retries: int = 1,
        max_concurrency: int = 4,
        name: str | None = None,
    ) -> None:
        try:
            import langchain_core.messages  # noqa: F401
        except ImportError as exc:
            raise missing("langchain-core", "eval", feature="the LLM judge") from exc
        if not hasattr(chat_model, "invoke"):
            raise TypeError(
                f"chat_model must be a LangChain chat model (with .invoke), got {type(chat_model).__name__}"
            )
        if max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {max_retries}")
        if max_concurrency < 1:
            raise ValueError(f"max_concurrency must be a positive integer, got {max_concurrency}")
        self.rubrics = {**RUBRICS, **(rubrics or {})}
        chosen = tuple(dimensions) if dimensions is not None else tuple(rubrics or RUBRICS)
        unknown = [d for d in chosen if d not in self.rubrics]
        if unknown or not chosen:
            raise ValueError(
                f"no rubric for dimension(s) {unknown or chosen}: known {sorted(self.rubrics)}; pass rubrics={{name: text}}"
            )
        self.chat_model = chat_model
        self.dimensions = chosen
        self.both_orders = both_orders
        self.max_retries = max_retries
        self.max_concurrency = max_concurrency
        self.name = name or str(
            getattr(chat_model, "model_name", None)
            or getattr(chat_model, "model", None)
            or type(chat_model).__name__
        )

    def __repr__(self) -> str:
        return f"LLMJudge(name={self.name!r}, dimensions={self.dimensions})"

    def ask(
        self, dimension: str, question: str, answer_a: str, answer_b: str
    ) -> tuple[Preference | None, list[str]]:
        """One A/B comparison: the parsed preference (``None`` if unreadable after retries) and the raw replies."""
        from langchain_core.messages import AIMessage, HumanMessage, SystemMessage

        system, user = format_prompt(dimension, self.rubrics[dimension], question, answer_a, answer_b)
        messages: list[Any] = [SystemMessage(system), HumanMessage(user)]
        replies: list[str] = []
        for attempt in range(self.max_retries + 1):
            reply = _text(self.chat_model.invoke(messages))
            replies.append(reply)
            preference = parse_verdict(reply)
            if preference is not None:
                return preference, replies
            if attempt < self.max_retries:
                messages += [AIMessage(reply), HumanMessage(RETRY_PROMPT)]
        logger.info("no verdict in the judge's reply on %s: %r", dimension, replies[-1][:200])
        return None, replies

    def _one(self, item: Comparison, dimension: str, order: int) -> tuple[Outcome, list[str]]:
        a, b = (item.original, item.correction) if order == 0 else (item.correction, item.original)
        preference, replies = self.ask(dimension, item.question, a, b)
        return ("invalid" if preference is None else _ORDER_OUTCOME[order][preference]), replies

    def judge(self, question: str, original: str, correction: str) -> dict[str, Verdict]:
        """Judge one correction on every dimension."""
        return self.judge_batch([Comparison(question, original, correction)])[0]

    def judge_batch(
        self, items: Sequence[Comparison], *, on_result: Callable[[int], None] | None = None
    ) -> list[dict[str, Verdict]]:
        """Judge every item on every dimension, ``max_concurrency`` model calls at a time."""
        orders = (0, 1) if self.both_orders else (0,)
        tasks = [(i, d, o) for i in range(len(items)) for d in self.dimensions for o in orders]
        results: dict[tuple[int, str, int], tuple[Outcome, list[str]]] = {}
        left = [len(self.dimensions) * len(orders)] * len(items)
        lock = threading.Lock()

        def run(task: tuple[int, str, int]) -> None:
            i, d, o = task
            results[task] = self._one(items[i], d, o)
            with lock:
                left[i] -= 1
                done = left[i] == 0
            if done and on_result is not None:
                on_result(i)

        if self.max_concurrency == 1 or len(tasks) <= 1:
            for task in tasks:
                run(task)
        else:
            pool = ThreadPoolExecutor(max_workers=self.max_concurrency, thread_name_prefix="llm-judge")
            try:
                futures = [pool.submit(run, t) for t in tasks]
                wait(futures, return_when=FIRST_EXCEPTION)
                for f in futures:
                    if f.done() and f.exception() is not None:
                        raise f.exception()  # type: ignore[misc]
                for f in futures:
                    f.result()
            finally:
                pool.shutdown(wait=True, cancel_futures=True)
        out: list[dict[str, Verdict]] = []
        for i in range(len(items)):
            verdicts = {}
            for d in self.dimensions:
                per_order = [results[(i, d, o)] for o in orders]
                outcomes = tuple(r[0] for r in per_order)
                raw = tuple(r[1][-1] for r in per_order)  # the reply each order's outcome was read from
                attempts = [len(r[1]) for r in per_order]
                verdicts[d] = Verdict(
                    outcome=combine_orders(outcomes), orders=outcomes, raw=raw, extra={"attempts": attempts}
                )
            out.append(verdicts)
        return out


__all__ = ["LLMJudge"]
