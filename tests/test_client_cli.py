"""The Python client, the ``worldhost`` command, clean shutdown, and the offline tools."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import trio
from trio_websocket import ConnectionClosed, open_websocket_url

from host.client import CallError
from serverproc import ServerProcess


async def test_client_resends_unanswered_requests_once(worldhost: Any) -> None:
    h = await worldhost.start()
    async with h.client("ada") as ada, h.client("bob") as bob:
        async def say() -> None:
            await ada.call("chat.say", text="exactly once")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(say)
            await trio.sleep(0)
            await ada.drop()  # the connection drops with the request in flight
        history = (await bob.call("chat.history"))["messages"]
        assert [m["text"] for m in history] == ["exactly once"]
        assert ada.resumes == 1


async def test_a_repeated_id_gets_the_first_reply(worldhost: Any) -> None:
    h = await worldhost.start()
    async with h.client("ada") as ada:
        first = await ada.request("chat.say", {"text": "one"}, request_id="fixed")
        second = await ada.request("chat.say", {"text": "two"}, request_id="fixed")
        assert first["data"] == second["data"] and second["seq"] > first["seq"]
        history = (await ada.call("chat.history"))["messages"]
        assert [m["text"] for m in history] == ["one"]


async def test_signals_iterates_broadcasts(worldhost: Any) -> None:
    h = await worldhost.start()
    async with h.client("ada") as ada, h.client("bob") as bob:
        await ada.call("chat.say", text="hello")
        async for sig in bob.signals():
            if sig["signal"] == "chat.message":
                assert sig["data"]["text"] == "hello"
                break


def run_cli(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "host", *args], capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture
def server(tmp_path: Path) -> Any:
    proc = ServerProcess(tmp_path / "w.db").start()
    yield proc
    if proc.proc is not None and proc.proc.poll() is None:
        proc.stop()


def test_worldhost_call_prints_the_reply(server: ServerProcess) -> None:
    done = run_cli("call", "map.add_node", '{"id": "a", "x": 1, "y": 2}', "--url", server.url)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"node": {"id": "a", "x": 1.0, "y": 2.0, "building": None}}
    refused = run_cli("call", "map.remove_node", '{"id": "zz"}', "--url", server.url)
    assert refused.returncode == 1 and json.loads(refused.stdout)["code"] == "not_found"
    bad = run_cli("call", "host.ping", "{not json", "--url", server.url)
    assert bad.returncode == 2 and "not JSON" in bad.stderr


def test_sigterm_saves_closes_with_1001_and_exits_0(server: ServerProcess) -> None:
    async def hold() -> int:
        async with open_websocket_url(server.url) as ws:
            await ws.get_message()
            await ws.send_message(json.dumps({"id": 1, "action": "session.open",
                                              "params": {"name": "x"}}))
            await ws.get_message()
            await ws.send_message(json.dumps({"id": 2, "action": "chat.say",
                                              "params": {"text": "saved"}}))
            await ws.get_message()
            assert server.proc is not None
            server.proc.send_signal(signal.SIGTERM)
            try:
                while True:
                    await ws.get_message()
            except ConnectionClosed as closed:
                return closed.reason.code
    started = time.monotonic()
    assert trio.run(hold) == 1001
    assert server.stop(timeout=5) == 0
    assert time.monotonic() - started < 5
    wal = Path(str(server.db) + "-wal")
    assert not wal.exists() or wal.stat().st_size == 0
    conn = sqlite3.connect(server.db)
    assert conn.execute("SELECT count(*) FROM journal").fetchone()[0] == 0  # all checkpointed
    conn.close()


def test_serve_prints_listening_and_python_m_host_is_the_same_cli(tmp_path: Path) -> None:
    proc = ServerProcess(tmp_path / "w.db").start()
    try:
        assert proc.port > 0
    finally:
        assert proc.stop(signal.SIGINT) == 0
    script = Path(sys.executable).parent / "worldhost"  # the console script, as installed
    done = subprocess.run([str(script), "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "serve" in done.stdout


def test_inspect_export_import(tmp_path: Path) -> None:
    db = tmp_path / "w.db"
    config = tmp_path / "slow.toml"  # no checkpoint before the kill, however slow the calls
    config.write_text("[store]\ndebounce_s = 60.0\nmax_delay_s = 120.0\n")
    proc = ServerProcess(db, config=config).start()
    for action, params in (("map.add_node", '{"id": "a", "x": 1, "y": 2}'),
                           ("chat.say", '{"text": "kept"}')):
        done = run_cli("call", action, params, "--url", proc.url)
        assert done.returncode == 0, done.stderr
    refused = run_cli("import", str(db), str(tmp_path / "nothing.json"))
    proc.kill9()
    out = run_cli("inspect", str(db))
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert info["format_version"] == 2 and info["journal_length"] >= 2
    assert {s["name"] for s in info["slices"]} >= {"map", "chat"}  # sessions: the server's store
    for suffix in ("json", "cbor"):
        target = tmp_path / f"world.{suffix}"
        assert run_cli("export", str(db), "--out", str(target)).returncode == 0
        fresh = tmp_path / f"fresh-{suffix}.db"
        done = run_cli("import", str(fresh), str(target))
        assert done.returncode == 0, done.stderr
        again = tmp_path / f"again.{suffix}"
        run_cli("export", str(fresh), "--out", str(again))
        if suffix == "json":
            first, second = json.loads(target.read_text()), json.loads(again.read_text())
            assert first["slices"] == second["slices"]
    assert refused.returncode == 2 and "cannot read" in refused.stderr
    # the server's own store beside it: inspect lists its sessions and worlds, read only;
    # export says it is no world
    server_db = tmp_path / "w.server.db"
    before = server_db.read_bytes()
    out = run_cli("inspect", str(server_db))
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert {s["name"] for s in info["slices"]} == {"sessions", "worlds"}
    assert server_db.read_bytes() == before
    done = run_cli("export", str(server_db), "--out", str(tmp_path / "server.json"))
    assert done.returncode == 2 and "the server's own store" in done.stderr


def test_import_refuses_while_a_host_holds_the_file(server: ServerProcess, tmp_path: Path) -> None:
    document = tmp_path / "map.json"
    document.write_text(json.dumps({"map_data": {"nodes": [], "edges": []}}))
    done = run_cli("import", str(server.db), str(document))
    assert done.returncode == 2 and "in use" in done.stderr


def test_import_validates_through_the_live_import(tmp_path: Path) -> None:
    document = tmp_path / "bad.json"
    document.write_text(json.dumps({"map_data": {"nodes": [{"id": "a", "x": 0, "y": 0},
                                                           {"id": "a", "x": 0, "y": 0}],
                                                 "edges": []}}))
    db = tmp_path / "w.db"
    done = run_cli("import", str(db), str(document))
    assert done.returncode == 2 and "duplicate node id" in done.stderr


async def test_call_error_carries_the_code(worldhost: Any) -> None:
    h = await worldhost.start()
    async with h.client("ada") as ada:
        with pytest.raises(CallError) as err:
            await ada.call("map.update_node", id="nope")
        assert err.value.code == "not_found" and err.value.action == "map.update_node"
