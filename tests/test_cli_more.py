"""The command line and the Python client as a new user meets them (issue #11):
becoming admin, timeouts and connection state, introspection, offline tools on a
live store, bare import files, one error shape."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import shlex
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from trio_websocket import open_websocket_url

from host import cli
from host.client import CallError, CallTimeout, connect
from host.testing import open_harness
from serverproc import ServerProcess, free_port

NODE = {"id": "depot", "x": 0, "y": 0, "building": {"type": "depot"}}
MAP = {"nodes": [{"id": "a", "x": 0, "y": 0}, {"id": "b", "x": 3, "y": 4}],
       "edges": [{"id": "ab", "from": "a", "to": "b", "length": 5}]}


class Ran:
    def __init__(self, returncode: int, stdout: str, stderr: str) -> None:
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


def run_cli(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None) -> Ran:
    """``worldhost ARGS`` run in this process (the same code as the command, without
    a Python start-up per call), in ``cwd``, with ``env`` added to a clean environment."""
    out, err = io.StringIO(), io.StringIO()
    saved_env, saved_cwd = dict(os.environ), os.getcwd()
    for name in ("WORLDHOST_ADMIN_TOKEN", "WORLDHOST_TOKEN"):
        os.environ.pop(name, None)
    os.environ.update(env or {})
    try:
        if cwd is not None:
            os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = cli.main(list(args))
            except SystemExit as exit_:
                code = int(exit_.code or 0)
    finally:
        os.chdir(saved_cwd)
        os.environ.clear()
        os.environ.update(saved_env)
    return Ran(code, out.getvalue(), err.getvalue())


class Serve:
    """``worldhost serve`` in a directory, keeping what it prints before it listens."""

    def __init__(self, cwd: Path, *args: str, env: dict[str, str] | None = None) -> None:
        base = {k: v for k, v in os.environ.items() if k != "WORLDHOST_ADMIN_TOKEN"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "host", "serve", "--port", "0", *args], cwd=cwd,
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
            env={**base, "WORLDHOST_LOG": "WARNING", "PYTHONPATH": str(Path.cwd()),
                 **(env or {})})
        assert self.proc.stdout is not None
        self.printed: list[str] = []
        for line in self.proc.stdout:
            if line.startswith("listening on "):
                self.url = line.split()[-1]
                return
            self.printed.append(line)
        raise RuntimeError(f"serve did not start: {self.printed}")

    def stop(self) -> None:
        self.proc.terminate()
        assert self.proc.wait(10) == 0


# 11.10: becoming admin ---------------------------------------------------------------
def test_serve_creates_an_admin_token_once_and_call_admin_uses_it(tmp_path: Path) -> None:
    (tmp_path / "map.json").write_text(json.dumps({"map_data": MAP}))
    first = Serve(tmp_path, "--db", "data/world.db")
    try:
        token_file = tmp_path / "data" / "world.db.admin-token"
        token = token_file.read_text().strip()
        assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
        shown = "".join(first.printed)
        assert token in shown and "worldhost call --admin --db data/world.db" in shown
        as_player = run_cli("call", "--url", first.url, "map.import", "@map.json", cwd=tmp_path)
        assert as_player.returncode == 1 and "--admin" in as_player.stderr
        assert json.loads(as_player.stdout)["code"] == "forbidden"
        done = run_cli("call", "--admin", "--db", "data/world.db", "--url", first.url,
                       "map.import", "@map.json", cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout) == {"nodes": 2, "edges": 1}
    finally:
        first.stop()
    again = Serve(tmp_path, "--db", "data/world.db")
    try:
        assert again.printed == []  # printed once, when created
        assert token_file.read_text().strip() == token  # and reused
        seen = run_cli("call", "--url", again.url, "world.snapshot", '{"slices": ["map"]}',
                       cwd=tmp_path)
        assert sorted(json.loads(seen.stdout)["slices"]["map"]) == ["edge:ab", "node:a",
                                                                    "node:b"]
        # --token and WORLDHOST_ADMIN_TOKEN win over the file
        wrong = run_cli("call", "--admin", "--db", "data/world.db", "--token", "nope",
                        "--url", again.url, "host.ping", cwd=tmp_path)
        assert wrong.returncode == 1 and json.loads(wrong.stdout)["code"] == "unauthenticated"
        env_wrong = run_cli("call", "--admin", "--db", "data/world.db", "--url", again.url,
                            "host.ping", cwd=tmp_path, env={"WORLDHOST_ADMIN_TOKEN": "nope"})
        assert json.loads(env_wrong.stdout)["code"] == "unauthenticated"
    finally:
        again.stop()


def test_the_readme_quick_start_makes_an_admin_and_imports_a_map(tmp_path: Path) -> None:
    """The README's commands, as written, against ``make serve``'s command line."""
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    block = next(b for b in readme.split("```sh\n")[1:] if "map.import" in b).split("```")[0]
    heredoc = re.search(r"cat > (\S+) <<'EOF'\n(.*?)\nEOF\n", block, re.S)
    assert heredoc is not None
    (tmp_path / heredoc.group(1)).write_text(heredoc.group(2))
    commands = [shlex.split(line)[1:] for line in block.splitlines()
                if line.startswith(".venv/bin/worldhost ")]
    assert any("--admin" in c for c in commands)
    server = Serve(tmp_path, "--config", str(Path(__file__).parents[1] / "plugins.toml"))
    try:
        assert server.printed  # the admin token, shown once
        outputs = []
        for command in commands:
            done = run_cli(*command, "--url", server.url, cwd=tmp_path)
            assert done.returncode == 0, (command, done.stdout, done.stderr)
            outputs.append(done.stdout)
        snapshot = next(json.loads(o) for o, c in zip(outputs, commands)
                        if c[:2] == ["call", "world.snapshot"])
        assert {"node:depot", "node:shop"} <= set(snapshot["slices"]["map"])
    finally:
        server.stop()


def test_the_config_finds_the_token_and_token_auth_accepts_it(tmp_path: Path) -> None:
    config = tmp_path / "host.toml"
    config.write_text(f'[host]\nauth = "token"\ndb = "{tmp_path / "w.db"}"\n'
                      f'[host.tokens]\n"{hashlib.sha256(b"p").hexdigest()}" = "player"\n')
    server = Serve(tmp_path, "--config", str(config))
    try:
        assert (tmp_path / "w.db.admin-token").exists()
        # the url comes from the config too
        done = run_cli("call", "--admin", "--config", str(config), "--url", server.url,
                       "sessions.stats")
        assert done.returncode == 0, done.stdout + done.stderr
        missing = run_cli("call", "--admin", "--db", str(tmp_path / "other.db"),
                          "--url", server.url, "host.ping")
        assert missing.returncode == 2 and "other.db.admin-token" in missing.stderr
    finally:
        server.stop()


def test_no_token_file_for_a_configured_admin_or_a_memory_store(tmp_path: Path) -> None:
    configured = Serve(tmp_path, "--db", "w.db", env={"WORLDHOST_ADMIN_TOKEN": "adm"})
    configured.stop()
    memory = Serve(tmp_path, "--db", ":memory:")
    memory.stop()
    assert configured.printed == [] and memory.printed == []
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".admin-token")]


# 11.11: the client's timeouts and state --------------------------------------------------
def test_a_call_while_the_host_is_down_times_out_and_state_says_resuming(
        tmp_path: Path) -> None:
    server = ServerProcess(tmp_path / "w.db", port=free_port()).start()

    async def main() -> list[str]:
        states: list[str] = []
        async with connect(server.url, name="ada", timeout=10) as ada:
            assert ada.state == "open"

            async def watch() -> None:
                async for state in ada.state_changes():
                    states.append(state)

            async def until(state: str) -> None:
                with trio.fail_after(15):
                    while ada.state != state:
                        await trio.sleep(0.02)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(watch)
                await ada.call("chat.say", text="before")
                await trio.to_thread.run_sync(server.stop)
                await until("resuming")
                with pytest.raises(CallTimeout) as timed_out:
                    await ada.call("chat.say", text="lost", timeout=0.3)
                assert isinstance(timed_out.value, TimeoutError)
                assert "resuming" in str(timed_out.value) and "request_id=" in str(
                    timed_out.value)
                await trio.to_thread.run_sync(server.start)
                await until("open")
                history = await ada.call("chat.history")
                assert [m["text"] for m in history["messages"]] == ["before"]
                await ada.aclose()
        return states

    try:
        states = trio.run(main)
    finally:
        server.stop()
    assert states == ["open", "resuming", "open", "offline"]


# 11.12: introspection -------------------------------------------------------------------
async def test_host_describe_publishes_params_role_and_changes(worldhost: Any) -> None:
    h = await worldhost.start(listen=True)
    async with connect(h.url, name="ada") as ada:
        described = {a["name"]: a for a in (await ada.call("host.describe"))["actions"]}
        assert set(described) == set(ada.server_info["actions"])
        imp = described["map.import"]
        assert imp["role"] == "admin" and imp["changes_world"] and imp["plugin"] == "map"
        schema = imp["params"]
        assert schema["$defs"]["ImportParams"]["required"] == ["map_data"]
        assert described["world.snapshot"]["changes_world"] is False
        assert described["map.export"]["params"] == {"type": "object", "maxProperties": 0}
        one = await ada.call("host.describe", actions=["chat.say"])
        assert [a["name"] for a in one["actions"]] == ["chat.say"]
        with pytest.raises(CallError) as err:
            await ada.call("host.describe", actions=["chat.say", "sessions.create"])
        assert err.value.code == "not_found" and err.value.details["unknown"] == [
            "sessions.create"]


SERVED = ["host.ping", "host.describe", "world.snapshot", "session.open"]  # the core's
HIDDEN = ["sessions.create", "world.replace_slices"]  # internal: not for clients


@given(st.lists(st.one_of(st.sampled_from(SERVED + HIDDEN), st.text(max_size=12)),
                max_size=6))
@settings(max_examples=15, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
async def test_host_describe_takes_any_list_of_names(tmp_path: Path, names: list[str]) -> None:
    async with open_harness(tmp_path) as harness:
        h = await harness.start(builtins=False, db=Path(":memory:"))
        async with h.client("ada") as ada:
            unknown = [n for n in names if n not in SERVED]
            if unknown:
                with pytest.raises(CallError) as err:
                    await ada.call("host.describe", actions=names)
                assert err.value.code == "not_found"
                assert err.value.details == {"path": "params.actions", "unknown": unknown}
            else:
                described = await ada.call("host.describe", actions=names)
                assert [a["name"] for a in described["actions"]] == names
            assert await ada.call("host.ping", still="here") == {"still": "here"}


async def test_host_describe_bounds_the_names_it_echoes(tmp_path: Path) -> None:
    async with open_harness(tmp_path) as harness:
        h = await harness.start(builtins=False, db=Path(":memory:"))
        async with h.client("ada") as ada:
            for names in (["x" * 129], ["nope"] * 1001):
                with pytest.raises(CallError) as err:
                    await ada.call("host.describe", actions=names)
                assert err.value.code == "validation_error"
                assert err.value.details["path"].startswith("params.actions")


def test_worldhost_actions_lists_them(tmp_path: Path) -> None:
    server = ServerProcess(tmp_path / "w.db").start()
    try:
        table = run_cli("actions", "--url", server.url)
        assert table.returncode == 0, table.stderr
        rows = {line.split()[0]: line.split()[1:3] for line in table.stdout.splitlines()[1:]}
        assert rows["map.import"] == ["admin", "changes"]
        assert rows["world.snapshot"] == ["viewer", "reads"]
        full = run_cli("actions", "--url", server.url, "--json", "map.add_node")
        [node] = json.loads(full.stdout)
        assert set(node["params"]["$defs"]["Node"]["required"]) == {"id", "x", "y"}
    finally:
        server.stop()


# 11.13: offline tools on a live store ----------------------------------------------------
def test_inspect_and_export_read_a_live_store_import_still_refuses(tmp_path: Path) -> None:
    config = tmp_path / "slow.toml"  # no checkpoint for a while: changes stay in the journal
    config.write_text("[store]\ndebounce_s = 60.0\nmax_delay_s = 120.0\n")
    server = ServerProcess(tmp_path / "w.db", config=config).start()
    try:
        run_cli("call", "--url", server.url, "map.add_node", json.dumps(NODE))
        info = run_cli("inspect", str(server.db))
        assert info.returncode == 0, info.stderr
        assert json.loads(info.stdout)["replayed"] >= 1  # the journal the host has not folded
        out = tmp_path / "live.json"
        done = run_cli("export", str(server.db), "--out", str(out))
        assert done.returncode == 0, done.stderr
        assert "node:depot" in json.loads(out.read_text())["slices"]["map"]["data"]
        # the host goes on writing after the tools have read
        again = run_cli("call", "--url", server.url, "chat.say", '{"text": "still here"}')
        assert again.returncode == 0, again.stderr
        (tmp_path / "m.json").write_text(json.dumps(MAP))
        refused = run_cli("import", str(server.db), str(tmp_path / "m.json"))
        assert refused.returncode == 2 and "in use" in refused.stderr
    finally:
        server.stop()


def test_inspect_does_not_write_the_store(tmp_path: Path) -> None:
    server = ServerProcess(tmp_path / "w.db").start()
    run_cli("call", "--url", server.url, "map.add_node", json.dumps(NODE))
    server.kill9()
    before = server.db.read_bytes()
    info = run_cli("inspect", str(server.db))
    assert info.returncode == 0, info.stderr
    assert json.loads(info.stdout)["journal_length"] >= 1
    assert server.db.read_bytes() == before
    (tmp_path / "junk.db").write_bytes(b"not sqlite" * 100)
    junk = run_cli("inspect", str(tmp_path / "junk.db"))
    assert junk.returncode == 2 and "junk.db" in junk.stderr


# 11.14: bare import files -----------------------------------------------------------------
def test_import_takes_a_bare_map_data(tmp_path: Path) -> None:
    bare = tmp_path / "bare.json"
    bare.write_text(json.dumps(MAP))
    db = tmp_path / "w.db"
    done = run_cli("import", str(db), str(bare))
    assert done.returncode == 0, done.stderr
    out = tmp_path / "out.json"
    run_cli("export", str(db), "--out", str(out))
    assert sorted(json.loads(out.read_text())["slices"]["map"]["data"]) == [
        "edge:ab", "node:a", "node:b"]
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"vertices": []}))
    refused = run_cli("import", str(db), str(other))
    assert refused.returncode == 2
    assert '"map_data"' in refused.stderr and "{nodes, edges}" in refused.stderr


# 11.16: one error shape ---------------------------------------------------------------------
def test_call_prints_the_error_as_the_wire_sends_it(tmp_path: Path) -> None:
    server = ServerProcess(tmp_path / "w.db").start()

    async def wire() -> dict[str, Any]:
        async with open_websocket_url(server.url) as ws:
            await ws.get_message()
            await ws.send_message(json.dumps({"id": 1, "action": "session.open",
                                              "params": {"name": "x"}}))
            await ws.get_message()
            await ws.send_message(json.dumps({"id": 2, "action": "map.remove_node",
                                              "params": {"id": "zz"}}))
            while True:
                msg = json.loads(await ws.get_message())
                if msg.get("re") == 2:
                    return msg["data"]

    try:
        done = run_cli("call", "--url", server.url, "map.remove_node", '{"id": "zz"}')
        assert done.returncode == 1
        assert json.loads(done.stdout) == trio.run(wire)
    finally:
        server.stop()
