"""Prometheus metrics through one registry the app owns; every label value comes from a bounded set.

Counters lose to `rate()` the increments that create a series, so every label set known at start is created
then, at 0: the low-cardinality `flexproxy_outcomes_total` and `flexproxy_answered_total` (which the dashboard's
totals and the alerts read), the upstream attempts, and the request durations of answered requests. A model
family's own series on an endpoint (retries, fallbacks, tier rejections, unread answers; its gate) are created
at 0 the first time the family is seen there, before that request's first attempt. `flexproxy_requests_total`
and the token and money counters keep the full breakdown (model, client, tiers), whose label sets appear as they
first occur.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Generic, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector
from prometheus_client.core import CounterMetricFamily
from prometheus_client.metrics_core import Metric

from .gate import Result, State
from .policy import RETRY_REASON
from .pricing import Usage, family_of

# How a tier reads in every label: standard stands for default, auto and no tier at all on a model request.
_TIER_LABELS = {
    "flex": "flex", "default": "standard", "auto": "standard", "standard": "standard", "priority": "priority",
    "scale": "priority", "fast": "priority", "ultrafast": "priority",
}  # fmt: skip
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 900)
ENDPOINTS = ("chat", "responses", "compact", "other")
MODEL_ENDPOINTS = ("chat", "responses", "compact")  # "other" is every pass-through path
# Every way a request can end: the `outcome` label and the access log's `outcome` field.
OUTCOMES = (
    "ok",  # answered by upstream (a 2xx; pass-through: below 400)
    "upstream_error",  # upstream's own 4xx that no retry fixes, passed through as it came
    "bad_request",  # refused by the proxy: bad JSON, body too large, bad header or path
    "auth_failed",  # refused by the proxy: no client key, or an unknown one (401)
    "spend_cap",  # the client's daily standard-tier spend cap
    "flex_unavailable", "rate_limited", "quota", "too_large", "tier_rejected", "server_error",
    "timeout", "client_deadline", "unreachable", "stream_cut",
    "client_disconnected",  # the client left before its answer was complete
    "shutdown",  # cut by the drain at shutdown (503)
    "proxy_error",  # a bug of the proxy's (500)
)  # fmt: skip
# What a pass-through request (endpoint "other": one attempt, no tier, no retry) can end with.
PASSTHROUGH_OUTCOMES = (
    "ok", "upstream_error", "bad_request", "auth_failed", "timeout", "unreachable", "stream_cut",
    "client_disconnected", "shutdown", "proxy_error",
)  # fmt: skip
STATUS_CLASSES = ("2xx", "4xx", "429", "5xx", "timeout", "connection_error", "cancelled")
# (requested, served) tiers of answered model requests: flex served or fallen back, standard, priority served or
# downgraded by upstream. Rarer pairs (a tier named `other`) get their series when they first occur.
ANSWERED_TIERS = (("flex", "flex"), ("flex", "standard"), ("standard", "standard"), ("priority", "priority"),
                  ("priority", "standard"))  # fmt: skip
RETRY_REASONS = tuple(dict.fromkeys(RETRY_REASON.values()))


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


class Money:
    """A counter of USD kept as whole nano-USD per label set, so its sums are exact: shown as value / 1e9 (the text
    reads 0.002, never 0.0020000000000000005); the ledger sums the same integers."""

    def __init__(self, name: str, documentation: str, labelnames: Iterable[str], registry: CollectorRegistry) -> None:
        self.name, self.documentation, self.labelnames = name, documentation, tuple(labelnames)
        self.values: dict[tuple[str, ...], int] = {}
        registry.register(self)

    def touch(self, *labels: str) -> None:
        """Create a label set at 0, so a quiet proxy's panels read 0 and the first increment is not lost to rate()."""
        self.values.setdefault(labels, 0)

    def add(self, nusd: int, *labels: str) -> None:
        values = self.values
        values[labels] = values.get(labels, 0) + nusd

    def total(self) -> int:
        """nano-USD over every label set."""
        return sum(self.values.values())

    def describe(self) -> Iterator[Metric]:
        yield CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for labels, nusd in list(self.values.items()):
            family.add_metric(labels, nusd / 1e9)
        yield family


