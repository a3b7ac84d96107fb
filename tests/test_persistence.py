"""The durable world: restart, crash, replay, debounce, corruption, migration."""

from __future__ import annotations

import copy
import json
import os
import sqlite3
import threading
import time
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio
from rawclient import Conn, open_session

from host import config as config_mod
from host.actions import Action, Context, Role
from host.plugins import hookimpl
from host.server import Host
from host.testing import raw_connection
from state.slices import SliceSpec
from state.store import FORMAT_VERSION, WAL_SIZE_LIMIT, JournalEntry, Store, StoreTooNew
from state.writer import Follower


async def test_restart_restores_world_and_sessions(worldhost: Any) -> None:
    h = await worldhost.start()
    async with h.client("ada", reconnect=False) as ada:
        await ada.call("map.add_node", id="n1", x=1, y=2)
        await ada.call("chat.say", text="before the restart")
        await ada.next_signal("chat.message")  # every signal seen: nothing is missed
        token, sid, last = ada.resume_token, ada.session_id, ada.last_seq
    await h.restart()
    async with raw_connection(h) as ws:
        await ws.get_message()  # server.info
        await ws.send_message(json.dumps({"id": 1, "action": "session.resume", "params": {
            "session_id": sid, "resume_token": token, "last_seq": last}}))
        reply = json.loads(await ws.get_message())
        assert reply["signal"] == "session.resumed", reply
        assert reply["data"]["complete"] is True and reply["data"]["replayed"] == 0
        assert reply["seq"] == last + 1  # seq goes on where the client left off
        await ws.send_message(json.dumps({"id": 2, "action": "map.export"}))
        while (msg := json.loads(await ws.get_message()))["signal"] != "map.exported":
            pass
        assert [n["id"] for n in msg["data"]["map_data"]["nodes"]] == ["n1"]


async def test_resume_after_a_crash_replays_what_was_missed(worldhost: Any) -> None:
    h = await worldhost.start()
    async with h.client("ada", reconnect=False) as ada, h.client("bob", reconnect=False) as bob:
        await ada.call("host.ping")
        token, sid, last = ada.resume_token, ada.session_id, ada.last_seq
        await bob.call("chat.say", text="ada is told this, but the host dies before she reads")
        await h.crash()
    await h.start()
    async with raw_connection(h) as ws:
        await ws.get_message()
        await ws.send_message(json.dumps({"id": 1, "action": "session.resume", "params": {
            "session_id": sid, "resume_token": token, "last_seq": last}}))
        reply = json.loads(await ws.get_message())
        assert reply["signal"] == "session.resumed"
        # the chat broadcast was logged with its commit: the outbound log replays it
        assert reply["data"]["complete"] is True and reply["data"]["replayed"] == 1
        replayed = json.loads(await ws.get_message())
        assert replayed["signal"] == "chat.message" and replayed["seq"] == last + 1
        assert reply["seq"] == last + 2


async def test_a_session_resumes_after_a_crash(worldhost: Any) -> None:
    h = await worldhost.start()
    async with h.client("ada") as ada:
        await ada.call("chat.say", text="one")
        sid = ada.session_id
        await h.crash()
        await h.restart()
        # the client reconnects by itself, resumes, and its next call works
        reply = await ada.call("chat.history", limit=10)
        assert [m["text"] for m in reply["messages"]] == ["one"]
        assert ada.session_id == sid and ada.resumes == 1
        assert ada.last_resume is not None and isinstance(ada.last_resume["complete"], bool)


@pytest.mark.parametrize(("synchronous", "commits"),
                         [("NORMAL", "thread"), ("NORMAL", "loop"), ("FULL", "thread")])
async def test_every_acknowledged_action_survives_a_crash(worldhost: Any, synchronous: str,
                                                          commits: str) -> None:
    h = await worldhost.start(config={"store": {"synchronous": synchronous,
                                                "journal_commits": commits}})
    assert h.host.world().saver.journal_in_loop is (commits == "loop")
    async with h.client("ada", reconnect=False) as ada:
        for i in range(50):
            await ada.call("map.add_node", id=f"n{i}", x=i, y=0)
        await h.crash()
    assert h.host.world().saver.checkpoints == 1  # only the startup checkpoint: the rest is journal
    await h.start()
    assert h.host.world().replayed >= 50
    nodes = {k for k in h.world()["map"]}
    assert nodes == {f"node:n{i}" for i in range(50)}


