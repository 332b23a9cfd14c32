"""tests/tools.py: a missing program skips its test with the program's name and how to install it."""

from __future__ import annotations

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


@pytest.mark.needs("no-such-program-anywhere")
def test_the_needs_marker_skips_before_the_test_runs() -> None:
    pytest.fail("the marker should have skipped this test")
