"""`python -m bench.nofile CMD ...`: raise the soft open-files limit to the hard one, then exec CMD.

A held request costs the proxy two sockets, so 8,000 of them need more than the usual soft limit of 1,024.
In production the same is done by the container's `nofile` ulimit or systemd's LimitNOFILE.
"""

from __future__ import annotations

import os
import resource
import shutil
import sys


def raise_nofile() -> int:
    """Set the soft RLIMIT_NOFILE to the hard limit; returns the new soft limit."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def main(argv: list[str]) -> None:
    if argv[:1] == ["--"]:
        argv = argv[1:]
    if not argv:
        raise SystemExit("usage: python -m bench.nofile [--] CMD [ARG ...]")
    raise_nofile()
    program = shutil.which(argv[0]) or argv[0]
    os.execv(program, argv)


if __name__ == "__main__":
    main(sys.argv[1:])
