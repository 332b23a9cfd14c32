"""Prometheus metrics through one registry the app owns; every label value comes from a bounded set."""

from __future__ import annotations

import threading
from collections.abc import Iterable
from typing import Generic, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from .pricing import Costing, Usage, family_of

TIERS = frozenset({"flex", "default", "auto", "priority", "scale", "fast", "ultrafast"})
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 900)
MAX_MODEL_LABELS = 64  # models outside the price table get their own label until this many, then "other"


M = TypeVar("M", Counter, Gauge, Histogram)


class Labelled(Generic[M]):
    """A metric whose children are kept per label tuple, so the hot path skips prometheus-client's checks."""

    def __init__(self, metric: M) -> None:
        self.metric: M = metric
        self._children: dict[tuple[str, ...], M] = {}

    def labels(self, *values: str) -> M:
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = self.metric.labels(*values)
        return child


def tier_label(tier: object) -> str:
    if tier is None:
        return "none"
    return tier if isinstance(tier, str) and tier in TIERS else "other"


class Metrics:
    """The proxy's metrics; names start with `flexproxy_`."""

    def __init__(self, known_models: Iterable[str] = (), registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        self._known = frozenset(known_models)
        self._seen: set[str] = set()
        self._lock = threading.Lock()
        r = self.registry
        self.requests = Labelled(Counter(
            "flexproxy_requests", "Requests answered, by endpoint, model family, tiers and outcome.",
            ["endpoint", "model", "requested_tier", "served_tier", "outcome"], registry=r,
        ))  # fmt: skip
        self.in_flight = Labelled(
            Gauge("flexproxy_requests_in_flight", "Requests being served.", ["endpoint"], registry=r)
        )
        self.attempts = Labelled(Counter(
            "flexproxy_upstream_attempts", "Upstream attempts, by tier and status class.",
            ["endpoint", "tier", "status_class"], registry=r,
        ))  # fmt: skip
        self.retries = Labelled(Counter(
            "flexproxy_retries", "Upstream attempts repeated, by reason.", ["endpoint", "model", "reason"], registry=r
        ))
        self.fallbacks = Labelled(Counter(
            "flexproxy_fallbacks", "Requests re-sent on the standard tier after flex stayed unavailable.",
            ["endpoint", "model"], registry=r,
        ))  # fmt: skip
        self.tier_rejections = Labelled(Counter(
            "flexproxy_tier_rejections", "Upstream 400s on service_tier, re-sent without it.",
            ["endpoint", "model"], registry=r,
        ))  # fmt: skip
        self.tokens = Labelled(Counter(
            "flexproxy_tokens", "Tokens reported by upstream, by served tier and kind.",
            ["model", "tier", "kind"], registry=r,
        ))  # fmt: skip
        self.cost = Labelled(
            Counter("flexproxy_cost_usd", "Spend in USD at the served tier.", ["model", "tier"], registry=r)
        )
        self.saved = Labelled(Counter(
            "flexproxy_cost_saved_usd", "USD saved: standard price minus flex price of answers served on flex.",
            ["model"], registry=r,
        ))  # fmt: skip
        self.lost = Labelled(Counter(
            "flexproxy_savings_lost_usd", "USD flex would have saved on requests sent flex but served standard.",
            ["model"], registry=r,
        ))  # fmt: skip
        self.unpriced = Labelled(Counter(
            "flexproxy_unpriced_responses", "Answers with usage but no price for their model and tier.",
            ["model", "tier"], registry=r,
        ))  # fmt: skip
        self.duration = Labelled(Histogram(
            "flexproxy_request_duration_seconds", "Time from request to the last byte of the answer.",
            ["endpoint", "outcome"], buckets=DURATION_BUCKETS, registry=r,
        ))  # fmt: skip
        self.backoff = Labelled(Histogram(
            "flexproxy_backoff_wait_seconds", "Time one request spent waiting between upstream attempts.",
            ["endpoint"], buckets=DURATION_BUCKETS, registry=r,
        ))  # fmt: skip
        self.ttfb = Labelled(Histogram(
            "flexproxy_upstream_ttfb_seconds", "Time from sending an attempt to its response headers.",
            ["endpoint", "tier"], buckets=DURATION_BUCKETS, registry=r,
        ))  # fmt: skip

    def model_label(self, model: object) -> str:
        """The price-table family, else the model name while few are seen, else "other"."""
        if not isinstance(model, str) or not model:
            return "none"
        family = family_of(model)
        if family in self._known:
            return family
        if model in self._seen:
            return model
        with self._lock:
            if len(self._seen) < MAX_MODEL_LABELS and len(model) <= 64 and model.isprintable():
                self._seen.add(model)
                return model
        return "other"

    def account(self, model: str, tier: str, usage: Usage, costing: Costing | None) -> None:
        for kind, count in (
            ("input", usage.input), ("cached_input", usage.cached_input),
            ("output", usage.output), ("reasoning", usage.reasoning),
        ):  # fmt: skip
            if count:
                self.tokens.labels(model, tier, kind).inc(count)
        if costing is None:
            self.unpriced.labels(model, tier).inc()
            return
        self.cost.labels(model, tier).inc(float(costing.cost_usd))
        if costing.saved_usd:
            self.saved.labels(model).inc(float(costing.saved_usd))
        if costing.lost_usd:
            self.lost.labels(model).inc(float(costing.lost_usd))


def status_class(status: int | None, error: str | None = None) -> str:
    if status is None:
        return error or "connection_error"
    if status == 429:
        return "429"
    return f"{status // 100}xx"
