"""AlignerNodePostprocessor: correct retrieved node texts, with the query as the question, before synthesis."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from aligner_core import Aligner, Correction
from aligner_core.decision import Reply, decide
from aligner_core.errors import missing
from aligner_core.reporting import OnError

try:
    from llama_index.core.bridge.pydantic import ConfigDict, Field, PrivateAttr
    from llama_index.core.instrumentation import get_dispatcher
    from llama_index.core.postprocessor.types import BaseNodePostprocessor
    from llama_index.core.schema import MetadataMode, NodeWithScore, QueryBundle
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    raise missing("llama-index-core", "llamaindex", feature="llamaindex_aligner") from exc

from ._correct import Corrector, Result
from ._grounding import node_documents
from ._serialize import aligner_spec, load_aligner

dispatcher = get_dispatcher(__name__)

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
    (``aligner_inspector_score``, ``aligner_inspector_passed``). The settings are read when it is built.
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

    _corrector: Corrector = PrivateAttr()

    def __init__(self, aligner: Aligner, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._corrector = Corrector(
            aligner,
            component=COMPONENT,
            on_error=self.on_error,
            generation_kwargs=self.generation_kwargs,
            inspector=self.inspector,
            threshold=self.threshold,
            callback_manager=lambda: self.callback_manager,
        )

    @classmethod
    def class_name(cls) -> str:
        return "AlignerNodePostprocessor"

    @property
    def aligner(self) -> Aligner:
        """The Aligner that corrects the nodes."""
        return self._corrector.aligner

    # -- serialization: the Aligner is a live model, recorded by name ---------------------------

    def to_dict(self, **kwargs: Any) -> dict[str, Any]:
        """The settings, plus ``"aligner"``: the Aligner's model, template and engine (not its weights)."""
        return {**super().to_dict(**kwargs), "aligner": aligner_spec(self.aligner)}

    @classmethod
    def from_dict(
        cls, data: dict[str, Any], aligner: Aligner | None = None, **kwargs: Any
    ) -> AlignerNodePostprocessor:
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
        query, selected = self._select(nodes, query_bundle)
        results = self._corrector.correct_batch(query, _pairs(query, nodes, selected), num_items=len(nodes))
        return self._apply(nodes, selected, results)

    @dispatcher.span
    async def _apostprocess_nodes(
        self, nodes: list[NodeWithScore], query_bundle: QueryBundle | None = None
    ) -> list[NodeWithScore]:
        if not nodes:
            return []
        query, selected = self._select(nodes, query_bundle)
        results = await self._corrector.acorrect_batch(
            query, _pairs(query, nodes, selected), num_items=len(nodes)
        )
        return self._apply(nodes, selected, results)

    # -- shared steps ------------------------------------------------------------------------

    def _select(
        self, nodes: Sequence[NodeWithScore], query_bundle: QueryBundle | None
    ) -> tuple[str, list[int]]:
        """The question, and the text nodes to correct (the ``top_n`` best scored, in their order)."""
        if query_bundle is None:
            raise ValueError(
                "AlignerNodePostprocessor needs the query as the question: pass query_bundle or query_str"
            )
        selected = [i for i, n in enumerate(nodes) if decide(Reply(content=_text(n))).corrects]
        if self.top_n is not None and len(selected) > self.top_n:
            best = sorted(selected, key=lambda i: (nodes[i].score is None, -(nodes[i].score or 0.0)))[
                : self.top_n
            ]
            selected = sorted(best)
        return query_bundle.query_str, selected

    def _apply(
        self, nodes: Sequence[NodeWithScore], selected: Sequence[int], results: Sequence[Result]
    ) -> list[NodeWithScore]:
        """The nodes with the corrections in (a node the Aligner failed on, or passed back empty, as it was)."""
        out = list(nodes)
        for i, result in zip(selected, results):
            if not isinstance(result, Correction):
                continue
            if result.metadata.get("inspector_passed"):
                out[i] = _inspected(nodes[i], result)
            elif result.text.strip():
                out[i] = self._corrected(nodes[i], result)
        return out

    def _corrected(self, item: NodeWithScore, correction: Correction) -> NodeWithScore:
        """A copy of the node carrying the corrected text and, in hidden metadata, the original (and verdict)."""
        key = self.metadata_key
        copied = _inspected(item, correction)
        _hide(copied, {key: item.node.metadata.get(key, correction.original)})
        copied.node.set_content(correction.text)
        return copied


def _inspected(item: NodeWithScore, correction: Correction) -> NodeWithScore:
    """A copy of the node, with the inspector's verdict in hidden metadata when it scored the node."""
    copied = NodeWithScore(node=item.node.model_copy(), score=item.score)
    if "inspector_score" in correction.metadata:
        _hide(
            copied,
            {
                SCORE_KEY: correction.metadata["inspector_score"],
                PASSED_KEY: correction.metadata["inspector_passed"],
            },
        )
    return copied


def _hide(item: NodeWithScore, metadata: dict[str, Any]) -> None:
    """Add metadata to a (copied) node, kept out of the LLM's prompt and the embedding."""
    node = item.node
    node.metadata = {**node.metadata, **metadata}
    for key in metadata:
        if key not in node.excluded_llm_metadata_keys:
            node.excluded_llm_metadata_keys = [*node.excluded_llm_metadata_keys, key]
        if key not in node.excluded_embed_metadata_keys:
            node.excluded_embed_metadata_keys = [*node.excluded_embed_metadata_keys, key]


def _pairs(query: str, nodes: Sequence[NodeWithScore], selected: Sequence[int]) -> list[dict[str, Any]]:
    """The selected nodes as the core's dict pairs, each grounded on its neighbours (the other selected nodes)."""
    documents = {i: node_documents([nodes[i]]) for i in selected}
    return [
        {
            "question": query,
            "answer": _text(nodes[i]),
            "context": [d for j in selected if j != i for d in documents[j]],
        }
        for i in selected
    ]


def _text(item: NodeWithScore) -> str:
    return item.node.get_content(metadata_mode=MetadataMode.NONE) or ""
