"""Hostile clients against sessions and connections: a resume past every seq, damaged
session rows, slot squatting, revoked tokens, memory pinned through a session, idle
sockets. Each attack runs against the real server (in-process or a real process),
the real store and the real WebSocket transport."""

from __future__ import annotations

import hashlib
import json
import resource
import sqlite3
import uuid
from pathlib import Path
from typing import Any

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from trio_websocket import ConnectionClosed, open_websocket_url

from host import config as config_mod
from host.client import CallError, connect
from host.testing import open_harness, raw_connection
from serverproc import ServerProcess
from state.codec import INT_MAX, INT_MIN, canonical
from state.store import JournalEntry, Store

ADMIN = "admin-secret"


async def call(ws: Any, action: str, params: dict[str, Any], rid: Any = "r") -> dict[str, Any]:
    """Send one request; the signal that answers it."""
    await ws.send_message(json.dumps({"id": rid, "action": action, "params": params}))
    while True:
        msg = json.loads(await ws.get_message())
        if msg.get("re") == rid:
            return msg


async def open_raw(url: str, name: str, token: str | None = None) -> dict[str, Any]:
    """Open a session on a fresh connection and drop the connection at once."""
    async with open_websocket_url(url) as ws:
        await ws.get_message()
        params = {"name": name} if token is None else {"name": name, "token": token}
        reply = await call(ws, "session.open", params)
        assert reply["signal"] == "session.opened", reply
        return reply["data"]


async def resume(url: str, opened: dict[str, Any], last_seq: int) -> dict[str, Any]:
    async with open_websocket_url(url) as ws:
        await ws.get_message()
        return await call(ws, "session.resume", {
            "session_id": opened["session_id"], "resume_token": opened["resume_token"],
            "last_seq": last_seq})


def assert_error(reply: dict[str, Any], code: str, path: str | None = None) -> None:
    assert reply["signal"] == "error", reply
    assert reply["data"]["code"] == code, reply
    if path is not None:
        assert reply["data"]["details"]["path"] == path, reply


# #12.1: a resume past every seq ----------------------------------------------------

async def test_a_resume_past_every_seq_is_refused_and_the_host_keeps_running(
        tmp_path: Path) -> None:
    server = ServerProcess(tmp_path / "w.db").start()
    try:
        eve = await open_raw(server.url, "eve")  # sent: session.opened (1), sync_state (2)
        for last_seq in (2**63 - 1, 2**53, 3):
            reply = await resume(server.url, eve, last_seq)
            assert_error(reply, "validation_error", "params.last_seq")
        await trio.sleep(1.5)  # the old host died here, writing seq 2**63 at a checkpoint
        assert server.proc is not None and server.proc.poll() is None, server.log()
        async with connect(server.url, name="bob") as bob:
            assert await bob.call("host.ping", ok=1) == {"ok": 1}
        back = await resume(server.url, eve, 2)
        assert back["signal"] == "session.resumed" and back["data"]["complete"] is True
        eve["resume_token"] = back["data"]["resume_token"]
        assert server.stop() == 0
        server.start()
        # after a restart the saved seq may lag what was sent: a client ahead of it is
        # believed (its own session only), and seqs go on above what it saw
        async with open_websocket_url(server.url) as ws:
            await ws.get_message()
            back = await call(ws, "session.resume", {
                "session_id": eve["session_id"], "resume_token": eve["resume_token"],
                "last_seq": 50})
            assert back["signal"] == "session.resumed" and back["seq"] == 51
            eve["resume_token"] = back["data"]["resume_token"]
            pong = await call(ws, "host.ping", {}, rid="p")
            assert pong["seq"] > 51
        # ...once: from then on the host knows exactly what it sent
        reply = await resume(server.url, eve, 10_000)
        assert_error(reply, "validation_error", "params.last_seq")
    finally:
        if server.proc is not None and server.proc.poll() is None:
            server.stop()