def _replies(conn: Conn, rids: list[int]) -> None:
    """Read (blocking: call it in a thread) until ``conn`` has the replies to ``rids``."""
    seen: set[int] = set()
    while len(seen) < len(rids):
        for m in conn.messages():
            seen |= {rid for rid in rids if b'"re":%d,' % rid in m}
        if len(seen) < len(rids):
            conn.buf += conn.sock.recv(65536)


class _HeldChat:
    """Holds on the store's thread every commit that carries a ``chat.say``, until
    ``go`` is set: a slow or frozen disk, under one commit."""

    def __init__(self, store: Store) -> None:
        self.entered, self.go = threading.Event(), threading.Event()
        self._append = store.append
        store.append = self.append  # type: ignore[method-assign]

    def append(self, entries: Any, seqs: Any, outbound: Any = None) -> None:
        if any(e.action == "chat.say" for e in entries) and not self.go.is_set():
            self.entered.set()
            self.go.wait(10)
        self._append(entries, seqs, outbound)

    async def holding(self) -> None:
        with trio.fail_after(5):
            while not self.entered.is_set():
                await trio.sleep(0.005)


@pytest.mark.parametrize("commits", ["loop", "thread"])
async def test_requests_ready_together_share_one_journal_commit(worldhost: Any,
                                                                commits: str) -> None:
    """A request applied at once yields a turn before its commit, so the others ready
    with it share the commit, whether it runs in the loop or on the store's thread.
    Eight clients' requests reach the host's socket buffers before it runs (sent from
    blocking sockets, the host in this very loop): each burst of eight is one commit,
    two at most."""
    h = await worldhost.start(listen=True, config={"host": {"limits": {"rate_per_s": 0}},
                                                   "store": {"journal_commits": commits}})
    saver = h.host.world().saver
    url = f"ws://127.0.0.1:{h.host.port}/"

    def opened(i: int) -> Conn:
        conn = Conn(url, False)
        open_session(conn, f"c{i}")
        return conn
    conns = []
    for i in range(8):  # in a thread: the host answers in this loop
        conns.append(await trio.to_thread.run_sync(opened, i))

    per_burst = []
    for burst in range(10):
        commits = saver.commits
        for i, conn in enumerate(conns):
            conn.send(b'{"id":%d,"action":"map.add_node","params":{"id":"c%d-%d","x":%d,"y":%d}}'
                      % (burst, i, burst, burst, i))
        for conn in conns:
            await trio.to_thread.run_sync(_replies, conn, [burst])
        per_burst.append(saver.commits - commits)
    for conn in conns:
        conn.sock.close()
    assert max(per_burst) <= 2 and sum(per_burst) <= 12, per_burst
    assert {f"node:c{i}-{k}" for i in range(8) for k in range(10)} <= set(h.world()["map"])


@pytest.mark.parametrize("transport", ["websocket", "tcp"])
@pytest.mark.parametrize("commits", ["loop", "thread"])
async def test_requests_a_client_sends_back_to_back_share_one_journal_commit(
        worldhost: Any, commits: str, transport: str) -> None:
    """A client that pipelines (twenty writes in one socket write) has them read
    together, and each leaves the commit to the next: a few commits cover the burst
    (the writer task commits what waited ``COMMIT_SOON_S``, and the socket may hand
    the burst over in parts), not one a request. A burst whose last frame never
    reaches the dispatcher (a piece of a chunked transfer, taken aside) is committed
    by the writer task all the same."""
    h = await worldhost.start(listen=True, config={
        "host": {"limits": {"rate_per_s": 0}}, "store": {"journal_commits": commits},
        "transports": {"tcp": {"enabled": True, "port": 0}}})
    saver = h.host.world().saver
    line = transport == "tcp"
    port = h.tcp_port if line else h.host.port

    def opened() -> Conn:
        conn = Conn(f"ws://127.0.0.1:{port}/", line)
        open_session(conn, "bulk")
        return conn
    conn = await trio.to_thread.run_sync(opened)

    def burst(payloads: list[bytes]) -> None:
        conn.sock.sendall(b"".join(p + b"\n" for p in payloads) if line
                          else b"".join(conn.masker.frame(p) for p in payloads))

    commits_before = saver.commits
    burst([b'{"id":%d,"action":"map.add_node","params":{"id":"b%d","x":%d,"y":0}}' % (i, i, i)
           for i in range(20)])
    await trio.to_thread.run_sync(_replies, conn, list(range(20)))
    assert saver.commits - commits_before <= 5
    piece = b'{"id":"t1","chunk":{"transfer":"t1","index":0,"total":2,"data":"e30="}}'
    burst([b'{"id":%d,"action":"map.add_node","params":{"id":"c%d","x":%d,"y":1}}' % (i, i, i)
           for i in range(100, 103)] + [piece])
    with trio.fail_after(5):
        await trio.to_thread.run_sync(_replies, conn, [100, 101, 102])
    conn.sock.close()
    assert {f"node:b{i}" for i in range(20)} | {f"node:c{i}" for i in range(100, 103)} \
        <= set(h.world()["map"])


