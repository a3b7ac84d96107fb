"""worldhost.js's reconnect, resend, ordering and chunking logic, under node's test runner
(tests/js/*.test.mjs against a scripted fake WebSocket)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

JS_TESTS = Path(__file__).with_name("js")


def test_client_js_unit_tests_pass_under_node() -> None:
    node = shutil.which("node")
    if node is None:
        if os.environ.get("CI") == "true":
            pytest.fail("node is not installed: CI must run the JavaScript client's tests")
        pytest.skip("node is not installed (needed for tests/js; install nodejs)")
    files = sorted(str(p) for p in JS_TESTS.glob("*.test.mjs"))
    assert files, "no JavaScript tests found"
    result = subprocess.run([node, "--test", *files], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    assert "# fail 0" in result.stdout