async def test_damaged_session_rows_end_those_sessions_and_the_host_starts(
        tmp_path: Path) -> None:
    db = tmp_path / "w.db"
    sessions_db = tmp_path / "w.server.db"  # the server's own store keeps the sessions
    server = ServerProcess(db).start()
    damage = {
        "seq": canonical({"next_seq": 2**63 + 5}),  # as a host without the bound saved it
        "garbage": b"\xff\x00 not cbor at all",
    }
    try:
        victims = {kind: await open_raw(server.url, kind) for kind in [*damage, "journal"]}
        keeper = await open_raw(server.url, "keeper")
        assert server.stop() == 0
        with sqlite3.connect(sessions_db) as conn:
            for kind, blob in damage.items():
                assert conn.execute("UPDATE session_runtime SET value = ? WHERE id = ?",
                                    (blob, victims[kind]["session_id"])).rowcount == 1
        conn.close()
        # what the attack left behind in an older host's store: the resume, journaled
        # with the session's next seq past 2**63
        store = Store.open(sessions_db)
        last = int(store.meta("checkpoint_id"))
        sid = victims["journal"]["session_id"]
        store.append([JournalEntry(last + 1, "sessions.attach", canonical(
            {"session_id": sid, "token_hash": "0" * 64}), 0.0, None, None)], {sid: 2**63 + 1})
        store.close()
        server.start()
        async with open_websocket_url(server.url) as ws:
            info = json.loads(await ws.get_message())["data"]
        assert info["recovered"]["sessions_repaired"] == \
            sorted(v["session_id"] for v in victims.values())
        assert "stored runtime is damaged" in server.log()
        for victim in victims.values():
            assert_error(await resume(server.url, victim, 2), "unauthenticated")
        assert (await resume(server.url, keeper, 2))["signal"] == "session.resumed"
        server.kill9()
        server.start()  # the repair was journaled: nothing is left to repair
        async with open_websocket_url(server.url) as ws:
            assert "recovered" not in json.loads(await ws.get_message())["data"]
        assert server.stop() == 0
        with sqlite3.connect(sessions_db) as conn:
            ids = {r[0] for r in conn.execute("SELECT id FROM session_runtime")}
        conn.close()
        assert ids == {keeper["session_id"]}
    finally:
        if server.proc is not None and server.proc.poll() is None:
            server.stop()


