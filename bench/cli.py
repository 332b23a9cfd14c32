"""`python -m bench [--quick]`: run every scenario, write raw JSON to bench/results/ and the Markdown report."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from . import bodies, held, machine, nginx, overhead, report, scarce, streams, wrk
from .plan import Plan
from .procs import REPO

Scenario = Callable[[Plan, Path, Path], dict[str, Any]]
SCENARIOS: dict[str, Scenario] = {
    "overhead": overhead.run,
    "held": held.run,
    "bodies": bodies.run,
    "streams": streams.run,
    "scarce": scarce.run,
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument(
        "--quick",
        action="store_true",
        help="every scenario, short and small (harness self-check; figures not for quoting)",
    )
    parser.add_argument("--results", type=Path, default=REPO / "bench" / "results", help="folder for raw JSON")
    parser.add_argument(
        "--docs",
        type=Path,
        default=None,
        help="Markdown report to write (default: docs/benchmarks.md, none with --quick)",
    )
    parser.add_argument("--render", type=Path, default=None, metavar="RESULTS_JSON",
                        help="measure nothing: write the report (--docs, default docs/benchmarks.md) from a saved "
                        "run's results.json, with the verdicts worked out again")  # fmt: skip
    parser.add_argument("--only", action="append", choices=sorted(SCENARIOS),
                        help="run only this scenario (repeatable; for working on one)")  # fmt: skip
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = _parser().parse_args(argv)
    if args.render is not None:
        return _render(args.render, args.docs or REPO / "docs" / "benchmarks.md")
    nginx.binary(), wrk.binary()  # fail now, naming the packages, rather than after minutes
    plan = Plan.quick_check() if args.quick else Plan.full()
    docs = args.docs if args.docs is not None else (None if args.quick else REPO / "docs" / "benchmarks.md")
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    work = args.results / f"{stamp}-{'quick' if args.quick else 'full'}"
    log_dir = work / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {
        "command": " ".join([".venv/bin/python -m bench", *argv]),
        "started": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "plan": plan.as_dict(),
        "machine": machine.describe(),
        "seconds": {},
    }
    began = time.monotonic()
    for name, scenario in SCENARIOS.items():
        if args.only and name not in args.only:
            continue
        print(f"bench: {name} ...", file=sys.stderr, flush=True)
        start = time.monotonic()
        results[name] = scenario(plan, work, log_dir)
        results["seconds"][name] = round(time.monotonic() - start, 1)
        print(f"bench: {name} done in {results['seconds'][name]} s", file=sys.stderr, flush=True)
    results["seconds"]["total"] = round(time.monotonic() - began, 1)
    results["verdicts"] = report.verdicts(results)
    raw = json.dumps(results, indent=2)
    (work / "results.json").write_text(raw)
    (args.results / f"latest-{'quick' if args.quick else 'full'}.json").write_text(raw)
    if docs is not None:
        docs.parent.mkdir(parents=True, exist_ok=True)
        docs.write_text(report.render(results))
    for row in results["verdicts"]:
        print(f"{'met    ' if row['met'] else 'NOT MET'}  {row['target']}: {row['measured']}")
    print(f"bench: {results['seconds']['total']} s in all", file=sys.stderr)
    print(f"raw results: {work / 'results.json'}" + (f"; report: {docs}" if docs else ""))
    return 0


def _render(saved: Path, docs: Path) -> int:
    """The report from a saved run, for a change of wording: its figures, command and date stay the run's."""
    results = json.loads(saved.read_text())
    results["verdicts"] = report.verdicts(results)
    docs.write_text(report.render(results))
    print(f"report: {docs} (from {saved})")
    return 0
