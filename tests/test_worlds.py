"""Several worlds per host, black-box: the world.* actions, isolation between worlds,
idle unload and reload, kill -9 and SIGTERM with worlds, hostile world ids, and
many worlds with many sessions. Everything goes through the real server (in-process
on a real port, or ``worldhost serve`` in a subprocess), the real SQLite stores and
the real WebSocket transport."""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
import trio_websocket
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from host.client import CallError, Client, connect
from host.testing import deep_merge, open_harness, raw_connection
from serverproc import ServerProcess, free_port
from state.codec import canonical

ADMIN = "adm"
CONFIG: dict[str, Any] = {"host": {"admin_token": ADMIN}}
WORLD_SIGNALS = ("map.", "simulation.", "process.", "nav.", "chat.")  # what a world broadcasts
VALID_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")


def small_map(prefix: str) -> dict[str, Any]:
    """Three nodes in a line, edges both ways; ids carry ``prefix`` (so a node
    that strays into another world says where it came from)."""
    nodes = [{"id": f"{prefix}{i}", "x": i, "y": 0, "building": None} for i in range(3)]
    edges = [{"id": f"{prefix}{a}-{b}", "from": f"{prefix}{a}", "to": f"{prefix}{b}",
              "length": 1, "speed": 1} for a, b in ((0, 1), (1, 0), (1, 2), (2, 1))]
    return {"nodes": nodes, "edges": edges}


async def join(c: Client, world_id: str) -> dict[str, Any]:
    """``world.join``: the reply names the world, then a ``sync_state`` of it follows;
    returns that ``sync_state``'s data."""
    joined = await c.call("world.join", world_id=world_id)
    assert joined["world_id"] == world_id, joined
    assert isinstance(joined["name"], str) and joined["name"]
    while True:  # the session's earlier sync_state (from session.open) may still be queued
        sync = await c.next_signal("sync_state")
        if sync["data"]["world_id"] == world_id:
            return sync["data"]


async def slices(c: Client) -> bytes:
    """The session's world as canonical CBOR: equal worlds, equal bytes."""
    return canonical((await c.call("world.snapshot"))["slices"])


async def listed(c: Client) -> dict[str, Any]:
    """``world.list``'s data, with ``by_id``: each world's entry under its id."""
    data = await c.call("world.list")
    return {**data, "by_id": {w["world_id"]: w for w in data["worlds"]}}


async def drain(c: Client, seconds: float = 0.3) -> list[dict[str, Any]]:
    """The signals that reach ``c`` within ``seconds`` (its queue, then what comes)."""
    got: list[dict[str, Any]] = []
    with trio.move_on_after(seconds):
        async for sig in c.signals():
            got.append(sig)
    return got


async def refused(code: str, c: Client, action: str, **params: Any) -> CallError:
    with pytest.raises(CallError) as err:
        await c.call(action, **params)
    assert err.value.code == code, err.value.data
    assert err.value.message, err.value.data
    return err.value


# -- the actions ------------------------------------------------------------------------

async def test_a_fresh_server_shows_main_to_anyone_and_a_session_is_in_it(
        worldhost: Any) -> None:
    h = await worldhost.start(config=CONFIG, listen=True)
    async with h.client("nobody", open_session=False) as nobody:
        info = nobody.server_info
        assert info["world_id"] == "main" and info["phase"] == "onboarding"
        assert [w["world_id"] for w in info["worlds"]] == ["main"]
        assert set(info["worlds"][0]) >= {"world_id", "name", "phase", "sessions"}
        with pytest.raises(CallError) as err:  # PROTOCOL.md: only three actions before
            await nobody.call("world.list")
        assert err.value.code == "unauthenticated"
    async with h.client("ada") as ada:
        sync = await ada.next_signal("sync_state")
        assert sync["data"]["world_id"] == "main"
        assert [w["world_id"] for w in sync["data"]["worlds"]] == ["main"]
        data = await listed(ada)  # before joining any
        assert data["default"] == "main" and data["joined"] == "main"
        main = data["by_id"]["main"]
        assert set(main) >= {"world_id", "name", "phase", "sessions", "loaded", "created_at",
                             "last_active"}
        assert main["loaded"] is True and main["sessions"] == 1
        await ada.call("map.add_node", id="n1", x=1, y=2)  # never joined: works as ever