async def test_a_commit_the_loop_stops_waiting_for_is_released_once_done(worldhost: Any) -> None:
    """Journal commits run on the store's thread, and the loop waits for one only
    briefly (``COMMIT_WAIT_S``). A commit held far longer (a slow or frozen disk) goes
    on without the loop: other clients are answered meanwhile, the writer's next
    action waits its turn, and both replies and broadcasts follow once the commit is
    done, in order; both actions survive a crash."""
    h = await worldhost.start()
    world = h.host.world()
    saver, store = world.saver, world.store
    assert not saver.journal_in_loop
    async with h.client("ada", reconnect=False) as ada, h.client("bob", reconnect=False) as bob:
        held = _HeldChat(store)
        saver.longest_stall_s = 0.0
        said: list[str] = []

        async def say(text: str) -> None:
            await ada.call("chat.say", text=text)
            said.append(text)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(say, "held")
            await held.holding()
            nursery.start_soon(say, "after")
            with trio.fail_after(2):
                await bob.call("host.ping")
                await bob.call("chat.history", limit=10)
            await trio.sleep(0.2)
            assert said == [] and saver.in_flight
            assert saver.longest_stall_s < 0.1  # the loop went on without the commit
            # a write waits and a reply to a read is due to be logged: the writer task
            # waits for the commit in flight rather than spin
            await bob.call("host.ping")
            await trio.sleep(saver.unlogged_s)
            cpu = time.process_time()
            await trio.sleep(0.3)
            assert time.process_time() - cpu < 0.15
            held.go.set()
        assert said == ["held", "after"]
        heard = [(await bob.next_signal("chat.message", timeout=5))["data"]["text"]
                 for _ in range(2)]
        assert heard == ["held", "after"]
        await h.crash()
    await h.start()
    async with h.client("cy", reconnect=False) as cy:
        history = await cy.call("chat.history", limit=10)
    assert [m["text"] for m in history["messages"]] == ["held", "after"]


async def test_a_burst_behind_a_late_commit_waits_for_it_without_spinning(
        worldhost: Any) -> None:
    """A client sends two writes back to back while a commit is held on the store's
    thread: the first leaves its commit to the second, whose commit waits for the
    one in flight; the writer task waits too (past the burst's ``COMMIT_SOON_S``)
    rather than spin, and both are answered once the held commit is done."""
    h = await worldhost.start(listen=True)
    def opened() -> Conn:
        conn = Conn(f"ws://127.0.0.1:{h.host.port}/", False)
        open_session(conn, "burst")
        return conn
    burst = await trio.to_thread.run_sync(opened)

    async with h.client("ada", reconnect=False) as ada, trio.open_nursery() as nursery:
        held = _HeldChat(h.host.world().store)
        nursery.start_soon(partial(ada.call, "chat.say", text="held"))
        await held.holding()
        burst.sock.sendall(b"".join(burst.masker.frame(
            b'{"id":%d,"action":"map.add_node","params":{"id":"p%d","x":0,"y":0}}' % (i, i))
            for i in range(2)))
        await trio.sleep(0.05)
        cpu = time.process_time()
        await trio.sleep(0.3)
        assert time.process_time() - cpu < 0.15
        held.go.set()
        with trio.fail_after(5):
            await trio.to_thread.run_sync(_replies, burst, [0, 1])
    burst.sock.close()
    assert {"node:p0", "node:p1"} <= set(h.world()["map"])


