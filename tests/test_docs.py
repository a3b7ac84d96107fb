"""The docs cover what the host serves."""

from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import Any

import trio

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
    for section in ("host", "sessions", "store", "worlds"):
        for key in getattr(cfg, section).__struct_fields__:
            if key == "limits":
                continue
            assert f"`{key}`" in text, f"{section}.{key} is not in docs/configuration.md"
    for key in cfg.host.limits.__struct_fields__:
        assert f"`{key}`" in text, f"host.limits.{key} is not in docs/configuration.md"


def test_every_transport_key_is_documented() -> None:
    text = (DOCS / "configuration.md").read_text()
    assert "## `[transports.tcp]`" in text
    for key in config_mod.Config().transports.tcp.__struct_fields__:
        assert f"| `{key}` |" in text.split("## `[transports.tcp]`")[1], \
            f"transports.tcp.{key} is not in docs/configuration.md"


def test_the_readme_has_the_two_commands() -> None:
    readme = (DOCS.parent / "README.md").read_text()
    assert "make serve" in readme and "make test" in readme


# --- what a plugin author reads (issue #11) -------------------------------------------

def _python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, re.S)


def test_every_name_plugins_md_imports_exists() -> None:
    """docs/plugins.md says a plugin imports everything from ``host``: every name it
    imports (from ``host`` or an older path) exists there."""
    import importlib

    code = "\n".join(_python_blocks((DOCS / "plugins.md").read_text()))
    imports = re.findall(r"^from ([\w.]+) import (\([^)]*\)|[^\n]+)", code, re.M)
    checked = set()
    for module, names in imports:
        found = importlib.import_module(module)
        for name in (n.strip() for n in names.strip("()").split(",")):
            if name:
                assert hasattr(found, name), f"docs/plugins.md imports {name} from {module}"
                checked.add((module, name))
    import host
    assert {("host", name) for name in host.__all__} <= checked  # the list is shown whole


def _complete_plugin() -> str:
    text = (DOCS / "plugins.md").read_text()
    section = text.split("## A complete plugin", 1)[1].split("\n## ", 1)[0]
    (block,) = _python_blocks(section)
    return block


def test_the_complete_plugin_is_the_counter_plugin() -> None:
    source = DOCS.parent / "tests" / "thirdparty" / "worldhost_counter" / "__init__.py"
    assert _complete_plugin() == source.read_text()


async def test_the_complete_plugin_in_the_docs_runs(tmp_path: Path) -> None:
    """The block in docs/plugins.md, as a module of its own through the harness, serves
    what docs/testing.md calls on it (counter.add, counter.get, the path of a bad n)."""
    import importlib
    import sys

    from host.client import CallError
    from host.testing import open_harness

    (tmp_path / "docs_counter.py").write_text(_complete_plugin())
    sys.path.insert(0, str(tmp_path))
    try:
        module = importlib.import_module("docs_counter")
        async with open_harness(tmp_path) as harness:
            h = await harness.start(module, builtins=False)
            async with h.client("ada") as ada, h.client("bob") as bob:
                assert await ada.call("counter.add", n=2) == {"total": 2}
                assert (await bob.next_signal("counter.changed"))["data"] == {"total": 2}
                assert await bob.call("counter.get") == {"total": 2}
                try:
                    await ada.call("counter.add", n=0)
                except CallError as err:
                    assert err.details["path"] == "params.n"
                else:
                    raise AssertionError("n=0 was accepted")
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("docs_counter", None)


def test_protocol_md_is_the_whole_contract() -> None:
    """No reference to a contract outside the repository, and every error code the
    host can send is in its table."""
    from host import actions

    text = (DOCS / "protocol.md").read_text()
    assert "PROTOCOL.md" not in text
    codes = {cls.code for cls in vars(actions).values()
             if isinstance(cls, type) and issubclass(cls, actions.ActionError)}
    codes |= {"bad_frame", "internal_error"}
    for code in codes:
        assert re.search(rf"^\| `{code}` \|", text, re.M), f"error code {code} not in the table"
    for needed in ("session.open", "session.resume", "session.close", "host.ping",
                   "world.snapshot", "files.md", "1009", "1008", "chunk"):
        assert needed in text, needed


