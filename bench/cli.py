"""`python -m bench [--quick] [--only SCENARIO] [--workload NAME]`: run the scenarios, write raw JSON to
bench/results/ and the Markdown report."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from . import bodies, fleet, held, machine, nginx, overhead, redis_server, report, scarce, streams, wrk
from .plan import WORKLOAD_NAMES, Plan
from .procs import REPO

Scenario = Callable[[Plan, Path, Path], dict[str, Any]]
MAX_FLEET = 32  # proxy processes on one machine; each is a Python process of ~60 MB
SCENARIOS: dict[str, Scenario] = {
    "overhead": overhead.run,
    "held": held.run,
    "bodies": bodies.run,
    "streams": streams.run,
    "scarce": scarce.run,
    "fleet": fleet.run,
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
        help="Markdown report to write (default: docs/benchmarks.md; none with --quick, --only or --workload)",
    )
    parser.add_argument("--render", type=Path, default=None, metavar="RESULTS_JSON",
                        help="measure nothing: write the report (--docs, default docs/benchmarks.md) from a saved "
                        "run's results.json, with the verdicts worked out again")  # fmt: skip
    parser.add_argument("--only", action="append", choices=list(SCENARIOS),
                        help="run only this scenario (repeatable; for working on one): scarce is the flex "
                        "workloads with one proxy, fleet the same with several and Redis")  # fmt: skip
    parser.add_argument("--workload", action="append", choices=WORKLOAD_NAMES,
                        help="in scarce and fleet, run only this workload (repeatable)")  # fmt: skip
    parser.add_argument("--fleet-sizes", type=_sizes, default=None, metavar="N,N,...",
                        help="the fleet's proxy counts instead of the plan's (1,4,8; quick 1,2); the target is "
                        "judged on the largest against 1, so include 1")  # fmt: skip
    return parser


def _sizes(text: str) -> tuple[int, ...]:
    """`1,3,6` as (1, 3, 6): distinct proxy counts from 1 to 32, in order."""
    try:
        sizes = tuple(sorted({int(part) for part in text.split(",") if part.strip()}))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of whole numbers: {text!r}") from None
    if not sizes or sizes[0] < 1 or sizes[-1] > MAX_FLEET:
        raise argparse.ArgumentTypeError(f"proxy counts must be 1 to {MAX_FLEET}")
    return sizes


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = _parser().parse_args(argv)
    if args.render is not None:
        return _render(args.render, args.docs or REPO / "docs" / "benchmarks.md")
    chosen = [name for name in SCENARIOS if not args.only or name in args.only]
    nginx.binary(), wrk.binary()  # fail now, naming the packages, rather than after minutes
    if "fleet" in chosen:
        redis_server.binary()
    plan = Plan.quick_check() if args.quick else Plan.full()
    if args.workload:
        plan = replace(plan, only_workloads=tuple(args.workload))
    if args.fleet_sizes:
        plan = replace(plan, fleet_sizes=args.fleet_sizes)
    # A quick or partial run writes no report unless asked: it would replace the full run's.
    kind = "quick" if args.quick else "partial" if args.only or args.workload or args.fleet_sizes else "full"
    docs = args.docs if args.docs is not None else (REPO / "docs" / "benchmarks.md" if kind == "full" else None)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    work = args.results / f"{stamp}-{kind}"
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
    for name in chosen:
        scenario = SCENARIOS[name]
        print(f"bench: {name} ...", file=sys.stderr, flush=True)
        start = time.monotonic()
        results[name] = scenario(plan, work, log_dir)
        results["seconds"][name] = round(time.monotonic() - start, 1)
        print(f"bench: {name} done in {results['seconds'][name]} s", file=sys.stderr, flush=True)
    results["seconds"]["total"] = round(time.monotonic() - began, 1)
    results["verdicts"] = report.verdicts(results)
    raw = json.dumps(results, indent=2)
    (work / "results.json").write_text(raw)
    (args.results / f"latest-{kind}.json").write_text(raw)
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