async def test_a_disk_slower_than_the_wait_does_not_hold_the_loop_each_commit(
        worldhost: Any) -> None:
    """The loop waits for a journal commit only while commits are quick: once one
    took the store's thread more than half of ``COMMIT_WAIT_S`` (here every commit
    takes 10 ms), it hands the next over and goes on, and each lands when done."""
    h = await worldhost.start()
    saver, store = h.host.world().saver, h.host.world().store
    real_append = store.append

    def slow(entries: Any, seqs: Any, outbound: Any = None) -> None:
        time.sleep(0.01)
        real_append(entries, seqs, outbound)

    async with h.client("ada", reconnect=False) as ada:
        for i in range(10):
            await ada.call("map.add_node", id=f"quick{i}", x=i, y=0)
        assert saver.commits_waited >= 1  # healthy commits: the loop saw them done
        store.append = slow  # type: ignore[method-assign]
        waited, waited_s, commits = saver.commits_waited, saver.waited_s, saver.commits
        for i in range(10):
            await ada.call("map.add_node", id=f"slow{i}", x=i, y=1)
        assert saver.commits - commits >= 10
        assert saver.commits_waited == waited  # none done within the wait: each took 10 ms
        # the loop waited (2 ms) for the first slow one only, not for each
        assert saver.waited_s - waited_s < 3 * saver.commit_wait_s
        store.append = real_append  # type: ignore[method-assign]
        for i in range(10):
            await ada.call("map.add_node", id=f"again{i}", x=i, y=2)
        assert saver.commits_waited > waited  # quick again: waited for again
    assert {f"node:slow{i}" for i in range(10)} <= set(h.world()["map"])


async def test_a_commit_the_loop_waits_for_runs_on_the_loops_cpu(worldhost: Any) -> None:
    """The loop waits for a quick journal commit, so the store's thread runs it on
    the loop's CPU (state/writer.py); a commit it does not wait for (the last took
    long) and a checkpoint may run on any CPU the process may use."""
    h = await worldhost.start()
    saver, store = h.host.world().saver, h.host.world().store
    anywhere = os.sched_getaffinity(0)
    seen: list[tuple[str, set[int], int | None]] = []  # (what, its CPUs, the loop's then)
    real_append, real_checkpoint = store.append, store.checkpoint

    def ran(what: str) -> None:
        follower = saver._writer._follower
        assert follower is not None
        seen.append((what, os.sched_getaffinity(0), follower.cpu))

    def append(*args: Any) -> None:
        ran("commit")
        real_append(*args)

    def checkpoint(*args: Any) -> int:
        ran("checkpoint")
        return real_checkpoint(*args)

    store.append, store.checkpoint = append, checkpoint  # type: ignore[method-assign]
    waited = saver.commits_waited
    async with h.client("ada", reconnect=False) as ada:
        for i in range(8):
            await ada.call("map.add_node", id=f"n{i}", x=i, y=0)
        await saver.checkpoint()
        for i in range(3):
            await ada.call("map.add_node", id=f"after{i}", x=i, y=1)
    for what, cpus, loop_cpu in seen:
        assert cpus == (anywhere if loop_cpu is None else {loop_cpu}), (what, cpus, loop_cpu)
    assert [loop_cpu for what, _, loop_cpu in seen if what == "checkpoint"] == [None]
    pinned = [loop_cpu for what, _, loop_cpu in seen if what == "commit" and loop_cpu is not None]
    assert len(pinned) >= saver.commits_waited - waited >= 5  # each it waited for, at least


def test_a_thread_that_cannot_be_pinned_runs_anywhere() -> None:
    """Pinning that fails (a thread gone, a cpuset changed, a sandbox) stops the
    following, rather than fail the commit."""
    follower = Follower(native_id=2**22 + 12345)  # no such thread
    follower.follow()
    follower.follow()
    assert follower.cpu is None and not follower.enabled
    follower.release()


async def test_a_failure_releasing_a_late_commit_stops_the_world(tmp_path: Path) -> None:
    """What fails while a commit that finished after the loop stopped waiting is
    released (here, injected into the release) stops the host with that error, as a
    failed commit does, rather than break the event loop."""
    from host.testing import HostHarness

    cfg = config_mod.from_dict({"host": {"port": 0}}, "<test config>")
    go = threading.Event()

    async def call(h: HostHarness) -> None:
        world = h.host.world()
        real_append = world.store.append

        def held(entries: Any, seqs: Any, outbound: Any = None) -> None:
            go.wait(10)
            real_append(entries, seqs, outbound)

        def broken(batch: Any) -> None:
            raise RuntimeError("the release broke")

        async with h.client("ada", reconnect=False) as ada:
            world.store.append = held  # type: ignore[method-assign]
            world.saver._release = broken  # type: ignore[method-assign]
            async with trio.open_nursery() as nursery:
                nursery.start_soon(ada.call, "map.add_node", {"id": "n", "x": 0, "y": 0})
                await trio.sleep(0.1)
                go.set()

    with pytest.raises(BaseException) as info:
        async with trio.open_nursery() as nursery:
            h = await HostHarness(nursery, tmp_path / "w.db", cfg, [], False, False).start()
            nursery.start_soon(call, h)
    assert "the release broke" in _messages(info.value)
    assert "TrioInternalError" not in repr(info.value)