async def test_a_clean_restart_keeps_the_replay_as_protocol_md_says(tmp_path: Path) -> None:
    import json

    from host.testing import open_harness, raw_connection

    assert "**Across a restart** (clean, or `kill -9`), the replay comes from the outbound log" \
        in " ".join((DOCS / "protocol.md").read_text().split())
    async with open_harness(tmp_path) as harness:
        h = await harness.start()
        async with h.client("ada", reconnect=False) as ada, \
                h.client("bob", reconnect=False) as bob:
            await ada.call("host.ping")
            token, sid, last = ada.resume_token, ada.session_id, ada.last_seq
            await bob.call("chat.say", text="ada misses this")
            await ada.next_signal("chat.message")
        await h.restart()  # clean: stop, then start on the same store
        async with raw_connection(h) as ws:
            await ws.get_message()  # server.info
            await ws.send_message(json.dumps({"id": 1, "action": "session.resume", "params": {
                "session_id": sid, "resume_token": token, "last_seq": last}}))
            reply = json.loads(await ws.get_message())
            assert reply["signal"] == "session.resumed", reply
            assert reply["data"]["complete"] is True and reply["data"]["replayed"] == 1
            replayed = json.loads(await ws.get_message())
            assert replayed["signal"] == "chat.message" and replayed["seq"] == last + 1


def test_files_md_matches_an_export(tmp_path: Path) -> None:
    """The export file and the keyed-slice keys are as docs/files.md shows them, and a
    map file needs its map_data wrapper."""
    import json
    import subprocess
    import sys

    text = (DOCS / "files.md").read_text()
    db = tmp_path / "w.db"

    def worldhost(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "host", *args], capture_output=True,
                              text=True, timeout=60, cwd=tmp_path)

    graph = {"nodes": [{"id": "a", "x": 0, "y": 0, "building": {"type": "depot"}},
                       {"id": "b", "x": 3, "y": 4}],
             "edges": [{"id": "ab", "from": "a", "to": "b", "length": 5, "speed": 1}]}
    (tmp_path / "bare.json").write_text(json.dumps(graph))
    assert worldhost("import", str(db), "bare.json").returncode == 0
    assert "a bare `map_data`" in text
    (tmp_path / "map.json").write_text(json.dumps({"map_data": graph}))
    assert worldhost("import", str(db), "map.json").returncode == 0
    exported = worldhost("export", str(db), "--out", "w.json")
    assert exported.returncode == 0, exported.stderr
    document = json.loads((tmp_path / "w.json").read_text())
    assert set(document) == {"format", "version", "world_id", "generation", "slices"}
    assert document["format"] == "worldhost-world" and document["version"] == 1
    assert '"format": "worldhost-world", "version": 1' in text
    assert not {"host", "sessions"} & set(document["slices"])
    for entry in document["slices"].values():
        assert set(entry) == {"version", "keyed", "data"}
    assert sorted(document["slices"]["map"]["data"]) == ["edge:ab", "node:a", "node:b"]
    assert "`node:ID`" in text and "`edge:ID`" in text
    assert "meta" in document["slices"]["simulation"]["data"]


async def test_a_relative_db_is_resolved_against_the_working_directory(
        tmp_path: Path, monkeypatch: Any) -> None:
    assert "resolved against the working directory" in (DOCS / "configuration.md").read_text()
    (tmp_path / "conf").mkdir()
    (tmp_path / "run").mkdir()
    (tmp_path / "conf" / "world.toml").write_text('[host]\ndb = "rel/w.db"\n')
    monkeypatch.chdir(tmp_path / "run")
    host = Host(config_mod.load(tmp_path / "conf" / "world.toml"), entry_points=False)
    async with trio.open_nursery() as nursery:
        await nursery.start(functools.partial(host.run, listen=False))
        host.stop()
    assert (tmp_path / "run" / "rel" / "w.db").exists()
    assert (tmp_path / "run" / "rel" / "w.server.db").exists()  # the server's, beside it
    assert not (tmp_path / "conf" / "rel").exists()


