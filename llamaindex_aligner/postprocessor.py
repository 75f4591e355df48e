"""AlignerNodePostprocessor: correct retrieved node texts, with the query as the question, before synthesis."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

from aligner_core import Aligner, Correction, GenerationOptionError
from aligner_core.decision import Reply, decide
from aligner_core.errors import missing
from aligner_core.inspector import Inspector

try:
    from llama_index.core.bridge.pydantic import ConfigDict, Field, PrivateAttr
    from llama_index.core.instrumentation import get_dispatcher
    from llama_index.core.postprocessor.types import BaseNodePostprocessor
    from llama_index.core.schema import MetadataMode, NodeWithScore, QueryBundle
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    raise missing("llama-index-core", "llamaindex", feature="llamaindex_aligner") from exc

from ._common import OnError, aligner_spec, check_options, describe, load_aligner, scorer, verdict
from ._grounding import node_documents
from .events import AlignerEndEvent, AlignerStartEvent
from .llm_events import LLMCall, start_call

dispatcher = get_dispatcher(__name__)
logger = logging.getLogger("llamaindex_aligner")

#: ``node.metadata`` key under which a corrected node keeps its text from before the correction.
ORIGINAL_TEXT_KEY = "aligner_original_text"

#: ``node.metadata`` keys of the inspector's verdict on a node it scored (hidden from the LLM and embeddings).
SCORE_KEY, PASSED_KEY = "aligner_inspector_score", "aligner_inspector_passed"

COMPONENT = "node_postprocessor"


class AlignerNodePostprocessor(BaseNodePostprocessor):
    """Rewrites each retrieved node's text with an Aligner, the query being the question.

    All selected nodes of one query go to the Aligner in one batched call, each with the other selected nodes
    as its context (what it is read beside; the Aligner keeps them consistent). Node ids, scores,
    relationships and metadata are kept; nodes are copied, never edited in place (the index's own
    nodes stay as they are). The text before the correction is kept in ``node.metadata`` under
    ``metadata_key`` (default ``"aligner_original_text"``), excluded from the LLM and embedding
    metadata so it does not leak into prompts. Nodes without text (images) pass through, and so
    does a node whose correction comes back empty.

    With an ``inspector`` (an ``aligner_core.inspector.Inspector`` or a ``(question, text) -> score``
    callable, 1 meaning aligned), the core scores the selected nodes first and only those scoring below
    ``threshold`` are rewritten; every scored node records its verdict in hidden metadata
    (``aligner_inspector_score``, ``aligner_inspector_passed``). The first release's gate, a callable
    returning ``True`` for "needs correcting", still works (deprecated).
    """

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)

    top_n: int | None = Field(
        default=None,
        ge=1,
        description="Correct only the top_n highest-scoring text nodes (the others pass through); None corrects all.",
    )
    inspector: Any = Field(
        default=None,
        exclude=True,
        description="Optional gate: an Inspector or inspector(question, text) -> score in [0, 1] (1: aligned); "
        "nodes scoring at or above threshold pass unchanged.",
    )
    threshold: float | None = Field(
        default=None, ge=0.0, le=1.0, description="The inspector's pass mark; None: the Aligner's."
    )
    on_error: OnError = Field(
        default="raise",
        description="'raise' propagates Aligner failures; 'passthrough' keeps the failed nodes unchanged.",
    )
    metadata_key: str = Field(
        default=ORIGINAL_TEXT_KEY, min_length=1, description="node.metadata key that keeps the original text."
    )
    generation_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="Generation options for the Aligner (max_new_tokens, stop, ...)."
    )

    _aligner: Aligner = PrivateAttr()
    _inspector: Inspector | None = PrivateAttr(default=None)

    def __init__(self, aligner: Aligner, *, top_k: int | None = None, **kwargs: Any) -> None:
        if not isinstance(aligner, Aligner):
            raise TypeError(f"aligner must be an aligner_core.Aligner, got {type(aligner).__name__}")
        if top_k is not None:  # the first release's name; rerank postprocessors call it top_n
            if kwargs.get("top_n") not in (None, top_k):
                raise ValueError(f"top_k is an alias of top_n: got top_n={kwargs['top_n']!r} and top_k={top_k!r}")
            kwargs["top_n"] = top_k
        super().__init__(**kwargs)
        check_options(aligner, self.generation_kwargs)
        self._aligner = aligner
        self._inspector = None if self.inspector is None else scorer(self.inspector)

    @classmethod
    def class_name(cls) -> str:
        return "AlignerNodePostprocessor"

    @property
    def aligner(self) -> Aligner:
        """The Aligner that corrects the nodes."""
        return self._aligner

    @property
    def top_k(self) -> int | None:
        """Alias of ``top_n``."""
        return self.top_n

    # -- serialization: the Aligner is a live model, recorded by name ---------------------------

    def to_dict(self, **kwargs: Any) -> dict[str, Any]:
        """The settings, plus ``"aligner"``: the Aligner's model, template and engine (not its weights)."""
        return {**super().to_dict(**kwargs), "aligner": aligner_spec(self._aligner)}

    @classmethod
    def from_dict(cls, data: dict[str, Any], aligner: Aligner | None = None, **kwargs: Any) -> AlignerNodePostprocessor:
        """Rebuild from :meth:`to_dict`. Pass ``aligner=`` to reuse a loaded one; without it the recorded
        model is loaded with ``Aligner.from_pretrained`` (a hub id or the packaged SmolLM2 reloads; an
        Aligner built from objects or a server cannot, and a ``ValueError`` says so)."""
        data = {**data, **kwargs}
        data.pop("class_name", None)
        spec = data.pop("aligner", None)
        return cls(aligner=aligner if aligner is not None else load_aligner(spec, cls.class_name()), **data)

    # -- the LlamaIndex hooks ----------------------------------------------------------------

    @dispatcher.span
    def _postprocess_nodes(
        self, nodes: list[NodeWithScore], query_bundle: QueryBundle | None = None
    ) -> list[NodeWithScore]:
        if not nodes:
            return []
        query, selected, start = self._begin(nodes, query_bundle)
        if not selected:
            return self._finish(nodes, selected, [], start)
        try:
            results = self._aligner.correct_batch(_pairs(query, nodes, selected), return_exceptions=self._passthrough, **self._options)
        except Exception as exc:
            return self._failed(nodes, selected, exc, start)
        return self._finish(nodes, selected, results, start)

    @dispatcher.span
    async def _apostprocess_nodes(
        self, nodes: list[NodeWithScore], query_bundle: QueryBundle | None = None
    ) -> list[NodeWithScore]:
        if not nodes:
            return []
        query, selected, start = self._begin(nodes, query_bundle)
        if not selected:
            return self._finish(nodes, selected, [], start)
        try:
            results = await self._aligner.acorrect_batch(_pairs(query, nodes, selected), return_exceptions=self._passthrough, **self._options)
        except Exception as exc:
            return self._failed(nodes, selected, exc, start)
        return self._finish(nodes, selected, results, start)

    # -- shared steps ------------------------------------------------------------------------

    @property
    def _passthrough(self) -> bool:
        return self.on_error == "passthrough"

    @property
    def _options(self) -> dict[str, Any]:
        gate = {"inspector": self._inspector, "threshold": self.threshold}  # only those set: the Aligner's own stay
        return {**self.generation_kwargs, **{k: v for k, v in gate.items() if v is not None}}

    def _begin(self, nodes: Sequence[NodeWithScore], query_bundle: QueryBundle | None) -> tuple[str, list[int], _Pass]:
        """Pick the nodes to correct and report the start of the pass (and of each node's generation)."""
        if query_bundle is None:
            raise ValueError("AlignerNodePostprocessor needs the query as the question: pass query_bundle or query_str")
        query = query_bundle.query_str
        selected = [i for i, n in enumerate(nodes) if decide(Reply(content=_text(n))).corrects]
        if self.top_n is not None and len(selected) > self.top_n:
            best = sorted(selected, key=lambda i: (nodes[i].score is None, -(nodes[i].score or 0.0)))[: self.top_n]
            selected = sorted(best)
        dispatcher.event(
            AlignerStartEvent(component=COMPONENT, query=query, num_items=len(nodes), num_selected=len(selected))
        )
        calls = [
            start_call(self._aligner, self.callback_manager, query, pair["answer"], component=COMPONENT,
                       options=self.generation_kwargs, context=pair["context"])
            for pair in _pairs(query, nodes, selected)
        ]
        return query, selected, _Pass(time.perf_counter(), calls)

    def _finish(
        self,
        nodes: Sequence[NodeWithScore],
        selected: Sequence[int],
        results: Sequence[Correction | BaseException],
        start: _Pass,
    ) -> list[NodeWithScore]:
        out = list(nodes)
        corrections: list[Correction] = []
        errors: list[BaseException] = []
        for i, result, call in zip(selected, results, start.calls):
            if isinstance(result, BaseException):
                call.failed(result)
                logger.warning("node %s passed through uncorrected: %s", nodes[i].node.node_id, describe(result))
                errors.append(result)
                continue
            call.done(result)
            corrections.append(result)
            if verdict(result).get("inspector_passed"):
                out[i] = self._inspected(nodes[i], result)
            elif result.text.strip():
                out[i] = self._corrected(nodes[i], result)
        self._end(len(nodes), corrections, errors, start)
        return out

    def _failed(
        self, nodes: Sequence[NodeWithScore], selected: Sequence[int], exc: Exception, start: _Pass
    ) -> list[NodeWithScore]:
        """The whole batch failed: raise (always for a misspelled option), or pass every node through."""
        for call in start.calls:
            call.failed(exc)
        self._end(len(nodes), [], [exc] * len(selected), start)
        if not self._passthrough or isinstance(exc, GenerationOptionError):
            raise exc
        logger.warning("%d node(s) passed through uncorrected: %s", len(selected), describe(exc))
        return list(nodes)

    def _end(self, num_items: int, corrections: Sequence[Correction], errors: Sequence[BaseException], start: _Pass) -> None:
        scores = [verdict(c)["inspector_score"] for c in corrections if verdict(c)]
        dispatcher.event(
            AlignerEndEvent(
                component=COMPONENT,
                num_items=num_items,
                num_corrected=sum(1 for c in corrections if c.text.strip() and not _passed(c)),
                num_changed=sum(1 for c in corrections if c.changed and c.text.strip()),
                num_errors=len(errors),
                prompt_tokens=sum(c.prompt_tokens for c in corrections),
                completion_tokens=sum(c.completion_tokens for c in corrections),
                latency_s=time.perf_counter() - start.time,
                error=describe(errors[0]) if errors else None,
                num_inspected=len(scores),
                num_inspector_passed=sum(1 for c in corrections if _passed(c)),
                inspector_scores=scores,
            )
        )

    def _corrected(self, item: NodeWithScore, correction: Correction) -> NodeWithScore:
        """A copy of the node carrying the corrected text and, in hidden metadata, the original (and verdict)."""
        key = self.metadata_key
        copied = self._inspected(item, correction)
        node = copied.node
        node.metadata = {**node.metadata, key: item.node.metadata.get(key, correction.original)}
        node.excluded_llm_metadata_keys = _with(node.excluded_llm_metadata_keys, key)
        node.excluded_embed_metadata_keys = _with(node.excluded_embed_metadata_keys, key)
        node.set_content(correction.text)
        return copied

    @staticmethod
    def _inspected(item: NodeWithScore, correction: Correction) -> NodeWithScore:
        """A copy of the node with the inspector's verdict in hidden metadata (the node itself without one)."""
        seen = verdict(correction)
        if not seen:
            return NodeWithScore(node=item.node.model_copy(), score=item.score)
        node = item.node.model_copy()
        node.metadata = {**item.node.metadata, SCORE_KEY: seen["inspector_score"], PASSED_KEY: seen["inspector_passed"]}
        for key in (SCORE_KEY, PASSED_KEY):
            node.excluded_llm_metadata_keys = _with(node.excluded_llm_metadata_keys, key)
            node.excluded_embed_metadata_keys = _with(node.excluded_embed_metadata_keys, key)
        return NodeWithScore(node=node, score=item.score)


class _Pass:
    """A pass under way: when it started, and the open LLM event of each selected node."""

    def __init__(self, time: float, calls: list[LLMCall]) -> None:
        self.time, self.calls = time, calls


def _passed(correction: Correction) -> bool:
    return bool(verdict(correction).get("inspector_passed"))


def _pairs(query: str, nodes: Sequence[NodeWithScore], selected: Sequence[int]) -> list[dict[str, Any]]:
    """The selected nodes as the core's dict pairs, each grounded on its neighbours (the other selected nodes)."""
    documents = {i: node_documents([nodes[i]]) for i in selected}
    return [{"question": query, "answer": _text(nodes[i]),
             "context": [d for j in selected if j != i for d in documents[j]]} for i in selected]


def _text(item: NodeWithScore) -> str:
    return item.node.get_content(metadata_mode=MetadataMode.NONE) or ""


def _with(keys: Sequence[str], key: str) -> list[str]:
    return [*keys, key] if key not in keys else list(keys)