async def test_a_failed_journal_commit_is_retried_before_the_reply(worldhost: Any) -> None:
    """A commit in the loop that fails (a full disk, say) is not lost: the writer task
    tries it again, and the reply waits for it."""
    h = await worldhost.start(config={"store": {"journal_commits": "loop"}})
    store = h.host.world().store
    real_append = store.append
    failures = []

    def failing_once(entries: Any, seqs: Any, outbound: Any = None) -> None:
        if not failures:
            failures.append(len(entries))
            raise sqlite3.OperationalError("database or disk is full")
        real_append(entries, seqs, outbound)

    async with h.client("ada", reconnect=False) as ada:
        store.append = failing_once  # type: ignore[method-assign]
        await ada.call("map.add_node", id="kept", x=0, y=0)
        assert failures == [1]
        await h.crash()
    await h.start()
    assert "node:kept" in h.world()["map"]


async def test_a_journal_that_cannot_be_written_stops_the_host(tmp_path: Path) -> None:
    """Nothing is acknowledged that the store could not keep: when the retry fails
    too, the host stops with the store's error, and the request gets no reply."""
    from host.testing import HostHarness

    cfg = config_mod.from_dict({"host": {"port": 0}}, "<test config>")
    answered: list[Any] = []

    def full_disk(entries: Any, seqs: Any, outbound: Any = None) -> None:
        raise sqlite3.OperationalError("database or disk is full")

    async def call(h: HostHarness) -> None:
        async with h.client("ada", reconnect=False) as ada:
            h.host.world().store.append = full_disk  # type: ignore[method-assign]
            answered.append(await ada.call("map.add_node", id="lost", x=0, y=0))

    with pytest.raises(BaseException) as info:
        async with trio.open_nursery() as nursery:
            h = await HostHarness(nursery, tmp_path / "w.db", cfg, [], False, False).start()
            nursery.start_soon(call, h)
    assert "database or disk is full" in _messages(info.value)
    assert answered == []


def _messages(exc: BaseException) -> str:
    if isinstance(exc, BaseExceptionGroup):
        return " ".join(_messages(e) for e in exc.exceptions)
    return str(exc)


async def test_the_wal_is_folded_back_and_kept_small_by_checkpoints(worldhost: Any) -> None:
    """Commits never copy the WAL back into the file (that would wait on the disk in
    the loop): each checkpoint does, on the store's thread, and the WAL shrinks."""
    h = await worldhost.start(config={"store": {"debounce_s": 1e6, "max_delay_s": 1e6},
                                      "host": {"limits": {"rate_per_s": 0}}})
    wal = Path(str(h.db) + "-wal")
    async with h.client("ada", reconnect=False) as ada:
        for i in range(2500):  # a commit each: 2,500 WAL frames of 4 KiB
            await ada.call("map.add_node", id=f"n{i}", x=i, y=0)
        assert wal.stat().st_size > WAL_SIZE_LIMIT
        await h.host.world().saver.checkpoint()
        await ada.call("map.add_node", id="after", x=0, y=0)  # starts the WAL afresh
        assert wal.stat().st_size <= WAL_SIZE_LIMIT


async def test_replay_reproduces_the_world_exactly(worldhost: Any) -> None:
    h = await worldhost.start(config={"host": {"admin_token": "adm"}})
    async with h.client("root", token="adm", reconnect=False) as root:
        await root.call("map.import", map_data={
            "nodes": [{"id": n, "x": i, "y": 0, "building": None} for i, n in enumerate("abc")],
            "edges": [{"id": f"{x}{y}", "from": x, "to": y, "length": 2, "speed": 1}
                      for x, y in ("ab", "bc", "cb", "ba")]})
        await root.call("simulation.add_agent", id="t1", kind="truck", node="a")
        for i in range(5):
            await root.call("simulation.add_package", id=f"p{i}", origin="b", destination="c")
        await root.call("simulation.step", ticks=37)
        await root.call("process.start", template_id="QUICK_POLL", problem_statement="q",
                        agents=["x", "y"])
        before = copy.deepcopy({k: v for k, v in h.world().items() if k != "sessions"})
        await h.crash()
    await h.start()
    after = {k: v for k, v in h.world().items() if k != "sessions"}
    # a running stage's clock restarts at startup (downtime does not count); all else equal
    for world in (before, after):
        for process in world["process"].values():
            process.pop("stage_clock_at")
    assert after == before


