"""`python -m bench.heldmem N [--latency S] [--tree DIR]`: what each held request keeps in memory.

The held scenario's setup (the simulator holds every answer `--latency` seconds, `bench.held_client` opens N
requests at once) with the proxy under tracemalloc: a snapshot before the requests and one while all N are held;
the growth between them, per request, by package and by line, and the objects per request by type. tracemalloc
slows the proxy and adds its own memory: RSS is measured by the held scenario, not here.
"""

from __future__ import annotations

import argparse
import collections
import gc
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any

from . import procs

SNAPSHOTS: list[tracemalloc.Snapshot] = []


def _group(filename: str) -> str:
    if "/proxy/" in filename:
        return "flex-proxy (proxy/)"
    if "site-packages/" in filename:
        return filename.split("site-packages/")[1].split("/")[0]
    return "stdlib " + filename.rsplit("/", 1)[-1]


def _snapshot(*_: Any) -> None:
    """SIGUSR1 in the proxy: the first call takes the baseline, the second writes the growth to $HELDMEM_OUT."""
    gc.collect()
    SNAPSHOTS.append(tracemalloc.take_snapshot())
    if len(SNAPSHOTS) < 2:
        return
    count = int(os.environ["HELDMEM_COUNT"])
    lines = SNAPSHOTS[1].compare_to(SNAPSHOTS[0], "lineno")
    packages: collections.Counter[str] = collections.Counter()
    for stat in lines:
        packages[_group(stat.traceback[0].filename)] += stat.size_diff
    types = collections.Counter(type(o).__name__ for o in gc.get_objects())
    report = {
        "requests": count,
        "bytes_per_request": sum(packages.values()) / count,
        "by_package": {name: size / count for name, size in packages.most_common(15)},
        "by_line": [(str(s.traceback[0]), s.size_diff / count, s.count_diff / count) for s in lines[:40]],
        "objects_per_request": {name: n / count for name, n in types.most_common(40) if n >= count},
    }
    Path(os.environ["HELDMEM_OUT"]).write_text(json.dumps(report, indent=1))


def serve(argv: list[str]) -> int:
    """The proxy under tracemalloc, snapshots on SIGUSR1."""
    tracemalloc.start(1)
    signal.signal(signal.SIGUSR1, _snapshot)
    tree = os.environ.get("HELDMEM_TREE")
    if tree:
        sys.path.insert(0, tree)
    from proxy.cli import main as flex_proxy

    return flex_proxy(argv)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.heldmem", description=__doc__)
    parser.add_argument("count", type=int)
    parser.add_argument("--latency", type=float, default=15.0)
    parser.add_argument("--tree", type=Path, help="a checkout whose proxy/ to run")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="flex-heldmem-") as tmp:
        work = Path(tmp)
        sim = procs.simulator(work, "sim", flex_busy=0, latency_flex=args.latency, latency_standard=args.latency)
        with procs.running(sim):
            proxy = procs.proxy(work, f"http://127.0.0.1:{sim.port}/v1", "proxy")
            at = proxy.argv.index("--host")
            proxy.argv = [sys.executable, "-m", "bench.nofile", "--", sys.executable, "-m", "bench.heldmem", "--serve",
                          *proxy.argv[at:]]  # fmt: skip
            proxy.env.update(HELDMEM_OUT=str(work / "report.json"), HELDMEM_COUNT=str(args.count),
                             HELDMEM_TREE=str(args.tree or ""))  # fmt: skip
            with procs.running(proxy):
                os.kill(proxy.pid, signal.SIGUSR1)
                time.sleep(1)
                url = f"http://127.0.0.1:{proxy.port}/v1/chat/completions"
                client = subprocess.Popen(
                    [sys.executable, "-m", "bench.held_client", url, str(args.count), str(args.latency + 60), "4000"],
                    cwd=procs.REPO, env=procs.clean_env(), stdout=subprocess.PIPE,
                )  # fmt: skip
                time.sleep(args.count / 4000 + 4)  # all are in flight well before the first answer
                os.kill(proxy.pid, signal.SIGUSR1)
                out, _ = client.communicate(timeout=args.latency + 120)
        summary = json.loads(out)
        report = json.loads((work / "report.json").read_text())
    report["answered"] = summary["ok"]
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--serve"]:
        sys.exit(serve(sys.argv[2:]))
    sys.exit(main())
