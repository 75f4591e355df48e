"""AlignerNodePostprocessor: correct retrieved node texts, with the query as the question, before synthesis."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

from aligner_core import Aligner, Correction, GenerationOptionError
from aligner_core.errors import missing

try:
    from llama_index.core.bridge.pydantic import ConfigDict, Field, PrivateAttr
    from llama_index.core.instrumentation import get_dispatcher
    from llama_index.core.postprocessor.types import BaseNodePostprocessor
    from llama_index.core.schema import MetadataMode, NodeWithScore, QueryBundle
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    raise missing("llama-index-core", "llamaindex", feature="llamaindex_aligner") from exc

from ._common import OnError, check_options, describe
from .events import AlignerEndEvent, AlignerStartEvent

dispatcher = get_dispatcher(__name__)
logger = logging.getLogger("llamaindex_aligner")

#: ``node.metadata`` key under which a corrected node keeps its text from before the correction.
ORIGINAL_TEXT_KEY = "aligner_original_text"

#: ``inspector(question, text) -> True`` when the text needs correcting.
Inspector = Callable[[str, str], bool]

COMPONENT = "node_postprocessor"


class AlignerNodePostprocessor(BaseNodePostprocessor):
    """Rewrites each retrieved node's text with an Aligner, the query being the question.

    All selected nodes of one query go to the Aligner in one batched call. Node ids, scores,
    relationships and metadata are kept; nodes are copied, never edited in place (the index's own
    nodes stay as they are). The text before the correction is kept in ``node.metadata`` under
    ``metadata_key`` (default ``"aligner_original_text"``), excluded from the LLM and embedding
    metadata so it does not leak into prompts. Nodes without text (images) pass through, and so
    does a node whose correction comes back empty.
    """

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)

    top_k: int | None = Field(
        default=None, ge=1, description="Correct only the top_k highest-scoring text nodes; None corrects all."
    )
    inspector: Inspector | None = Field(
        default=None,
        exclude=True,
        description="Optional gate: inspector(question, text) -> True when the node needs correcting.",
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

    def __init__(self, aligner: Aligner, **kwargs: Any) -> None:
        if not isinstance(aligner, Aligner):
            raise TypeError(f"aligner must be an aligner_core.Aligner, got {type(aligner).__name__}")
        super().__init__(**kwargs)
        check_options(aligner, self.generation_kwargs)
        self._aligner = aligner

    @classmethod
    def class_name(cls) -> str:
        return "AlignerNodePostprocessor"

    @property
    def aligner(self) -> Aligner:
        """The Aligner that corrects the nodes."""
        return self._aligner

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
        pairs = [(query, _text(nodes[i])) for i in selected]
        try:
            results = self._aligner.correct_batch(pairs, return_exceptions=self._passthrough, **self.generation_kwargs)
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
        pairs = [(query, _text(nodes[i])) for i in selected]
        try:
            results = await self._aligner.acorrect_batch(
                pairs, return_exceptions=self._passthrough, **self.generation_kwargs
            )
        except Exception as exc:
            return self._failed(nodes, selected, exc, start)
        return self._finish(nodes, selected, results, start)

    # -- shared steps ------------------------------------------------------------------------

    @property
    def _passthrough(self) -> bool:
        return self.on_error == "passthrough"

    def _begin(self, nodes: Sequence[NodeWithScore], query_bundle: QueryBundle | None) -> tuple[str, list[int], float]:
        """Pick the nodes to correct and report the start of the pass."""
        if query_bundle is None:
            raise ValueError("AlignerNodePostprocessor needs the query as the question: pass query_bundle or query_str")
        query = query_bundle.query_str
        selected = [i for i, n in enumerate(nodes) if _text(n).strip()]
        if self.top_k is not None and len(selected) > self.top_k:
            best = sorted(selected, key=lambda i: (nodes[i].score is None, -(nodes[i].score or 0.0)))[: self.top_k]
            selected = sorted(best)
        if self.inspector is not None:
            selected = [i for i in selected if self.inspector(query, _text(nodes[i]))]
        dispatcher.event(
            AlignerStartEvent(component=COMPONENT, query=query, num_items=len(nodes), num_selected=len(selected))
        )
        return query, selected, time.perf_counter()

    def _finish(
        self,
        nodes: Sequence[NodeWithScore],
        selected: Sequence[int],
        results: Sequence[Correction | BaseException],
        start: float,
    ) -> list[NodeWithScore]:
        out = list(nodes)
        corrections: list[Correction] = []
        errors: list[BaseException] = []
        for i, result in zip(selected, results):
            if isinstance(result, BaseException):
                logger.warning("node %s passed through uncorrected: %s", nodes[i].node.node_id, describe(result))
                errors.append(result)
                continue
            corrections.append(result)
            if result.text.strip():
                out[i] = self._corrected(nodes[i], result)
        self._end(len(nodes), corrections, errors, start)
        return out

    def _failed(
        self, nodes: Sequence[NodeWithScore], selected: Sequence[int], exc: Exception, start: float
    ) -> list[NodeWithScore]:
        """The whole batch failed: raise (always for a misspelled option), or pass every node through."""
        self._end(len(nodes), [], [exc] * len(selected), start)
        if not self._passthrough or isinstance(exc, GenerationOptionError):
            raise exc
        logger.warning("%d node(s) passed through uncorrected: %s", len(selected), describe(exc))
        return list(nodes)

    def _end(self, num_items: int, corrections: Sequence[Correction], errors: Sequence[BaseException], start: float) -> None:
        dispatcher.event(
            AlignerEndEvent(
                component=COMPONENT,
                num_items=num_items,
                num_corrected=sum(1 for c in corrections if c.text.strip()),
                num_changed=sum(1 for c in corrections if c.changed and c.text.strip()),
                num_errors=len(errors),
                prompt_tokens=sum(c.prompt_tokens for c in corrections),
                completion_tokens=sum(c.completion_tokens for c in corrections),
                latency_s=time.perf_counter() - start,
                error=describe(errors[0]) if errors else None,
            )
        )

    def _corrected(self, item: NodeWithScore, correction: Correction) -> NodeWithScore:
        """A copy of the node carrying the corrected text and, in hidden metadata, the original."""
        key = self.metadata_key
        node = item.node.model_copy()
        node.metadata = {**item.node.metadata, key: item.node.metadata.get(key, correction.original)}
        node.excluded_llm_metadata_keys = _with(item.node.excluded_llm_metadata_keys, key)
        node.excluded_embed_metadata_keys = _with(item.node.excluded_embed_metadata_keys, key)
        node.set_content(correction.text)
        return NodeWithScore(node=node, score=item.score)


def _text(item: NodeWithScore) -> str:
    return item.node.get_content(metadata_mode=MetadataMode.NONE) or ""


def _with(keys: Sequence[str], key: str) -> list[str]:
    return [*keys, key] if key not in keys else list(keys)