class Versioned:
    """A plugin whose slice shape changed between versions."""

    def __init__(self, version: int) -> None:
        self.version = version
        self.__name__ = f"versioned{version}"

    @hookimpl
    def register_slices(self) -> list[SliceSpec]:
        if self.version == 1:
            return [SliceSpec("items", dict, version=1, keyed=True)]

        def migrate(old: int, records: dict[str, Any]) -> dict[str, Any]:
            assert old == 1
            return {k: {"id": r["id"], "label": r["name"]} for k, r in records.items()}
        return [SliceSpec("items", dict, version=2, keyed=True, migrate=migrate,
                          defaults={"colour": "grey"})]

    @hookimpl
    def register_actions(self) -> list[Action]:
        def put(ctx: Context, p: dict[str, Any]) -> dict[str, Any]:
            ctx.keyed("items").put(p["id"], p)
            return {}
        return [Action("items.put", put, dict[str, Any], Role.player)]


async def test_migration_from_an_older_slice_version(worldhost: Any, tmp_path: Path) -> None:
    db = tmp_path / "migrate.db"
    h1 = await worldhost.start(Versioned(1), db=db)
    async with h1.client("ada") as ada:
        await ada.call("items.put", id="i1", name="first")
    await h1.stop()
    h2 = await worldhost.start(Versioned(2), db=db)
    assert h2.world()["items"] == {"i1": {"id": "i1", "label": "first", "colour": "grey"}}
    await h2.stop()
    store = Store.open(db)
    assert store.conn.execute("SELECT version FROM slices WHERE name='items'").fetchone()[0] == 2
    store.close()


async def test_only_what_changed_is_encoded(worldhost: Any) -> None:
    h = await worldhost.start()
    async with h.client("ada") as ada:
        for i in range(30):
            await ada.call("map.add_node", id=f"n{i}", x=i, y=0)
        await h.host.world().saver.checkpoint()
        await ada.call("map.update_node", id="n7", x=70)
        taken, _ = h.host.world().saver._take()
        changes = await h.host.world().saver._encode(taken)
        assert list(changes["map"].upserts) == ["node:n7"]
        assert "chat" not in changes