@given(st.one_of(st.integers(-5, 10), st.integers(-2**63, 2**64 - 1)))
@settings(max_examples=15, deadline=None, suppress_health_check=[
    HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
async def test_any_last_seq_is_resumed_or_refused_and_the_store_takes_it(
        tmp_path: Path, last_seq: int) -> None:
    async with open_harness(tmp_path) as harness:
        h = await harness.start(builtins=False, db=tmp_path / f"{uuid.uuid4().hex}.db")
        async with raw_connection(h) as ws:
            await ws.get_message()
            opened = (await call(ws, "session.open", {"name": "eve"}))["data"]
            sent = (await call(ws, "host.ping", {}, rid="p"))["seq"]
        async with raw_connection(h) as ws:
            await ws.get_message()
            reply = await call(ws, "session.resume", {
                "session_id": opened["session_id"], "resume_token": opened["resume_token"],
                "last_seq": last_seq})
            if 0 <= last_seq <= sent:
                assert reply["signal"] == "session.resumed" and reply["seq"] == sent + 1
            elif not INT_MIN <= last_seq <= INT_MAX:  # no frame may carry it (protocol.md)
                assert_error(reply, "bad_frame")
                assert "outside the signed 64-bit range" in reply["data"]["message"]
            else:
                assert_error(reply, "validation_error", "params.last_seq")
        await h.host.world().saver.checkpoint()  # where a seq past 2**63 used to kill the host


# #11.2: one source of truth for a session's state -----------------------------------

async def test_stats_and_snapshot_agree_on_a_dropped_session(worldhost: Any) -> None:
    h = await worldhost.start(config={"host": {"admin_token": ADMIN}})
    async with h.client("root", token=ADMIN) as root:
        async with raw_connection(h) as ws:
            await ws.get_message()
            sid = (await call(ws, "session.open", {"name": "ada"}))["data"]["session_id"]
        for _ in range(100):
            snap = await root.call("world.snapshot", slices=["sessions"])
            if snap["slices"]["sessions"][sid]["state"] == "disconnected":
                break
            await trio.sleep(0.01)
        stats = {s["id"]: s for s in (await root.call("sessions.stats"))["sessions"]}
        assert stats[sid]["state"] == "disconnected" and stats[sid]["connected"] is False
        listed = {s["id"]: s for s in (await root.call("sessions.list"))["sessions"]}
        assert listed[sid]["connected"] is False
        assert stats[root.session_id]["state"] == "open" and stats[root.session_id]["connected"]


# #12.4: session slots ----------------------------------------------------------------

async def test_dropped_sessions_do_not_lock_anyone_out(worldhost: Any) -> None:
    h = await worldhost.start(listen=True, config={
        "host": {"admin_token": ADMIN, "port": 0},
        "plugins": {"session_cleanup": {"max_sessions": 10}}})
    for i in range(30):  # connect, open, drop: the slot-squatting attack
        await open_raw(h.url, f"eve{i}")
    async with h.client("ada") as ada, h.client("root", token=ADMIN) as root:
        assert ada.role == "player" and root.role == "admin"
    assert len(h.sessions()) <= 10
    names = {r["name"] for r in h.sessions().values()}
    await h.crash()  # the evictions were journaled
    await h.restart()
    assert {r["name"] for r in h.sessions().values()} == names


async def test_an_admin_gets_in_when_connected_players_hold_every_slot(worldhost: Any) -> None:
    h = await worldhost.start(config={
        "host": {"admin_token": ADMIN},
        "plugins": {"session_cleanup": {"max_sessions": 3}}})
    async with h.client("p0") as p0, h.client("p1") as p1, h.client("p2") as p2:
        for p in (p1, p2):
            await p.call("host.ping")  # p0 is the least recently active
        with pytest.raises(CallError) as err:
            async with h.client("late"):
                pass
        assert err.value.code == "conflict" and "server full" in err.value.message
        async with h.client("root", token=ADMIN) as root:
            assert root.role == "admin"
            ended = await p0.next_signal("session.ended")
            assert ended["data"]["reason"] == "evicted"
            assert await p1.call("host.ping", still=1) == {"still": 1}
            with pytest.raises(CallError) as err:  # a player does not evict an admin
                async with h.client("late"):
                    pass
            assert err.value.code == "conflict"
            del p2


async def test_sessions_per_address_are_capped(worldhost: Any) -> None:
    h = await worldhost.start(listen=True, config={
        "host": {"admin_token": ADMIN, "port": 0}, "sessions": {"max_sessions_per_address": 3}})
    for i in range(10):
        await open_raw(h.url, f"eve{i}")
    assert len(h.sessions()) == 3  # its own oldest dropped ones made room
    async with h.client("a") as a, h.client("b") as b, h.client("c") as c:
        assert len(h.sessions()) == 3
        with pytest.raises(CallError) as err:
            async with h.client("d"):
                pass
        assert err.value.code == "conflict" and "max_sessions_per_address" in err.value.message
        async with h.client("root", token=ADMIN) as root:  # admins are not counted
            assert root.role == "admin"
        for x in (a, b, c):
            await x.call("host.ping")


async def test_sessions_per_token_are_capped(worldhost: Any) -> None:
    tokens = {hashlib.sha256(b"p-token").hexdigest(): "player"}
    h = await worldhost.start(config={"host": {"auth": "token", "tokens": tokens},
                                      "sessions": {"max_sessions_per_token": 2}})
    async with h.client("a", token="p-token", reconnect=False) as a, \
            h.client("b", token="p-token") as b:
        with pytest.raises(CallError) as err:
            async with h.client("c", token="p-token"):
                pass
        assert err.value.code == "conflict" and "max_sessions_per_token" in err.value.message
        await a.drop()
        await trio.sleep(0.05)  # a's connection is gone: its session is disconnected
        async with h.client("c", token="p-token") as c:
            assert c.role == "player"
        await b.call("host.ping")


# #12.7: revoked tokens -------------------------------------------------------------------

def _token_config(path: Path, tokens: dict[str, str]) -> Path:
    lines = ['[host]', 'auth = "token"', '[host.tokens]']
    lines += [f'"{hashlib.sha256(t.encode()).hexdigest()}" = "{role}"' for t, role in tokens.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


async def test_a_revoked_or_changed_token_ends_its_sessions_at_startup(tmp_path: Path) -> None:
    config = _token_config(tmp_path / "c.toml", {"adm-1": "admin", "ply-1": "player",
                                                 "vwr-1": "viewer"})
    db = tmp_path / "w.db"
    server = ServerProcess(db, config=config).start()
    try:
        opened = {t: await open_raw(server.url, f"user{i}", token=t)
                  for i, t in enumerate(("adm-1", "ply-1", "vwr-1"))}
        assert server.stop() == 0
        raw = db.read_bytes() + Path(str(db) + "-wal").read_bytes() \
            if Path(str(db) + "-wal").exists() else db.read_bytes()
        assert b"adm-1" not in raw and b"ply-1" not in raw  # never the token itself
        _token_config(config, {"ply-1": "viewer", "vwr-1": "viewer"})  # admin revoked
        server.start()
        assert_error(await resume(server.url, opened["adm-1"], 2), "unauthenticated")
        assert_error(await resume(server.url, opened["ply-1"], 2), "unauthenticated")
        kept = await resume(server.url, opened["vwr-1"], 2)
        assert kept["signal"] == "session.resumed" and kept["data"]["role"] == "viewer"
        assert "ending it" in server.log()
        server.kill9()
        server.start()  # ended through the journal: they stay ended
        with sqlite3.connect(db) as conn:
            journal = conn.execute("SELECT count(*) FROM journal").fetchone()[0]
        conn.close()
        async with connect(server.url, name="v", token="vwr-1") as v:
            snap = await v.call("world.snapshot", slices=["sessions"])
        records = snap["slices"]["sessions"]
        assert opened["adm-1"]["session_id"] not in records
        assert opened["ply-1"]["session_id"] not in records
        assert all("credential" not in r and "address" not in r for r in records.values())
        assert journal >= 0
    finally:
        if server.proc is not None and server.proc.poll() is None:
            server.stop()


async def test_a_changed_admin_token_ends_the_admin_sessions(worldhost: Any) -> None:
    h = await worldhost.start(config={"host": {"admin_token": "old-admin"}})
    async with h.client("root", token="old-admin", reconnect=False) as root, \
            h.client("ada", reconnect=False) as ada:
        root_id, ada_id = root.session_id, ada.session_id
    h.config = config_mod.with_sections(h.config, host={"admin_token": "new-admin"})
    await h.restart()
    sessions = h.sessions()
    assert root_id not in sessions and ada_id in sessions  # anonymous players stay


# #12.3: memory a session pins ---------------------------------------------------------------

async def test_what_a_dropped_session_holds_is_bounded_in_bytes(worldhost: Any) -> None:
    h = await worldhost.start(config={
        "sessions": {"replay_buffer_bytes": 256 * 1024, "remembered_replies_bytes": 64 * 1024},
        "host": {"limits": {"max_ping_bytes": 200_000}}})
    async with raw_connection(h) as ws:
        await ws.get_message()
        opened = (await call(ws, "session.open", {"name": "eve"}))["data"]
        for i in range(60):
            pong = await call(ws, "host.ping", {"blob": "x" * 100_000}, rid=f"p{i}")
            assert pong["signal"] == "host.pong"
        last = pong["seq"]
    session = h.host.sessions.get(opened["session_id"])
    assert session is not None
    assert session.buffer_bytes <= 256 * 1024 and session.replies_bytes <= 64 * 1024
    assert 0 < len(session.buffer) <= 3
    async with raw_connection(h) as ws:
        await ws.get_message()
        back = await call(ws, "session.resume", {
            "session_id": opened["session_id"], "resume_token": opened["resume_token"],
            "last_seq": 0})
        assert back["data"]["complete"] is False and back["data"]["replayed"] <= 3
        replayed = [json.loads(await ws.get_message()) for _ in range(back["data"]["replayed"])]
        assert replayed[-1]["seq"] == last


async def test_long_ids_and_big_pings_are_refused(worldhost: Any) -> None:
    h = await worldhost.start(config={
        "host": {"limits": {"max_ping_bytes": 1024}},
        "sessions": {"replay_buffer_bytes": 256 * 1024, "remembered_replies_bytes": 64 * 1024}})
    async with raw_connection(h) as ws:
        await ws.get_message()
        opened = (await call(ws, "session.open", {"name": "eve"}))["data"]
        for rid in ("i" * 129, "é" * 100, "x" * 1_000_000):
            await ws.send_message(json.dumps({"id": rid, "action": "host.ping", "params": {}}))
            while (reply := json.loads(await ws.get_message()))["signal"] != "error":
                pass  # (the open's sync_state first)
            # not echoed: its re is null
            assert_error(reply, "bad_request")
            assert reply["re"] is None
            assert "max_id_bytes (128 bytes)" in reply["data"]["message"]
        assert (await call(ws, "host.ping", {"a": 1}, rid="i" * 128))["data"] == {"a": 1}
        big = await call(ws, "host.ping", {"blob": "x" * 2000}, rid="big")
        assert_error(big, "validation_error", "params")
        assert "max_ping_bytes" in big["data"]["message"]
    session = h.host.sessions.get(opened["session_id"])
    assert session is not None and session.held_bytes <= (256 + 64) * 1024


# #12.14: connection caps --------------------------------------------------------------------

async def test_idle_sockets_make_room_for_real_clients(worldhost: Any) -> None:
    h = await worldhost.start(listen=True, config={
        "sessions": {"auth_timeout_s": 30},
        "host": {"port": 0, "limits": {"max_connections": 60,
                                       "max_connections_per_address": 1000}}})
    idle = [await trio.open_tcp_stream("127.0.0.1", h.host.port) for _ in range(150)]
    await trio.sleep(0.2)
    assert h.host.transport.open <= 60
    started = trio.current_time()
    async with h.client("real") as real:
        assert await real.call("host.ping", x=1) == {"x": 1}
    assert trio.current_time() - started < 1
    closed = 0
    with trio.move_on_after(2):
        for stream in idle[:90]:  # the oldest were closed to make room
            try:
                while await stream.receive_some(65536):
                    pass
            except trio.BrokenResourceError:
                pass
            closed += 1
    assert closed == 90
    for stream in idle:
        await stream.aclose()


async def test_when_every_connection_has_a_session_a_new_socket_is_closed(
        worldhost: Any) -> None:
    h = await worldhost.start(listen=True, config={"host": {"port": 0, "limits": {
        "max_connections": 3}}})
    async with h.client("a") as a, h.client("b") as b, h.client("c") as c:
        stream = await trio.open_tcp_stream("127.0.0.1", h.host.port)
        with trio.fail_after(2):
            assert await stream.receive_some(100) == b""
        await stream.aclose()
        for x in (a, b, c):
            await x.call("host.ping")


async def test_clients_with_sessions_do_not_count_against_the_address_cap(
        worldhost: Any) -> None:
    h = await worldhost.start(listen=True, config={"host": {"port": 0, "limits": {
        "max_connections_per_address": 3}}})
    async with h.client("a") as a, h.client("b") as b, h.client("c") as c, \
            trio.open_nursery() as nursery:
        idle = []
        for _ in range(3):
            ws = await trio_connect(nursery, h.url)
            idle.append(ws)
        async with h.client("d") as d:  # evicts the oldest idle one, not a session
            await d.call("host.ping")
        with pytest.raises(ConnectionClosed) as closed:
            while True:
                await idle[0].get_message()
        assert closed.value.reason.code == 1008
        for x in (a, b, c):
            await x.call("host.ping")
        for ws in idle[1:]:
            await ws.aclose()


async def trio_connect(nursery: trio.Nursery, url: str) -> Any:
    from trio_websocket import connect_websocket_url
    return await connect_websocket_url(nursery, url)


async def test_the_open_file_limit_is_raised_at_startup(worldhost: Any) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(512, hard), hard))
    try:
        h = await worldhost.start(listen=True)
        assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] == hard
        assert h.host.transport.max_connections < hard
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, resource.getrlimit(
            resource.RLIMIT_NOFILE)[0]), hard))


async def test_a_connection_that_closed_its_session_counts_as_without_one(
        worldhost: Any) -> None:
    h = await worldhost.start(listen=True, config={"host": {"port": 0, "limits": {
        "max_connections_per_address": 2}}})
    async with trio.open_nursery() as nursery:
        closer = await trio_connect(nursery, h.url)
        await closer.get_message()
        assert (await call(closer, "session.open", {"name": "c"}))["signal"] == "session.opened"
        assert (await call(closer, "session.close", {}, rid="x"))["signal"] == "session.closed"
        idle = [await trio_connect(nursery, h.url) for _ in range(2)]
        with pytest.raises(ConnectionClosed) as closed:
            while True:
                await closer.get_message()
        assert closed.value.reason.code == 1008
        for ws in idle:
            await ws.aclose()