def test_testing_md_says_how_to_get_worldhost() -> None:
    """worldhost is not on the package index: the docs say to install it from a
    checkout or a wheel, and point to the template that runs."""
    text = (DOCS / "testing.md").read_text()
    assert "not published on the package index" in text
    assert "pip install path/to/worldhost" in text and ".whl" in text
    assert "worldhost new-plugin NAME" in text
    assert 'test = ["worldhost"' not in text


# --- links ---------------------------------------------------------------------------

def _anchor(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to '-'."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _without_code(text: str) -> str:
    return re.sub(r"```.*?```", "", text, flags=re.S)


def broken_links(files: list[Path]) -> list[str]:
    """Every relative link ``](path#anchor)`` in ``files`` whose file or heading is missing."""
    broken = []
    for page in files:
        for target in re.findall(r"\]\(([^)\s]+)\)", _without_code(page.read_text())):
            if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            linked = page.parent / path if path else page
            if not linked.exists():
                broken.append(f"{page.name}: {target} (no such file)")
            elif anchor and anchor not in {
                    _anchor(h) for h in re.findall(r"^#+ (.*)$",
                                                   _without_code(linked.read_text()), re.M)}:
                broken.append(f"{page.name}: {target} (no such heading)")
    return broken


def test_every_relative_link_and_anchor_resolves() -> None:
    files = [DOCS.parent / "README.md", *sorted(DOCS.glob("*.md"))]
    assert broken_links(files) == []


def test_the_link_check_finds_a_broken_link(tmp_path: Path) -> None:
    (tmp_path / "a.md").write_text("# Attacks — `python bench/attacks.py`\n")
    page = tmp_path / "b.md"
    page.write_text("[ok](a.md#attacks--python-benchattackspy) [no](c.md) "
                    "[bad](a.md#attacks) [self](#b) [web](https://x.org/y.md)\n\n# B\n"
                    "```\n[in code](d.md)\n```\n")
    assert broken_links([page]) == ["b.md: c.md (no such file)",
                                    "b.md: a.md#attacks (no such heading)"]


def test_security_md_names_every_bound_and_reads_in_order() -> None:
    """Every connection and session limit is on docs/security.md with its setting, and
    the page goes: what to put in front, each area's bounds, then the attack bench."""
    text = (DOCS / "security.md").read_text()
    cfg = config_mod.Config()
    for key in (*cfg.host.limits.__struct_fields__, *cfg.sessions.__struct_fields__):
        assert f"{key}`" in text, f"{key} is not in docs/security.md"
    sections = re.findall(r"<!-- section: (\w+) -->", text)
    assert sections[0] == "operator" and sections[-1] == "bench", sections
    assert len(sections) == len(set(sections)), sections


def test_architecture_md_names_every_module() -> None:
    """A newcomer finds, for any module, what it owns: each has its row."""
    root = DOCS.parent
    text = (DOCS / "architecture.md").read_text()
    modules = [p for folder in ("host", "state", "plugins") for p in (root / folder).rglob("*.py")
               if p.name != "__init__.py" or folder == "host" or p.parent.name != folder]

    def named(path: Path) -> str:  # in a package: `simulation/`, `simulation/hookspecs.py`
        if path.parent.parent == root:
            return path.name
        folder = path.parent.name
        return f"{folder}/" if path.name == "__init__.py" else f"{folder}/{path.name}"
    missing = sorted(str(p.relative_to(root)) for p in modules if f"`{named(p)}`" not in text)
    assert not missing, f"docs/architecture.md does not name {missing}"
