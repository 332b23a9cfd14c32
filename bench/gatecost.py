"""The flex gate's open path timed on its own: what a request pays for the gate when flex is free (look up
its family's gate, take a pass, report the answer, give the pass back), with no server around it."""

from __future__ import annotations

import time

from proxy.gate import GateConfig, Gates, Result


def open_path_ns(requests: int = 200_000) -> float:
    """Nanoseconds per request for the gate's open path, the best of three timings."""
    gates = Gates(GateConfig(), time.monotonic)
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter_ns()
        for _ in range(requests):
            flex_pass = gates.get("o3").try_pass()
            assert flex_pass is not None  # the gate is open and nobody waits
            flex_pass.record(Result.OK, 0.0, None, 0.5, 0.3)
            flex_pass.done()
        best = min(best, (time.perf_counter_ns() - start) / requests)
    return best