async def test_create_join_leave_and_their_errors(worldhost: Any) -> None:
    h = await worldhost.start(config=CONFIG, listen=True)
    async with h.client("root", token=ADMIN) as root, h.client("ada") as ada:
        assert await root.call("world.create", world_id="alpha") == {"world_id": "alpha",
                                                                     "name": "alpha"}
        assert await root.call("world.create", world_id="beta", name="The Beta World") == {
            "world_id": "beta", "name": "The Beta World"}
        assert "alpha" in (await refused("conflict", root, "world.create", world_id="alpha")).message
        await refused("forbidden", ada, "world.create", world_id="gamma")
        await refused("forbidden", ada, "world.archive", world_id="alpha")
        for name in ("", "x" * 65, "tab\there", 7):
            err = await refused("validation_error", root, "world.create", world_id="gamma",
                                name=name)
            assert err.details["path"] == "params.name", err.data
        await refused("not_found", ada, "world.join", world_id="gamma")

        sync = await join(ada, "beta")
        assert {w["world_id"] for w in sync["worlds"]} == {"main", "alpha", "beta"}
        assert (await listed(ada))["joined"] == "beta"
        await ada.call("map.add_node", id="in-beta", x=0, y=0)
        assert (await ada.call("world.leave"))["world_id"] == "beta"
        assert (await listed(ada))["joined"] is None
        for action, params in (("map.add_node", {"id": "nowhere", "x": 0, "y": 0}),
                               ("world.snapshot", {}), ("chat.say", {"text": "hello?"}),
                               ("simulation.step", {}), ("process.list", {})):
            err = await refused("conflict", ada, action, **params)
            assert "world.join" in err.message, err.data
        await refused("conflict", ada, "world.leave")
        assert (await ada.call("host.ping", still="here")) == {"still": "here"}
        await join(ada, "beta")
        nodes = (await ada.call("map.export"))["map_data"]["nodes"]
        assert [n["id"] for n in nodes] == ["in-beta"]  # nothing half-applied while outside


async def test_max_worlds_is_a_conflict_naming_the_setting(worldhost: Any) -> None:
    h = await worldhost.start(config=deep_merge(CONFIG, {"worlds": {"max_worlds": 3}}),
                              listen=True)
    async with h.client("root", token=ADMIN) as root:
        made = []
        for i in range(5):
            try:
                made.append((await root.call("world.create", world_id=f"w{i}"))["world_id"])
            except CallError as err:
                assert err.code == "conflict" and "max_worlds" in err.message, err.data
        assert 1 <= len(made) < 5
        assert len((await listed(root))["worlds"]) <= 3


async def test_seq_counts_on_across_worlds(worldhost: Any) -> None:
    h = await worldhost.start(config=CONFIG, listen=True)
    async with h.client("root", token=ADMIN) as root:
        await root.call("world.create", world_id="alpha")
    async with raw_connection(h) as ws:
        await ws.get_message()  # server.info
        requests = [("session.open", {"name": "ada"}), ("world.join", {"world_id": "alpha"}),
                    ("chat.say", {"text": "in alpha"}), ("world.leave", {}),
                    ("world.join", {"world_id": "main"}), ("chat.say", {"text": "in main"})]
        seqs: list[int] = []
        for i, (action, params) in enumerate(requests):
            await ws.send_message(json.dumps({"id": i, "action": action, "params": params}))
            while True:
                msg = json.loads(await ws.get_message())
                seqs.append(msg["seq"])
                if msg.get("re") == i:
                    assert msg["signal"] != "error", msg
                    break
        assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))  # no gaps across worlds
        assert seqs[0] == 1


