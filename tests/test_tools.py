"""tests/tools.py: a missing program skips its test with the program's name and how to install it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from tools import HOW, find, need


def test_a_missing_tool_skips_naming_it_and_how_to_install_it() -> None:
    with pytest.raises(pytest.skip.Exception, match=r"needs promtool-missing-here, which is not installed"):
        need("promtool-missing-here")
    HOW["promtool-missing-here"] = "apt-get install prometheus"
    try:
        with pytest.raises(pytest.skip.Exception, match=r"\(apt-get install prometheus; bash \.ci/run installs it\)"):
            need("promtool-missing-here")
    finally:
        del HOW["promtool-missing-here"]


def test_a_present_tool_is_found_beside_this_interpreter_first() -> None:
    beside = Path(sys.executable).parent / "python"
    assert need(Path(sys.executable).name) and find("python") == str(beside)


def test_the_needs_marker_skips_before_the_test_runs_and_says_why(tmp_path: Path) -> None:
    """A test marked with a missing program, run by pytest with this suite's conftest: skipped, with the reason
    printed, and its body never run."""
    marked = tmp_path / "test_marked.py"
    marked.write_text(
        "import pytest\n\n\n"
        "@pytest.mark.needs('no-such-program-anywhere')\n"
        "def test_marked():\n"
        "    raise AssertionError('the body ran')\n"
    )
    tests = Path(__file__).parent
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-c", str(tests.parent / "pyproject.toml"),
         "-p", "conftest", str(marked)],
        cwd=tests.parent, env=os.environ | {"PYTHONPATH": str(tests)}, capture_output=True, text=True, timeout=120,
        check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 skipped" in result.stdout and "the body ran" not in result.stdout
    assert "SKIPPED [1]" in result.stdout and "needs no-such-program-anywhere, which is not installed" in result.stdout
