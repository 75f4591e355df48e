"""Prometheus metrics of the proxy, on a registry of its own (two apps in one process never collide)."""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from aligner_core import Correction

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, float("inf"))


class Metrics:
    """Requests, corrections, the changed share, latency and tokens, as ``/metrics`` exposes them."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "aligner_serve_requests",
            "HTTP requests answered, by endpoint and status.",
            ["endpoint", "status"],
            registry=r,
        )
        self.rejected = Counter(
            "aligner_serve_rejected", "Requests refused with 429 because the queue was full.", registry=r
        )
        self.corrections = Counter(
            "aligner_serve_corrections",
            "Answers corrected, by whether the text changed.",
            ["changed"],
            registry=r,
        )
        self.skipped = Counter(
            "aligner_serve_skipped",
            "Upstream answers passed through uncorrected, by reason.",
            ["reason"],
            registry=r,
        )
        self.inspected = Counter(
            "aligner_serve_inspected",
            "Answers scored in inspect mode, by whether they passed.",
            ["passed"],
            registry=r,
        )
        self.tokens = Counter(
            "aligner_serve_tokens",
            "Tokens used, by model (upstream or aligner) and kind.",
            ["source", "kind"],
            registry=r,
        )
        self.latency = Histogram(
            "aligner_serve_request_latency_seconds",
            "Time to answer a request, by endpoint.",
            ["endpoint"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.upstream_latency = Histogram(
            "aligner_serve_upstream_latency_seconds",
            "Time the upstream took.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.correction_latency = Histogram(
            "aligner_serve_correction_latency_seconds",
            "Time one correction took.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.in_progress = Gauge(
            "aligner_serve_requests_in_progress", "Requests admitted and not yet answered.", registry=r
        )
        self.changed_share = Gauge(
            "aligner_serve_changed_share", "Share of corrections that changed the answer.", registry=r
        )
        self._done = 0
        self._changed = 0

    def record_correction(self, correction: Correction) -> None:
        """A finished correction; one that came back unchanged for a reason (the inspector passed the answer, a
        structured correction did not validate) counts under ``skipped`` too, by that reason."""
        self.corrections.labels(changed=str(correction.changed).lower()).inc()
        if reason := correction.metadata.get("skipped"):
            self.skipped.labels(reason=str(reason)).inc()
        self.tokens.labels(source="aligner", kind="prompt").inc(correction.prompt_tokens)
        self.tokens.labels(source="aligner", kind="completion").inc(correction.completion_tokens)
        self.correction_latency.observe(correction.latency_s)
        self._done += 1
        self._changed += correction.changed
        self.changed_share.set(self._changed / self._done)

    def record_verdict(self, passed: bool) -> None:
        """An answer scored in ``inspect`` mode (never rewritten, whatever the verdict)."""
        self.inspected.labels(passed=str(passed).lower()).inc()

    def record_upstream(self, usage: object, seconds: float) -> None:
        self.upstream_latency.observe(seconds)
        if isinstance(usage, dict):
            for kind in ("prompt", "completion"):
                value = usage.get(f"{kind}_tokens")
                if isinstance(value, int) and value >= 0:
                    self.tokens.labels(source="upstream", kind=kind).inc(value)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