async def test_archive_moves_the_file_aside_and_sends_its_sessions_out(worldhost: Any) -> None:
    h = await worldhost.start(config=CONFIG, listen=True)
    worlds_dir = h.db.parent / "worlds"
    async with h.client("root", token=ADMIN) as root, h.client("ada") as ada:
        await root.call("world.create", world_id="doomed")
        await join(ada, "doomed")
        await ada.call("map.add_node", id="keep-me", x=0, y=0)
        assert (worlds_dir / "doomed.db").exists()
        await refused("not_found", root, "world.archive", world_id="never-was")
        archived = await root.call("world.archive", world_id="doomed")
        assert archived["world_id"] == "doomed"
        moved = Path(archived["archived_to"])
        assert moved.resolve() != (worlds_dir / "doomed.db").resolve()
        with trio.fail_after(10):  # the world is unloaded (checkpointed) first, then moved
            while not moved.is_file() or (worlds_dir / "doomed.db").exists():
                await trio.sleep(0.05)
        left = await ada.next_signal("world.left")
        assert left["data"] == {"world_id": "doomed", "reason": "archived"}
        assert (await listed(ada))["joined"] is None
        assert "world.join" in (await refused("conflict", ada, "chat.say", text="hi")).message
        await refused("not_found", ada, "world.join", world_id="doomed")
        assert "doomed" not in (await listed(root))["by_id"]
        db = sqlite3.connect(moved)  # a whole store, nothing deleted
        try:
            assert db.execute("PRAGMA quick_check").fetchone()[0] == "ok"
        finally:
            db.close()


# -- isolation ----------------------------------------------------------------------------

async def test_an_action_in_one_world_changes_nothing_in_another(worldhost: Any) -> None:
    """Everything a player can do in alpha, and beta's snapshot is byte-identical and
    its session hears none of it; alpha's sessions hear it all."""
    h = await worldhost.start(config=CONFIG, listen=True)
    async with h.client("root", token=ADMIN) as root, h.client("ann") as ann, \
            h.client("ann2") as ann2, h.client("bob") as bob, h.client("watcher") as watcher:
        for wid in ("alpha", "beta"):
            await root.call("world.create", world_id=wid)
        await join(bob, "beta")  # beta has a life of its own first
        await join(root, "beta")
        await root.call("map.import", map_data=small_map("b"))
        await bob.call("simulation.add_agent", id="tb", kind="truck", node="b0")
        await bob.call("chat.say", text="beta speaking")
        await bob.call("nav.goto", agent_id="tb", path="/beta")
        await join(root, "alpha")
        await join(ann, "alpha")
        await join(ann2, "alpha")
        before = await slices(bob)
        main_before = await slices(watcher)  # watcher is in main and never joins
        for c in (bob, watcher, ann2):
            await drain(c, 0.1)

        await root.call("map.import", map_data=small_map("a"))
        await ann.call("map.add_node", id="a9", x=9, y=9)
        await ann.call("map.add_edge", id="a9-a0", **{"from": "a9", "to": "a0"}, length=3)
        await ann.call("simulation.add_agent", id="ta", kind="truck", node="a0")
        await ann.call("simulation.add_package", id="pa", origin="a0", destination="a2")
        await ann.call("simulation.set", global_fuel_price=3.0)
        await ann.call("simulation.step", ticks=5)
        await ann.call("simulation.start", tick_hz=50)
        await trio.sleep(0.2)
        await ann.call("simulation.stop")
        await ann.call("chat.say", text="alpha speaking")
        await ann.call("nav.push", agent_id="ta", path="/alpha/deep")
        pid = (await ann.call("process.start", template_id="QUICK_POLL",
                              problem_statement="alpha only", agents=["ann"]))["process_id"]
        await ann.call("process.turn", process_id=pid, agent_id="ann", artifact="yes")
        await ann.call("world.snapshot")

        heard_in_beta = await drain(bob, 0.5)
        heard_in_main = await drain(watcher, 0.1)
        heard_in_alpha = await drain(ann2, 0.1)
        assert await slices(bob) == before
        assert await slices(watcher) == main_before
        stray = [s["signal"] for s in heard_in_beta + heard_in_main
                 if s["signal"].startswith(WORLD_SIGNALS)]
        assert stray == [], stray
        for sig in heard_in_beta:
            if sig["signal"] == "sync_state":
                assert sig["data"]["world_id"] == "beta", sig
        names = {s["signal"] for s in heard_in_alpha}
        assert {"map.imported", "map.node_added", "chat.message", "simulation.ticked",
                "process.started"} <= names, names
        alpha = (await root.call("world.snapshot"))["slices"]
        assert "node:a9" in alpha["map"] and "node:b0" not in alpha["map"]
        beta_map = (await bob.call("map.export"))["map_data"]
        assert {n["id"] for n in beta_map["nodes"]} == {"b0", "b1", "b2"}
        assert (await bob.call("process.list"))["processes"] == []
        assert [m["text"] for m in (await bob.call("chat.history"))["messages"]] == [
            "beta speaking"]