def tier_label(tier: object, *, missing: str = "standard") -> str:
    """flex | standard | priority | other; `missing` where no tier was given (standard on a model request)."""
    if tier is None:
        return missing
    return _TIER_LABELS.get(tier, "other") if isinstance(tier, str) else "other"


class Metrics:
    """The proxy's metrics; names start with `flexproxy_`."""

    def __init__(
        self,
        known_models: Iterable[str] = (),
        registry: CollectorRegistry | None = None,
        clients: Iterable[str] = ("default",),
        flex_models: Iterable[str] = (),
        process: bool = True,
        gate_per_family: bool = True,
    ) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        self._known = frozenset(known_models)
        self._flex = frozenset(flex_models)
        self._gate_per_family = gate_per_family  # gates keyed by family alone (not per upstream key)
        self._seen: set[tuple[str, str]] = set()  # (family, endpoint) whose series exist; (family, "gate")
        r = self.registry
        if process:
            ProcessCollector(registry=r)  # open fds against the limit, memory, CPU
        self.outcomes = Labelled(Counter(
            "flexproxy_outcomes", "Requests finished, by endpoint and outcome; every pair exists from start.",
            ["endpoint", "outcome"], registry=r,
        ))  # fmt: skip
        self.answered = Labelled(Counter(
            "flexproxy_answered", "Requests answered (outcome ok), by the tier asked of upstream and the tier that "
            "served; the usual pairs exist from start.", ["endpoint", "requested_tier", "served_tier"], registry=r,
        ))  # fmt: skip
        self.requests = Labelled(Counter(
            "flexproxy_requests", "Requests finished, by endpoint, model family, client, tiers and outcome (the "
            "breakdown: each label set appears with its first request).",
            ["endpoint", "model", "client", "requested_tier", "served_tier", "outcome"], registry=r,
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
            "flexproxy_tokens", "Tokens reported by upstream, by client, served tier and kind.",
            ["model", "client", "tier", "kind"], registry=r,
        ))  # fmt: skip
        self.cost = Money("flexproxy_cost_usd", "Spend in USD at the served tier.", ["model", "client", "tier"], r)
        self.saved = Money(
            "flexproxy_cost_saved_usd", "USD saved: standard price minus flex price of answers served on flex.",
            ["model", "client"], r,
        )  # fmt: skip
        self.lost = Money(
            "flexproxy_savings_lost_usd", "USD flex would have saved on requests sent flex but served standard.",
            ["model", "client"], r,
        )  # fmt: skip
        self.unread = Labelled(Counter(
            "flexproxy_unread_answers", "Requests upstream accepted whose answer was never read to its end "
            "(timeouts, cuts, clients that left): upstream may bill them, and their usage is unknown.",
            ["endpoint", "model", "tier"], registry=r,
        ))  # fmt: skip
        self.shadow_saved = Money(
            "flexproxy_shadow_savings_usd", "Shadow mode: USD these answers would have saved on flex.",
            ["model", "client"], r,
        )  # fmt: skip
        self.unpriced = Labelled(Counter(
            "flexproxy_unpriced_responses",
            "Answers that could not be priced: no price for their model and tier, or no usage.",
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
            "flexproxy_upstream_ttfb_seconds", "Time from sending an attempt to its answer's headers (answers only).",
            ["endpoint", "tier"], buckets=DURATION_BUCKETS, registry=r,
        ))  # fmt: skip
        self.gate_busy = Labelled(
            Gauge("flexproxy_gate_busy", "1 while the flex gate of a model family is busy.", ["model"], registry=r)
        )
        self.gate_waiting = Labelled(
            Gauge("flexproxy_gate_waiting", "Requests waiting in the flex gate.", ["model"], registry=r)
        )
        self.gate_probes = Labelled(Counter(
            "flexproxy_gate_probes", "Probes sent by a busy flex gate, by result.", ["model", "result"], registry=r
        ))  # fmt: skip
        self.gate_wait = Labelled(Histogram(
            "flexproxy_gate_wait_seconds", "Time one request waited in the flex gate.",
            ["model"], buckets=DURATION_BUCKETS, registry=r,
        ))  # fmt: skip
        self.gate_transitions = Labelled(Counter(
            "flexproxy_gate_transitions", "Flex gate state changes.", ["model", "to"], registry=r
        ))  # fmt: skip
        self.shared_state_up = Gauge(
            "flexproxy_shared_state_up", "1 while the shared state (FLEX_PROXY_STATE_URL) answers; 0 in local mode "
            "or when none is configured.", registry=r,
        )  # fmt: skip
        self.loop_lag = Gauge(
            "flexproxy_event_loop_lag_seconds", "How late the event loop ran a timer, last measured.", registry=r
        )
        self._initialise(clients, flex_models)

    def _initialise(self, clients: Iterable[str], flex_models: Iterable[str]) -> None:
        """Create the label sets a quiet proxy has, so rate() counts their first increments and panels read 0
        rather than "No data". The flex families' money for each named client, not every priced model's: that
        would be thousands of series for many clients."""
        for endpoint in ENDPOINTS:
            self.in_flight.labels(endpoint)
            self.duration.labels(endpoint, "ok")
            for outcome in OUTCOMES if endpoint != "other" else PASSTHROUGH_OUTCOMES:
                self.outcomes.labels(endpoint, outcome)
        self.answered.labels("other", "none", "none")
        for endpoint in MODEL_ENDPOINTS:
            for requested, served in ANSWERED_TIERS:
                self.answered.labels(endpoint, requested, served)
            for tier in ("flex", "standard"):
                for status in STATUS_CLASSES:
                    self.attempts.labels(endpoint, tier, status)
        for client in clients:
            for model in flex_models:
                self.saved.touch(model, client)
                self.lost.touch(model, client)
                for tier in ("flex", "standard"):
                    self.cost.touch(model, client, tier)

    def _first_sight(self, family: str, endpoint: str) -> None:
        """A family's own series on one endpoint, at 0 before its first request there makes its first attempt:
        its retries, unread answers and, for a flex family, its fallbacks, tier rejections and (once) its gate."""
        self._seen.add((family, endpoint))
        flex = family in self._flex or family == "other"  # an unpriced model may be sent on flex (X-Flex-Tier)
        for reason in RETRY_REASONS:
            if flex or reason != "flex_unavailable":
                self.retries.labels(endpoint, family, reason)
        for tier in ("flex", "standard") if flex else ("standard",):
            self.unread.labels(endpoint, family, tier)
        if not flex:
            return
        self.fallbacks.labels(endpoint, family)
        self.tier_rejections.labels(endpoint, family)
        if self._gate_per_family and (family, "gate") not in self._seen:
            self._seen.add((family, "gate"))
            self.gate_busy.labels(family)
            self.gate_waiting.labels(family)
            for result in Result:
                self.gate_probes.labels(family, result.value)
            for state in State:
                self.gate_transitions.labels(family, state.value)

    def model_label(self, model: object, endpoint: str | None = None) -> str:
        """The price-table family, else "other" (a typo must not get a label of its own); "none" for no model.
        The first call for a family on a model endpoint creates the family's series there."""
        if not isinstance(model, str) or not model:
            return "none"
        family = family_of(model)
        label = family if family in self._known else "other"
        if endpoint in MODEL_ENDPOINTS and (label, endpoint) not in self._seen:
            self._first_sight(label, endpoint)
        return label

    def account(self, model: str, client: str, tier: str, usage: Usage, money: tuple[int, int, int] | None) -> None:
        """Count an answer's tokens and its money: (cost, saved, lost) in nano-USD, None when it has no price."""
        for kind, count in (
            ("input", usage.input), ("cached_input", usage.cached_input),
            ("output", usage.output), ("reasoning", usage.reasoning),
        ):  # fmt: skip
            if count:
                self.tokens.labels(model, client, tier, kind).inc(count)
        if money is None:
            self.unpriced.labels(model, tier).inc()
            return
        cost, saved, lost = money
        self.cost.add(cost, model, client, tier)
        if saved:
            self.saved.add(saved, model, client)
        if lost:
            self.lost.add(lost, model, client)


def status_class(status: int | None, error: str | None = None) -> str:
    if status is None:
        return error or "connection_error"
    if status == 429:
        return "429"
    return f"{status // 100}xx"
