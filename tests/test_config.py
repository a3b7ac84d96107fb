"""The config file: strict keys and types, one line naming the file and key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from host import config
from host.server import Host, StartupError


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "c.toml"
    path.write_text(text)
    return path


def test_the_shipped_config_loads() -> None:
    cfg = config.load(Path(__file__).parents[1] / "plugins.toml")
    assert cfg.host.port == 8765 and cfg.store.durability == "journal"
    assert set(cfg.plugins) >= {"map", "simulation", "process_controller", "navigation",
                                "session_cleanup", "chat"}


@pytest.mark.parametrize("text, words", [
    ("[host]\nprot = 1\n", ["c.toml", "host.prot", "unknown"]),
    ("[host]\nport = 'x'\n", ["c.toml", "host.port", "int"]),
    ("[store]\ndurability = 'maybe'\n", ["c.toml", "store.durability"]),
    ("[host.limits]\noutbox_size = 1.5\n", ["c.toml", "host.limits.outbox_size"]),
    ("[nonsense]\n", ["c.toml", "nonsense"]),
    ("[host\n", ["c.toml", "TOML"]),
])
def test_bad_config_is_one_line_naming_file_and_key(tmp_path: Path, text: str,
                                                     words: list[str]) -> None:
    with pytest.raises(config.ConfigError) as err:
        config.load(write(tmp_path, text))
    message = str(err.value)
    assert "\n" not in message
    for word in words:
        assert word in message


def test_plugin_settings_are_checked_too(tmp_path: Path) -> None:
    cfg = config.load(write(tmp_path, "[plugins.map]\nmax_nodez = 5\n"))
    with pytest.raises(config.ConfigError, match="plugins.map.max_nodez"):
        Host(cfg, db=str(tmp_path / "w.db"))
    cfg = config.load(write(tmp_path, "[plugins.map]\nmax_nodes = 'many'\n"))
    with pytest.raises(config.ConfigError, match="plugins.map.max_nodes"):
        Host(cfg, db=str(tmp_path / "w.db"))


def test_a_plugin_that_cannot_be_imported_stops_startup(tmp_path: Path) -> None:
    cfg = config.load(write(tmp_path, "[plugins.ghost]\nmodule = 'no_such_module_here'\n"))
    with pytest.raises(StartupError, match="ghost"):
        Host(cfg, db=str(tmp_path / "w.db"))


def test_cli_flags_override_the_file(tmp_path: Path) -> None:
    cfg = config.override(config.load(write(tmp_path, "[host]\nport = 1\n")), port=0,
                          db="x.db", host=None)
    assert cfg.host.port == 0 and cfg.host.db == "x.db" and cfg.host.bind == "127.0.0.1"


def test_serve_refuses_a_bad_config_with_one_line(tmp_path: Path) -> None:
    path = write(tmp_path, "[host]\nport = 'eighty'\n")
    result = subprocess.run([sys.executable, "-m", "host", "serve", "--config", str(path)],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "host.port" in lines[0] and str(path) in lines[0]


def test_the_old_name_of_bind_is_still_read_and_both_at_once_refused() -> None:
    assert config.from_dict({"host": {"host": "0.0.0.0"}}).host.bind == "0.0.0.0"
    assert config.from_dict({"host": {"bind": "::1"}}).host.bind == "::1"
    with pytest.raises(config.ConfigError, match="'host.host' and 'host.bind'"):
        config.from_dict({"host": {"host": "0.0.0.0", "bind": "::1"}}, "x.toml")