async def test_a_big_checkpoint_yields_to_the_loop_and_keeps_later_actions(
        worldhost: Any, autojump_clock: Any) -> None:
    """Encoding an imported world is done in slices of the loop's time; an action
    applied meanwhile is not in the checkpoint's cut, so its journal entry stays."""
    h = await worldhost.start(config={"host": {"admin_token": "adm"},
                                      "store": {"debounce_s": 1e6, "max_delay_s": 1e6}})
    nodes = [{"id": f"n{i}", "x": i, "y": 0, "building": None} for i in range(30_000)]
    async with h.client("root", token="adm", reconnect=False) as root:
        await root.call("map.import", map_data={"nodes": nodes, "edges": []})
        turns = 0

        async def count(task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
            nonlocal turns
            with trio.CancelScope() as scope:
                task_status.started(scope)
                while True:
                    turns += 1
                    await trio.sleep(0)

        async with trio.open_nursery() as nursery:
            counting = await nursery.start(count)
            nursery.start_soon(root.call, "map.add_node", {"id": "late", "x": -1, "y": -1})
            await h.host.world().saver.checkpoint()  # the store runs in the loop under a mock clock:
            assert turns > 2                 # only the encoding's slices let others run
            assert "node:late" in h.world()["map"]  # applied while the checkpoint encoded
            counting.cancel()
        await h.crash()  # the add_node was acknowledged: its journal entry must survive
    await h.start()
    assert "node:late" in h.world()["map"] and "node:n29999" in h.world()["map"]


async def test_debounce_and_max_delay(worldhost: Any, autojump_clock: Any) -> None:
    h = await worldhost.start(config={"store": {"debounce_s": 1.0, "max_delay_s": 5.0}})
    saver = h.host.world().saver
    async with h.client("ada") as ada:
        start = saver.checkpoints
        t0 = trio.current_time()
        await ada.call("map.add_node", id="a", x=0, y=0)
        while saver.checkpoints == start:
            await trio.sleep(0.05)
        assert 0.95 <= trio.current_time() - t0 <= 1.2  # debounce after the last change
        # keep changing every 0.5 s: a checkpoint still comes within max_delay_s
        start = saver.checkpoints
        t0 = trio.current_time()
        i = 0
        while saver.checkpoints == start:
            i += 1
            await ada.call("map.update_node", id="a", x=i)
            await trio.sleep(0.5)
        assert 4.9 <= trio.current_time() - t0 <= 5.6


async def test_snapshot_durability_loses_only_the_debounce_window(worldhost: Any,
                                                                   autojump_clock: Any) -> None:
    h = await worldhost.start(config={"store": {"durability": "snapshot"}})
    async with h.client("ada", reconnect=False) as ada:
        await ada.call("map.add_node", id="saved", x=0, y=0)
        await trio.sleep(2)  # past the debounce: checkpointed
        await ada.call("map.add_node", id="lost", x=0, y=0)
        await h.crash()
    await h.start()
    assert set(h.world()["map"]) == {"node:saved"}


async def test_a_second_host_on_the_same_file_is_refused(worldhost: Any, tmp_path: Path) -> None:
    db = tmp_path / "one.db"
    await worldhost.start(db=db)
    second = Host(config_mod.Config(), db=str(db))
    with pytest.raises(Exception, match="in use by another worldhost"):
        await second.run(listen=False)
    # and its world, too, when only the server's own store is told apart
    third = Host(config_mod.with_sections(config_mod.Config(), worlds={
        "server_db": str(tmp_path / "other.server.db")}), db=str(db))
    with pytest.raises(BaseException) as refused:
        await third.run(listen=False)
    assert "one.db is in use by another worldhost" in _messages(refused.value)


def _stopped_store(tmp_path: Path) -> Path:
    async def make() -> None:
        host = Host(config_mod.Config(), entry_points=False, db=str(tmp_path / "w.db"))
        async with trio.open_nursery() as nursery:
            await nursery.start(lambda task_status: host.run(listen=False,
                                                             task_status=task_status))
            host.stop()
    trio.run(make)
    return tmp_path / "w.db"


def _start_and_info(db: Path) -> dict[str, Any]:
    async def run() -> dict[str, Any]:
        host = Host(config_mod.Config(), entry_points=False, db=str(db))
        async with trio.open_nursery() as nursery:
            await nursery.start(lambda task_status: host.run(listen=False,
                                                             task_status=task_status))
            info = host.view.server_info()
            host.stop()
        return info
    return trio.run(run)


@pytest.mark.parametrize("damage", ["garbage", "zero_bytes", "flipped_header", "flipped_page"])
def test_an_unreadable_store_is_moved_aside_never_lost(tmp_path: Path, damage: str,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    db = _stopped_store(tmp_path)
    data = bytearray(db.read_bytes())
    if damage == "garbage":
        data = bytearray(b"this is not a database at all " * 200)
    elif damage == "zero_bytes":
        data = bytearray()
    elif damage == "flipped_header":
        data[0:16] = b"\xff" * 16
    else:  # overwrite the b-tree header of a page in the middle
        page = len(data) // 4096 // 2 * 4096 or 4096
        data[page:page + 64] = bytes(range(64))
    db.write_bytes(bytes(data))
    info = _start_and_info(db)
    recovered = info["recovered"]
    assert recovered["fresh"] is True
    moved = Path(recovered["quarantined"])
    assert moved.name.startswith("w.db.corrupt-") and moved.read_bytes() == bytes(data)
    errors = [r for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and str(moved) in errors[0].getMessage()
    assert db.exists()  # a fresh store in its place


def test_a_store_from_a_newer_format_is_refused_and_untouched(tmp_path: Path) -> None:
    db = _stopped_store(tmp_path)
    conn = sqlite3.connect(db)
    conn.execute("UPDATE meta SET value = 99 WHERE key = 'format_version'")
    conn.commit()
    conn.close()
    before = db.read_bytes()
    with pytest.raises(BaseException) as err:
        _start_and_info(db)
    assert "99" in repr(err.value) and f"format {FORMAT_VERSION}" in repr(err.value)
    assert err.group_contains(StoreTooNew) if hasattr(err, "group_contains") else True
    assert db.read_bytes() == before
    assert not list(tmp_path.glob("*.corrupt-*"))


async def test_a_format_1_store_is_upgraded_and_its_journal_replayed(worldhost: Any) -> None:
    """Format 1 journals had no memo or seqs column: the host adds them and replays."""
    h = await worldhost.start()
    async with h.client("ada", reconnect=False) as ada:
        await ada.call("map.add_node", id="n1", x=1, y=2)
        await h.crash()
    conn = sqlite3.connect(h.db)
    conn.execute("ALTER TABLE journal DROP COLUMN memo")
    conn.execute("ALTER TABLE journal DROP COLUMN seqs")
    conn.execute("UPDATE meta SET value = 1 WHERE key = 'format_version'")
    conn.commit()
    assert conn.execute("SELECT count(*) FROM journal").fetchone()[0] > 0
    conn.close()
    await h.start()
    assert "node:n1" in h.world()["map"]
    await h.stop()
    conn = sqlite3.connect(h.db)
    version = conn.execute("SELECT value FROM meta WHERE key = 'format_version'").fetchone()[0]
    columns = [row[1] for row in conn.execute("PRAGMA table_info(journal)")]
    conn.close()
    assert version == FORMAT_VERSION and {"memo", "seqs"} <= set(columns)


def test_a_truncated_wal_keeps_every_complete_commit(tmp_path: Path) -> None:
    from serverproc import ServerProcess
    from host.client import connect

    db = tmp_path / "w.db"
    server = ServerProcess(db).start()

    async def add(ids: range) -> None:
        async with connect(server.url, name="w", reconnect=False) as c:
            for i in ids:
                await c.call("map.add_node", id=f"n{i}", x=i, y=0)
    trio.run(add, range(40))
    server.kill9()  # the WAL stays behind, holding the journal
    wal = Path(str(db) + "-wal")
    size = wal.stat().st_size
    assert size > 4096
    with open(wal, "r+b") as f:
        f.truncate(size - 1000)  # the last frame is cut in half
    server.start()
    try:
        assert not list(tmp_path.glob("*.corrupt-*"))  # not damage: nothing moved aside

        async def nodes() -> set[str]:
            async with connect(server.url, name="r") as c:
                return {n["id"] for n in (await c.call("map.export"))["map_data"]["nodes"]}
        found = trio.run(nodes)
    finally:
        assert server.stop() == 0
    # a prefix of the acknowledged nodes: every commit that completed, in order
    assert found == {f"n{i}" for i in range(len(found))} and len(found) >= 30


def test_journal_commits_carry_the_sessions_next_seq(tmp_path: Path) -> None:
    """A crash between checkpoints keeps each session's seq from its last commit."""
    store = Store.open(tmp_path / "s.db")
    store.append([JournalEntry(1, "a", b"\xa0", 0.0, "s1", None)], {"s1": 7})
    store.append([JournalEntry(2, "a", b"\xa0", 0.0, None, None),
                  JournalEntry(3, "a", b"\xa0", 0.0, None, None)], {"s1": 9, "s2": 3})
    store.abandon()
    store = Store.open(tmp_path / "s.db")
    loaded = store.load()
    store.close()
    assert [e.id for e in loaded.journal] == [1, 2, 3]
    assert loaded.runtime == {"s1": (9, None), "s2": (3, None)}
    assert loaded.clean_shutdown is False


async def test_after_an_unreadable_store_is_moved_aside_broadcasts_reach_everyone(
        worldhost: Any, tmp_path: Path) -> None:
    """The fresh world's sessions are the ones the dispatcher routes signals to (it
    kept the table of the unreadable store, so a broadcast reached nobody)."""
    db = tmp_path / "w.db"
    db.write_bytes(b"this is not a database at all " * 200)
    h = await worldhost.start(db=db, listen=True)
    assert h.host.world().recovered is not None and h.host.world().recovered["fresh"] is True
    async with h.client("ada", reconnect=False) as ada, \
            h.client("bob", reconnect=False) as bob:
        await ada.call("chat.say", text="anyone there?")
        with trio.fail_after(5):
            message = await bob.next_signal("chat.message")
        assert message["data"]["text"] == "anyone there?"


async def test_the_python_client_takes_the_signals_a_resume_replays(worldhost: Any) -> None:
    """The signals a resume replays come after its reply, with lower seqs than the
    reply's: the client delivers them (once), not as duplicates."""
    h = await worldhost.start()
    async with h.client("ada") as ada, h.client("bob") as bob:
        for text in ("one", "two"):
            await bob.call("chat.say", text=text)
            assert (await ada.next_signal("chat.message"))["data"]["text"] == text
        ada.last_seq -= 2  # as if ada had not read the last two
        await ada.drop()
        replayed = [(await ada.next_signal("chat.message"))["data"]["text"] for _ in range(2)]
        assert replayed == ["one", "two"]
        assert ada.last_resume is not None and ada.last_resume["replayed"] >= 2
        await bob.call("chat.say", text="three")
        assert (await ada.next_signal("chat.message"))["data"]["text"] == "three"
