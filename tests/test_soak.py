"""The soak (tests/soak.py) at CI size, as part of the test run: 2,000 requests, 75 at a time, through the real
`flex-proxy` process. The full size runs by hand: `python tests/soak.py --full` (20,000 requests, 200 at a time)."""

from __future__ import annotations

from soak import run_soak


def test_soak() -> None:
    report = run_soak(2_000, 75)
    print(report.summary())  # shown with -s, or with the failure
    assert not report.problems, report.summary()
