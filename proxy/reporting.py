"""What the flex gates report: their state and waiters as metrics, and one log line per transition."""

from __future__ import annotations

import logging

from .gate import FlexGate, Reporter, Result, State
from .logs import text_value
from .metrics import Metrics

LOG = logging.getLogger("flex_proxy.gate")


class GateMetrics(Reporter):
    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def changed(self, gate: FlexGate, moves: list[State]) -> None:
        m, core = self.metrics, gate.core
        m.gate_waiting.labels(gate.key).set(len(core.queue))
        for state in moves:
            m.gate_busy.labels(gate.key).set(1 if state is State.BUSY else 0)
            m.gate_transitions.labels(gate.key, state.value).inc()
            # The key is a bounded label, escaped all the same: a log line must not be forgeable.
            LOG.info("flex gate %s is %s (%d waiting)", text_value(gate.key), state.value, len(core.queue))

    def probed(self, gate: FlexGate, result: Result) -> None:
        self.metrics.gate_probes.labels(gate.key, result.value).inc()