# -- idle unload ----------------------------------------------------------------------------

async def test_an_idle_world_unloads_and_reloads_with_nothing_lost(worldhost: Any) -> None:
    h = await worldhost.start(config=deep_merge(CONFIG, {"worlds": {"idle_unload_s": 0.5}}),
                              listen=True)
    async with h.client("root", token=ADMIN) as root, h.client("ada") as ada:
        await root.call("world.create", world_id="napper")
        await join(root, "napper")
        await root.call("map.import", map_data=small_map("n"))
        await root.call("world.leave")
        await join(ada, "napper")
        await ada.call("simulation.add_agent", id="t1", kind="truck", node="n0")
        await ada.call("simulation.add_package", id="p1", origin="n0", destination="n2")
        await ada.call("simulation.step", ticks=7)
        await ada.call("chat.say", text="remember me")
        pid = (await ada.call("process.start", template_id="QUICK_POLL",
                              problem_statement="kept, not running", agents=["ada"]))["process_id"]
        await ada.call("process.cancel", process_id=pid)  # kept, and nothing runs
        before = await slices(ada)
        assert (await listed(ada))["by_id"]["napper"]["loaded"] is True
        await ada.call("world.leave")

        with trio.fail_after(10):
            while (await listed(root))["by_id"]["napper"]["loaded"]:
                await trio.sleep(0.1)
        entry = (await listed(root))["by_id"]["napper"]
        assert entry["sessions"] == 0
        assert (h.db.parent / "worlds" / "napper.db").is_file()

        await join(ada, "napper")
        assert (await listed(ada))["by_id"]["napper"]["loaded"] is True
        assert await slices(ada) == before
        await ada.call("chat.say", text="after the nap")  # and it works as before
        history = await ada.call("chat.history")
        assert [m["text"] for m in history["messages"]] == ["remember me", "after the nap"]


async def test_a_world_with_a_session_or_a_running_simulation_stays_loaded(
        worldhost: Any) -> None:
    h = await worldhost.start(config=deep_merge(CONFIG, {"worlds": {"idle_unload_s": 0.3}}),
                              listen=True)
    async with h.client("root", token=ADMIN) as root, h.client("ada") as ada:
        for wid in ("busy", "ticking"):
            await root.call("world.create", world_id=wid)
        await join(ada, "busy")
        await join(root, "ticking")
        await root.call("simulation.start", tick_hz=20)
        await root.call("world.leave")
        await trio.sleep(1.5)
        worlds = (await listed(root))["by_id"]
        assert worlds["busy"]["loaded"] is True and worlds["busy"]["sessions"] == 1
        assert worlds["ticking"]["loaded"] is True
        await join(root, "ticking")
        assert (await root.call("world.snapshot"))["slices"]["simulation"]["meta"]["tick"] >= 15


# -- hostile ids ----------------------------------------------------------------------------

HOSTILE = ["", ".", "..", "../x", "../../etc/passwd", "a/b", "/abs", "a\x00b", "\x00", "x" * 65,
           " a", "a ", "a.db", "a\\b", "..\\x", "~", "$HOME", "a\nb", "main.db", "worlds",
           "é", "１", "ǅ", "a" * 64, "-", "_", "CON", "--", "main", "server"]
RESERVED = {"server"}  # the id the server's own store goes by
world_ids = st.one_of(
    st.sampled_from(HOSTILE),
    st.from_regex(VALID_ID, fullmatch=True),
    st.text(max_size=70),
    st.integers(-2**63, 2**63 - 1), st.none(), st.booleans(),
    st.floats(allow_nan=False, allow_infinity=False),  # what the wire carries
    st.lists(st.text(max_size=3), max_size=2),
    st.dictionaries(st.text(max_size=3), st.integers(-2**63, 2**63 - 1), max_size=2))


def _files(root: Path) -> set[Path]:
    return {p.relative_to(root) for p in root.rglob("*")}


