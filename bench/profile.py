"""`python -m bench.profile`: where the proxy's CPU goes under the overhead scenario's load, and A/B of two trees.

The proxy (defaults, log level warning) sits in front of the canned nginx; wrk sends the small chat body at
`--connections`. Each round reports requests/s and the proxy's CPU µs a request (from /proc, as the overhead
scenario does), which swings far less than requests/s on a shared machine. `--py-spy FILE` samples the proxy
with py-spy during the last round and prints the functions holding the most samples (own time and inclusive).
`--tree DIR` (repeatable) runs the proxy from each checkout's `proxy/` in turn, round by round, for A/B.
"""

from __future__ import annotations

import argparse
import collections
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from . import nginx, procs, wrk
from .overhead import measure
from .plan import SMALL_CHAT_BODY
from .stats import median

PATH = "/v1/chat/completions"


def _proxy(log_dir: Path, tree: Path | None, upstream: str, name: str) -> procs.Service:
    service = procs.proxy(log_dir, upstream, name)
    if tree is not None:  # that checkout's proxy/ first on sys.path (`-m` would put this one's, the cwd, first)
        at = service.argv.index("--host")
        start = f"import sys; sys.path.insert(0, {str(tree)!r}); from proxy.cli import main; sys.exit(main())"
        service.argv = [sys.executable, "-m", "bench.nofile", "--", sys.executable, "-c", start, *service.argv[at:]]
    return service


def collapse(raw: Path, top: int) -> str:
    """py-spy's collapsed stacks as two tables: own samples and inclusive samples, per function."""
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        frames = [f.split(" (", 1)[0] + " " + _where(f) for f in stack.split(";") if f]
        if frames:
            own[frames[-1]] += count
        for frame in set(frames):
            inclusive[frame] += count
    lines = [f"{total} samples", "", "own %  function"]
    lines += [f"{n / total:6.1%}  {f}" for f, n in own.most_common(top)]
    lines += ["", "incl % function"]
    lines += [f"{n / total:6.1%}  {f}" for f, n in inclusive.most_common(top)]
    return "\n".join(lines)


def _where(frame: str) -> str:
    """`file.py` of a py-spy frame `name (path/file.py:line)`, without the line, so a function is one row."""
    inside = frame.partition(" (")[2].rstrip(")")
    path = inside.rpartition(":")[0] or inside
    parts = Path(path).parts
    return "/".join(parts[-2:]) if parts else path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tree", type=Path, action="append", help="a checkout whose proxy/ to run (repeatable)")
    parser.add_argument("--py-spy", type=Path, help="write py-spy's collapsed stacks of the last round here")
    parser.add_argument("--top", type=int, default=40)
    args = parser.parse_args(argv)
    trees: list[Path | None] = list(args.tree or [None])
    with tempfile.TemporaryDirectory(prefix="flex-profile-") as tmp:
        work = Path(tmp)
        script = wrk.write_script(work / "chat.lua", SMALL_CHAT_BODY)
        threads = 1 if args.connections == 1 else 2
        with nginx.canned(work) as canned:
            upstream = f"http://127.0.0.1:{canned.port}/v1"
            proxies = [_proxy(work, tree, upstream, f"proxy-{i}") for i, tree in enumerate(trees)]
            with procs.running(*proxies):
                for proxy in proxies:  # warm-up
                    wrk.run(f"http://127.0.0.1:{proxy.port}{PATH}", script, threads=2, connections=32, duration_s=2)
                cpu: dict[int, list[float]] = {i: [] for i in range(len(proxies))}
                for round_ in range(args.rounds):
                    order = list(enumerate(proxies))
                    if round_ % 2:
                        order.reverse()
                    for i, proxy in order:
                        url = f"http://127.0.0.1:{proxy.port}{PATH}"
                        spy = None
                        if args.py_spy is not None and round_ == args.rounds - 1:
                            spy = _spy(proxy.pid, args.py_spy.with_suffix(f".{i}.txt"), args.seconds)
                        figures = measure(url, script, proxy.pid, threads, args.connections, args.seconds)
                        if spy is not None:
                            spy.wait(60)
                        cpu[i].append(figures["server_cpu_us_per_request"])
                        print(f"round {round_} tree {trees[i] or '.'}: {figures['requests_per_s']:,.0f} req/s, "
                              f"p50 {figures['p50_ms']:.3f} ms, CPU {figures['server_cpu_us_per_request']:.1f} "
                              f"µs/req", flush=True)  # fmt: skip
        for i, tree in enumerate(trees):
            print(f"tree {tree or '.'}: CPU µs/req median {median(cpu[i]):.1f} of {cpu[i]}")
    if args.py_spy is not None:
        for i in range(len(trees)):
            raw = args.py_spy.with_suffix(f".{i}.txt")
            if raw.exists():
                print(f"\n# py-spy, tree {trees[i] or '.'}\n" + collapse(raw, args.top))
    return 0


def _spy(pid: int, out: Path, seconds: float) -> subprocess.Popen[bytes]:
    binary = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    argv = [binary, "record", "--pid", str(pid), "--rate", "250", "--duration", str(int(seconds)),
            "--format", "raw", "--output", str(out), "--nonblocking"]  # fmt: skip
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


if __name__ == "__main__":
    sys.exit(main())
