"""The two README commands build the environments they should."""

from __future__ import annotations

import subprocess
from pathlib import Path

ROOT = Path(__file__).parents[1]


def _plan(target: str) -> str:
    """What ``make TARGET`` would run in a fresh checkout (``-B``: as if nothing were built)."""
    return subprocess.run(["make", "-n", "-B", target], cwd=ROOT, capture_output=True,
                          text=True, check=True).stdout


def test_the_served_environment_holds_no_test_plugin() -> None:
    serve = _plan("serve")
    installs = [line for line in serve.splitlines() if "pip install" in line]
    assert installs, serve
    for line in installs:
        assert "tests/thirdparty" not in line and "[test]" not in line, line
    assert "worldhost serve" in serve


def test_the_test_environment_is_another_one() -> None:
    test = _plan("test")
    assert "tests/thirdparty" in test and "[test]" in test
    venv = next(line.split()[-1] for line in test.splitlines() if " -m venv " in line)
    served = next(line.split()[-1] for line in _plan("serve").splitlines() if " -m venv " in line)
    assert venv != served