@given(st.lists(world_ids, min_size=1, max_size=8))
@settings(max_examples=15, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
async def test_only_valid_world_ids_are_taken_and_nothing_lands_outside_the_worlds_dir(
        ids: list[Any]) -> None:
    """A valid id (1–64 of ASCII letters, digits, - and _: a file name everywhere; not
    the reserved ``server``) is created and joinable; anything else, non-ASCII
    letters and digits too, is a
    validation_error at params.world_id from create, join and archive alike. On disk,
    the only new files are ``<worlds dir>/<id>.db`` (and its companions) of created ids."""
    with tempfile.TemporaryDirectory() as tmp:
        top = Path(tmp)
        home = top / "data"
        home.mkdir()
        async with open_harness(home) as harness:
            h = await harness.start(config=CONFIG, db=home / "w.db", listen=True)
            async with h.client("root", token=ADMIN) as root:
                await root.call("world.create", world_id="seed")  # the registry exists now
                before = _files(top)
                created = {"main", "seed"}
                for wid in ids:
                    valid = isinstance(wid, str) and VALID_ID.fullmatch(wid) is not None \
                        and wid not in RESERVED
                    try:
                        reply = await root.call("world.create", world_id=wid)
                    except CallError as err:
                        if isinstance(wid, str) and wid in created:
                            assert err.code == "conflict", err.data
                            continue
                        assert not valid, (wid, err.data)
                        assert err.code == "validation_error", (wid, err.data)
                        assert err.details["path"] == "params.world_id", err.data
                        for action in ("world.join", "world.archive"):
                            err = await refused("validation_error", root, action, world_id=wid)
                            assert err.details["path"] == "params.world_id", err.data
                        continue
                    assert valid, (wid, reply)
                    assert reply == {"world_id": wid, "name": wid}
                    created.add(wid)
                    await root.call("world.leave")  # from main or the last one joined
                    await join(root, wid)
                    await root.call("map.add_node", id="here", x=0, y=0)
                assert {w["world_id"] for w in (await root.call("world.list"))["worlds"]} == created
                assert await root.call("host.ping", alive=True) == {"alive": True}
            new = _files(top) - before
        companions = ("", "-wal", "-shm", "-journal", ".lock")  # SQLite's, and the host's lock
        allowed = {Path("data", "worlds", f"{wid}.db{c}") for wid in created for c in companions}
        allowed.add(Path("data", "worlds"))
        assert new <= allowed, sorted(map(str, new - allowed))


# -- many worlds, many sessions --------------------------------------------------------------

async def test_fifty_worlds_two_hundred_sessions_each_hears_its_own_world(
        worldhost: Any) -> None:
    config = deep_merge(CONFIG, {"sessions": {"max_sessions_per_address": 0},
                                 "plugins": {"session_cleanup": {"max_sessions": 1000}}})
    h = await worldhost.start(config=config, listen=True)
    ids = [f"w{i:02d}" for i in range(50)]
    per_world = 4
    async with AsyncExitStack() as stack:
        root = await stack.enter_async_context(h.client("root", token=ADMIN))
        for wid in ids:
            await root.call("world.create", world_id=wid)
        clients: list[tuple[str, Client]] = []
        for i in range(len(ids) * per_world):
            c = await stack.enter_async_context(h.client(f"s{i}"))
            clients.append((ids[i % len(ids)], c))
        async with trio.open_nursery() as nursery:
            for wid, c in clients:
                nursery.start_soon(join, c, wid)
        worlds = (await listed(root))["by_id"]
        assert all(worlds[wid]["sessions"] == per_world for wid in ids), worlds

        async with trio.open_nursery() as nursery:
            for i, (wid, c) in enumerate(clients):
                nursery.start_soon(c.call, "chat.say", {"text": f"{wid}:{i}"})
        async with trio.open_nursery() as nursery:
            for wid, c in clients[:len(ids)]:  # one in each world
                nursery.start_soon(c.call, "chat.say", {"text": f"{wid}:end"})

        async def hears_its_world(wid: str, c: Client) -> None:
            texts = []
            while True:
                sig = await c.next_signal("chat.message")
                text = sig["data"]["text"]
                assert text.split(":")[0] == wid, (wid, text)
                if text == f"{wid}:end":
                    break
                texts.append(text)
            assert len(texts) == per_world, (wid, texts)

        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                for wid, c in clients:
                    nursery.start_soon(hears_its_world, wid, c)


# -- real processes: crash and restart --------------------------------------------------------

class Raw:
    """A bare JSON connection to a server process: one request at a time; every other
    signal it gets is kept in ``seen``."""

    def __init__(self, ws: trio_websocket.WebSocketConnection, info: dict[str, Any]) -> None:
        self.ws = ws
        self.info = info
        self.seen: list[dict[str, Any]] = []
        self.count = 0

    async def call(self, action: str, **params: Any) -> dict[str, Any]:
        """The whole reply envelope."""
        self.count += 1
        rid = f"r{self.count}"
        await self.ws.send_message(json.dumps({"id": rid, "action": action, "params": params}))
        while True:
            msg = json.loads(await self.ws.get_message())
            if msg.get("re") == rid:
                return msg
            self.seen.append(msg)


@asynccontextmanager
async def raw(url: str) -> AsyncIterator[Raw]:
    async with trio_websocket.open_websocket_url(url, max_message_size=1 << 26) as ws:
        yield Raw(ws, json.loads(await ws.get_message())["data"])


def write_config(folder: Path, extra: str = "") -> Path:
    path = folder / "worlds.toml"
    path.write_text(f'[host]\nadmin_token = "{ADMIN}"\n[sessions]\nresume_ttl_s = 3600\n{extra}')
    return path


async def world_list(url: str) -> dict[str, Any]:
    """``world.list`` by a session of its own that joins nothing (it is in the default
    world); ``loaded_before`` is how many worlds were loaded before it opened."""
    before = await loaded_worlds(url)
    async with raw(url) as r:
        opened = await r.call("session.open", name="lookout")
        assert opened["signal"] == "session.opened", opened
        reply = await r.call("world.list")
        assert reply["signal"] == "world.list", reply
        await r.call("session.close")
        worlds = reply["data"]["worlds"]
        return {**reply["data"], "by_id": {w["world_id"]: w for w in worlds},
                "loaded_before": before, "loaded_by_itself": before == sum(
                    1 for w in worlds if w["loaded"])}


async def loaded_worlds(url: str) -> int:
    """How many worlds the server has loaded (``/healthz``), asked without a session."""
    port = int(url.rstrip("/").rsplit(":", 1)[1])
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := await stream.receive_some():
            data += chunk
    return int(json.loads(data.split(b"\r\n\r\n", 1)[1])["worlds"])


def tick(snapshot: dict[str, Any]) -> int:
    return int(snapshot["slices"]["simulation"]["meta"]["tick"])


@pytest.mark.parametrize("how", ["kill -9", "SIGTERM"])
async def test_the_last_active_world_and_a_running_simulation_come_back(
        tmp_path: Path, how: str) -> None:
    """A simulation runs in ``sim`` (not the default world, nobody in it) and ``play`` is
    the last world a session acted in. After a kill -9 (or a SIGTERM) and a restart,
    both are loaded before anyone joins, ``play`` is the default, the simulation has
    kept ticking on its own, and the session in ``play`` resumes in it (its client
    reconnects by itself); ``[worlds] dir`` holds the stores."""
    worlds_dir = tmp_path / "elsewhere"
    server = ServerProcess(tmp_path / "w.db", port=free_port(),
                           config=write_config(tmp_path, f'[worlds]\ndir = "{worlds_dir}"\n'))
    server.start()
    try:
        async with connect(server.url, name="root", token=ADMIN, reconnect=False) as root:
            for wid in ("sim", "play"):
                await root.call("world.create", world_id=wid)
            await join(root, "sim")
            await root.call("map.import", map_data=small_map("s"))
            await root.call("simulation.add_agent", id="t1", kind="truck", node="s0")
            await root.call("simulation.start", tick_hz=20)
            await root.call("session.close")  # nobody is left in sim
        async with connect(server.url, name="pia") as pia:
            await join(pia, "play")
            await pia.call("map.add_node", id="played", x=1, y=1)  # the last activity
            async with raw(server.url) as peek:
                await peek.call("session.open", name="peek")
                await peek.call("world.join", world_id="sim")
                ticked = tick((await peek.call("world.snapshot"))["data"])
                await peek.call("session.close")
            if how == "kill -9":
                server.kill9()
            else:
                assert server.stop(signal.SIGTERM) == 0
            await trio.sleep(0.2)
            server.start()

            with trio.fail_after(10):  # loading may finish after the port opens
                while not ((before := await world_list(server.url))["by_id"]["sim"]["loaded"]
                           and before["loaded_by_itself"]):  # the lookout loaded nothing
                    await trio.sleep(0.05)
            assert {"main", "sim", "play"} <= set(before["by_id"]), before
            assert before["default"] == "play", before
            assert before["by_id"]["play"]["loaded"] is True
            await trio.sleep(1.5)  # 30 ticks at 20 Hz, if it runs on its own

            async with raw(server.url) as r:
                await r.call("session.open", name="late")
                await r.call("world.join", world_id="sim")
                now = tick((await r.call("world.snapshot"))["data"])
                assert now >= ticked + 10, (ticked, now)
                await trio.sleep(0.3)
                assert tick((await r.call("world.snapshot"))["data"]) > now  # still going

            assert (await listed(pia))["joined"] == "play"  # pia's client resumed by itself
            assert pia.resumes >= 1
            nodes = (await pia.call("map.export"))["map_data"]["nodes"]
            assert [n["id"] for n in nodes] == ["played"]
        assert (worlds_dir / "sim.db").is_file() and (worlds_dir / "play.db").is_file()
        assert not (tmp_path / "worlds").exists()  # [worlds] dir, not the default
    finally:
        if server.proc is not None and server.proc.poll() is None:
            assert server.stop() == 0, server.log()


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("WORLDHOST_ADMIN_TOKEN", "WORLDHOST_TOKEN")}
    return subprocess.run([sys.executable, "-m", "host", *args], capture_output=True, text=True,
                          timeout=60, env=env)


