"""The docs cover what the host serves."""

from __future__ import annotations

import re
from pathlib import Path

from host import config as config_mod
from host.server import Host

DOCS = Path(__file__).parents[1] / "docs"


def test_every_action_is_documented_with_its_role() -> None:
    host = Host(config_mod.Config(), entry_points=False, db=":memory:")
    text = (DOCS / "actions.md").read_text()
    for name, action in host.registry.actions.items():
        if action.internal:
            continue
        row = re.search(rf"^\| `{re.escape(name)}` \|.*$", text, re.M)
        assert row, f"{name} is not in docs/actions.md"
        if not name.startswith("session."):
            assert f"| {action.role.name} |" in row.group(0), f"{name}: role not documented"


def test_every_config_key_is_documented() -> None:
    text = (DOCS / "configuration.md").read_text()
    cfg = config_mod.Config()
    for section in ("host", "sessions", "store"):
        for key in getattr(cfg, section).__struct_fields__:
            if key == "limits":
                continue
            assert f"`{key}`" in text, f"{section}.{key} is not in docs/configuration.md"
    for key in cfg.host.limits.__struct_fields__:
        assert f"`{key}`" in text, f"host.limits.{key} is not in docs/configuration.md"


def test_the_readme_has_the_two_commands() -> None:
    readme = (DOCS.parent / "README.md").read_text()
    assert "make serve" in readme and "make test" in readme
