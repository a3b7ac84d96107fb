"""``worldhost new-plugin NAME``: the template a plugin author starts from runs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import hypothesis.strategies as st
import pytest
from hypothesis import given, settings

from host import scaffold


def worldhost(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "host", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=60)


def test_the_new_plugin_passes_its_own_tests(tmp_path: Path) -> None:
    made = worldhost("new-plugin", "demo", cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    project = tmp_path / "worldhost-demo"
    assert sorted(p.relative_to(project).as_posix() for p in project.rglob("*") if p.is_file()) \
        == ["README.md", "pyproject.toml", "tests/test_demo.py", "worldhost_demo/__init__.py"]
    pyproject = (project / "pyproject.toml").read_text()
    assert '[project.entry-points.worldhost]\ndemo = "worldhost_demo"' in pyproject
    assert "{{" not in "".join(p.read_text() for p in project.rglob("*") if p.is_file())
    # The generated tests, run as their author would (the module is on the path
    # through its pytest config, so nothing needs installing).
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}
    ran = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"],
                         cwd=project, capture_output=True, text=True, timeout=120, env=env)
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert "3 passed" in ran.stdout


def test_new_plugin_refuses_to_overwrite(tmp_path: Path) -> None:
    assert worldhost("new-plugin", "demo", "--dir", str(tmp_path), cwd=tmp_path).returncode == 0
    module = tmp_path / "worldhost-demo" / "worldhost_demo" / "__init__.py"
    module.write_text("# mine\n")
    again = worldhost("new-plugin", "demo", "--dir", str(tmp_path), cwd=tmp_path)
    assert again.returncode == 2
    assert "already exists; not overwriting" in again.stderr
    assert module.read_text() == "# mine\n"


@pytest.mark.parametrize(("name", "why"), [
    ("Bad-Name", "lowercase letters"), ("9lives", "starting with a letter"),
    ("class", "lowercase letters"), ("map", "already uses it"), ("session", "already uses it"),
])
def test_new_plugin_refuses_a_bad_name(tmp_path: Path, name: str, why: str) -> None:
    refused = worldhost("new-plugin", name, cwd=tmp_path)
    assert refused.returncode == 2
    assert f"invalid plugin name {name!r}" in refused.stderr and why in refused.stderr
    assert list(tmp_path.iterdir()) == []


@settings(deadline=None)  # the first example loads the built-ins' names
@given(st.text(max_size=50))
def test_any_name_is_either_a_valid_identifier_or_refused_naming_it(name: str) -> None:
    try:
        scaffold.check_name(name)
    except scaffold.ScaffoldError as exc:
        assert repr(name) in str(exc)
    else:
        assert name.isidentifier() and name.islower() and name.isascii()