async def test_the_readme_scenario_two_worlds_two_clients_kill_and_restart(
        tmp_path: Path) -> None:
    """What the README promises a new user: serve, create two worlds (``worldhost call
    --admin``, with the admin token serve wrote beside the store), join each from a
    different client, kill -9, restart: both worlds are listed, the last active one is
    loaded, and both sessions resume in their worlds with their data."""
    db = tmp_path / "data" / "world.db"
    db.parent.mkdir()
    server = ServerProcess(db, port=free_port())
    server.env.pop("WORLDHOST_ADMIN_TOKEN", None)  # serve writes one beside the store
    server.start()
    try:
        for wid, name in (("north", "The North"), ("south", "The South")):
            made = cli("call", "--admin", "--db", str(db), "--url", server.url, "world.create",
                       json.dumps({"world_id": wid, "name": name}))
            assert made.returncode == 0, made.stderr + made.stdout
            assert json.loads(made.stdout) == {"world_id": wid, "name": name}
        async with connect(server.url, name="ann") as ann, connect(server.url, name="bob") as bob:
            await join(ann, "north")
            await ann.call("map.add_node", id="ann-was-here", x=0, y=0)
            await join(bob, "south")
            await bob.call("map.add_node", id="bob-was-here", x=0, y=0)
            server.kill9()
            server.start()
            with trio.fail_after(10):
                while not (after := await world_list(server.url))["loaded_by_itself"]:
                    await trio.sleep(0.05)
            assert after["by_id"]["north"]["name"] == "The North"
            assert after["by_id"]["south"]["name"] == "The South"
            assert after["default"] == "south" and after["by_id"]["south"]["loaded"] is True
            async with connect(server.url, name="carl") as carl:  # never joins: the default
                assert (await carl.next_signal("sync_state"))["data"]["world_id"] == "south"
            for c, wid, node in ((ann, "north", "ann-was-here"), (bob, "south", "bob-was-here")):
                assert (await listed(c))["joined"] == wid
                assert c.resumes == 1
                assert [n["id"] for n in (await c.call("map.export"))["map_data"]["nodes"]] == [
                    node]
        assert (db.parent / "worlds" / "north.db").is_file()
        assert (db.parent / "worlds" / "south.db").is_file()
    finally:
        if server.proc is not None and server.proc.poll() is None:
            assert server.stop() == 0, server.log()
