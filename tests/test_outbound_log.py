"""The outbound log: a session's signals survive a restart of a real ``worldhost serve``
(SIGTERM or kill -9), so ``session.resume`` replays them, byte for byte with their
original ``seq``, within the log's bounds (``[sessions] outbound_log_size`` and
``outbound_log_age_s``), across worlds, from the stores that logged them."""

from __future__ import annotations

import json
import signal
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest
import trio
from trio_websocket import open_websocket_url

from rawclient import Conn, open_session
from serverproc import ServerProcess
from state.codec import load_stored

ADMIN = "outbound-log-admin"


def _config(tmp_path: Path, extra: str = "") -> Path:
    path = tmp_path / "c.toml"
    path.write_text(f'[host]\nadmin_token = "{ADMIN}"\n[host.limits]\nrate_per_s = 0\n'
                    f'[sessions]\nresume_ttl_s = 3600\n{extra}')
    return path


class Raw:
    """One WebSocket client that keeps the text of every signal it is sent, by seq."""

    def __init__(self, ws: Any) -> None:
        self.ws = ws
        self.seen: dict[int, str] = {}
        self.ids = 0
        self.session: dict[str, Any] = {}

    async def recv(self) -> dict[str, Any]:
        text = await self.ws.get_message()
        msg = json.loads(text)
        if "seq" in msg:
            assert msg["seq"] not in self.seen, f"seq {msg['seq']} sent twice"
            self.seen[msg["seq"]] = text
        return msg  # type: ignore[no-any-return]

    async def call(self, action: str, **params: Any) -> dict[str, Any]:
        self.ids += 1
        rid = f"r{self.ids}"
        await self.ws.send_message(json.dumps({"id": rid, "action": action, "params": params}))
        while (msg := await self.recv()).get("re") != rid:
            pass
        assert msg["signal"] != "error", msg
        return msg

    async def until(self, signal_name: str, **data: Any) -> dict[str, Any]:
        while True:
            msg = await self.recv()
            if msg["signal"] == signal_name and all(msg["data"].get(k) == v
                                                    for k, v in data.items()):
                return msg

    async def open(self, name: str) -> None:
        await self.ws.get_message()  # server.info
        reply = await self.call("session.open", name=name, token=ADMIN)
        self.session = {"session_id": reply["data"]["session_id"],
                        "resume_token": reply["data"]["resume_token"]}


async def _session(url: str, name: str, work: Any) -> Raw:
    async with open_websocket_url(url) as ws:
        raw = Raw(ws)
        await raw.open(name)
        await work(raw)
        return raw


async def _resume(url: str, session: dict[str, Any],
                  last_seq: int) -> tuple[dict[str, Any], list[str]]:
    """Resume and read the reply and what it replays (as sent, text); the reply's
    text and the ``sync_state`` after it go to ``session["sent"]``."""
    async with open_websocket_url(url) as ws:
        await ws.get_message()
        await ws.send_message(json.dumps({"id": "resume", "action": "session.resume",
                                          "params": {"session_id": session["session_id"],
                                                     "resume_token": session["resume_token"],
                                                     "last_seq": last_seq}}))
        text = await ws.get_message()
        reply = json.loads(text)
        assert reply["signal"] == "session.resumed", reply
        replayed = [await ws.get_message() for _ in range(reply["data"]["replayed"])]
        sync = await ws.get_message()
        assert json.loads(sync)["signal"] == "sync_state"
        session["resume_token"] = reply["data"]["resume_token"]
        session["sent"] = [text, sync]
        return reply, replayed


def _restart(server: ServerProcess, how: str) -> None:
    if how == "kill -9":
        server.kill9()
    else:
        assert server.stop(signal.SIGTERM) == 0
    server.start()


@pytest.mark.parametrize("how", ["kill -9", "SIGTERM"])
def test_resume_after_a_restart_replays_what_was_sent_as_it_was_sent(
        tmp_path: Path, how: str) -> None:
    """ada saw some signals, missed others (disconnected while bob chatted): after the
    restart, a resume from early on is complete and replays every one of them, the
    ones she saw identical to the byte, with their original seqs."""
    server = ServerProcess(tmp_path / "w.db", config=_config(tmp_path)).start()
    try:
        async def ada_work(ada: Raw) -> None:
            await ada.call("chat.say", text="ada's own")  # a reply, with its re
            for i in range(3):
                await ada.call("map.add_node", id=f"n{i}", x=i, y=0)

        async def main() -> tuple[Raw, list[str]]:
            ada = await _session(server.url, "ada", ada_work)

            async def bob_work(bob: Raw) -> None:
                for i in range(4):  # while ada is away
                    await bob.call("chat.say", text=f"missed {i}")
            await _session(server.url, "bob", bob_work)
            return ada, []

        ada, _ = trio.run(main)
        _restart(server, how)
        first = min(ada.seen)
        reply, replayed = trio.run(_resume, server.url, ada.session, first)
        assert reply["data"]["complete"] is True
        seqs = [json.loads(text)["seq"] for text in replayed]
        assert seqs == list(range(first + 1, reply["seq"]))  # no gap, none twice
        seen_again = [text for text in replayed if json.loads(text)["seq"] in ada.seen]
        assert seen_again == [ada.seen[s] for s in sorted(ada.seen) if s > first]
        missed = [json.loads(t) for t in replayed if json.loads(t)["seq"] not in ada.seen]
        assert [m["data"]["text"] for m in missed if m["signal"] == "chat.message"] == \
            [f"missed {i}" for i in range(4)]
        # and again, from the last one she saw: only what she missed
        first_resume = ada.session.get("sent", [])
        reply, again = trio.run(_resume, server.url, ada.session, max(ada.seen))
        assert reply["data"]["complete"] is True
        assert again == [t for t in replayed if json.loads(t)["seq"] > max(ada.seen)] + \
            first_resume  # the first resume's own reply and sync_state too
    finally:
        server.stop()


@pytest.mark.parametrize("how", ["kill -9", "SIGTERM"])
def test_a_session_that_switched_worlds_is_replayed_from_both(tmp_path: Path, how: str) -> None:
    """ada's signals came from the server's store (session and world replies), from
    world main, which then unloaded (idle), and from world w2: all replayed, in order."""
    server = ServerProcess(tmp_path / "w.db", config=_config(
        tmp_path, "[worlds]\nidle_unload_s = 0.3\n")).start()
    try:
        async def ada_work(ada: Raw) -> None:
            await ada.call("chat.say", text="in main")
            await ada.call("world.create", world_id="w2")
            await ada.call("world.join", world_id="w2")
            await ada.call("chat.say", text="in w2")
            deadline = time.monotonic() + 10
            while True:  # main, now empty, unloads: its log moves to the server's store
                listing = await ada.call("world.list")
                main = next(w for w in listing["data"]["worlds"] if w["world_id"] == "main")
                if not main["loaded"]:
                    break
                assert time.monotonic() < deadline, listing
                await trio.sleep(0.1)
            await ada.call("chat.say", text="after main unloaded")
            await ada.until("chat.message", text="after main unloaded")

        ada = trio.run(_session, server.url, "ada", ada_work)
        _restart(server, how)
        first = min(ada.seen)
        reply, replayed = trio.run(_resume, server.url, ada.session, first)
        assert reply["data"]["complete"] is True
        assert replayed == [ada.seen[s] for s in sorted(ada.seen) if s > first]
        texts = [json.loads(t)["data"].get("text") for t in replayed
                 if json.loads(t)["signal"] == "chat.message"]
        assert texts == ["in main", "in w2", "after main unloaded"]
    finally:
        server.stop()


def test_the_bounds_and_trimming(tmp_path: Path) -> None:
    """The log keeps ``outbound_log_size`` signals per session: a last_seq older than
    that gets complete:false; a checkpoint trims the store to the bound. Signals
    older than ``outbound_log_age_s`` are not replayed after a restart either, and
    the next checkpoint drops them."""
    db = tmp_path / "w.db"
    server = ServerProcess(db, config=_config(tmp_path, "outbound_log_size = 5\n")).start()

    def logged(sid: str) -> list[int]:
        """The seqs logged for a session: in the log's tables, and on journal rows
        (where they ride their commit until a checkpoint moves them)."""
        seqs = []
        for path in (db, tmp_path / "w.server.db"):
            with sqlite3.connect(path) as conn:
                seqs += [r[0] for r in conn.execute(
                    "SELECT seq FROM outbound WHERE session = ?", (sid,))]
                for (blob,) in conn.execute("SELECT out FROM journal WHERE out IS NOT NULL"):
                    seqs += [seq for s, seq, _, _ in load_stored(blob)[1] if s == sid]
        return sorted(seqs)

    try:
        async def ada_work(ada: Raw) -> None:
            for i in range(30):
                await ada.call("map.add_node", id=f"n{i}", x=i, y=0)

        ada = trio.run(_session, server.url, "ada", ada_work)
        sid = ada.session["session_id"]
        server.kill9()
        assert len(logged(sid)) > 5  # not trimmed yet: no checkpoint since
        server.start()
        last = max(ada.seen)
        reply, replayed = trio.run(_resume, server.url, ada.session, last - 20)
        assert reply["data"]["complete"] is False  # older than the 5 kept
        assert reply["data"]["replayed"] <= 5
        first_resume = ada.session["sent"]  # two more signals: 5 after last - 3
        reply, replayed = trio.run(_resume, server.url, ada.session, last - 3)
        assert reply["data"]["complete"] is True
        assert replayed == [ada.seen[s] for s in range(last - 2, last + 1)] + first_resume
        assert server.stop() == 0  # the final checkpoint trims the store to the bound
        kept = logged(sid)
        assert len([s for s in kept if s <= last]) <= 5 and max(kept) > last
        server.config = _config(tmp_path, "outbound_log_age_s = 0.5\n")
        time.sleep(0.6)
        server.start()
        reply, replayed = trio.run(_resume, server.url, ada.session, last)
        assert reply["data"]["complete"] is False and replayed == []
        assert server.stop() == 0
        assert [s for s in logged(sid) if s <= reply["seq"] - 1] == []  # trimmed by age
    finally:
        server.stop()


def test_with_the_log_off_a_restart_loses_what_was_missed(tmp_path: Path) -> None:
    """``outbound_log = false``: as before the log, a resume after a restart cannot
    replay what the session missed, and says so."""
    server = ServerProcess(tmp_path / "w.db", config=_config(
        tmp_path, "outbound_log = false\n")).start()
    try:
        async def ada_work(ada: Raw) -> None:
            await ada.call("map.add_node", id="n", x=0, y=0)

        ada = trio.run(_session, server.url, "ada", ada_work)
        assert server.stop() == 0
        server.start()
        reply, replayed = trio.run(_resume, server.url, ada.session, min(ada.seen))
        assert reply["data"]["complete"] is False and replayed == []
    finally:
        server.stop()


def test_a_broadcast_of_an_action_that_journals_nothing_is_logged_before_it_goes(
        tmp_path: Path) -> None:
    """``shout.say`` changes nothing, so it has no journal entry to ride on; its
    broadcast still reaches the log before anyone is sent it, so a kill -9 right
    after it leaves ada, who was away, a complete replay that holds it."""
    config = _config(tmp_path, '[plugins.shout]\nmodule = "shout_plugin"\n')
    server = ServerProcess(tmp_path / "w.db", config=config,
                           env={"PYTHONPATH": str(Path(__file__).parent)}).start()
    try:
        async def main() -> Raw:
            async def nothing(raw: Raw) -> None:
                await raw.call("host.ping")
            ada = await _session(server.url, "ada", nothing)

            async def bob_work(bob: Raw) -> None:
                for i in range(3):
                    await bob.call("shout.say", text=f"heard {i}")
            await _session(server.url, "bob", bob_work)
            return ada

        ada = trio.run(main)
        server.kill9()  # at once: no checkpoint, no later commit carried them
        server.start()
        reply, replayed = trio.run(_resume, server.url, ada.session, max(ada.seen))
        assert reply["data"]["complete"] is True
        heard = [json.loads(t)["data"]["text"] for t in replayed
                 if json.loads(t)["signal"] == "shout.heard"]
        assert heard == [f"heard {i}" for i in range(3)]
    finally:
        server.stop()


def test_a_client_gets_its_replies_in_order_behind_a_broadcast_that_journals_nothing(
        tmp_path: Path) -> None:
    """ada sends ``shout.say`` and ``chat.history`` back to back (one socket write),
    both to the world's writer: the shout's reply waits for the broadcast to be
    logged, and the read's reply waits behind it, although a read needs no commit:
    replies come in the order of the requests, seqs rising."""
    config = _config(tmp_path, '[plugins.shout]\nmodule = "shout_plugin"\n')
    server = ServerProcess(tmp_path / "w.db", config=config,
                           env={"PYTHONPATH": str(Path(__file__).parent)}).start()
    try:
        bob = Conn(server.url, False)
        open_session(bob, "bob")  # an audience for the shout
        ada = Conn(server.url, False)
        open_session(ada, "ada")
        for round_ in range(5):
            ada.sock.sendall(ada.masker.frame(
                b'{"id":%d,"action":"shout.say","params":{"text":"hi"}}' % (2 * round_))
                + ada.masker.frame(b'{"id":%d,"action":"chat.history","params":{"limit":1}}'
                                   % (2 * round_ + 1)))
            replies: list[dict[str, Any]] = []
            while len(replies) < 2:
                for m in ada.messages():
                    msg = json.loads(m)
                    if msg.get("re") in (2 * round_, 2 * round_ + 1):
                        replies.append(msg)
                if len(replies) < 2:
                    ada.buf += ada.sock.recv(65536)
            assert [r["re"] for r in replies] == [2 * round_, 2 * round_ + 1], replies
            assert replies[0]["seq"] < replies[1]["seq"]
        ada.sock.close()
        bob.sock.close()
    finally:
        server.stop()


def test_replies_to_reads_are_logged_within_the_delay(tmp_path: Path) -> None:
    """ada only reads (pings): no commit ever carries her replies, so they are logged
    by a write of their own within ``outbound_log_delay_s``; a kill -9 after that
    leaves them all in the replay, as sent, and no seq of hers is used again."""
    server = ServerProcess(tmp_path / "w.db", config=_config(tmp_path)).start()
    try:
        async def reads(ada: Raw) -> None:
            for i in range(5):
                await ada.call("host.ping", n=i)
            await trio.sleep(0.5)  # ten times the delay

        ada = trio.run(_session, server.url, "ada", reads)
        server.kill9()
        server.start()
        first = min(ada.seen)
        reply, replayed = trio.run(_resume, server.url, ada.session, first)
        assert reply["data"]["complete"] is True
        assert replayed == [ada.seen[s] for s in sorted(ada.seen) if s > first]
        assert reply["seq"] == max(ada.seen) + 1  # nothing she saw is numbered again
    finally:
        server.stop()


@pytest.mark.parametrize("how", ["kill -9", "SIGTERM"])
def test_the_store_never_holds_a_resume_token(tmp_path: Path, how: str) -> None:
    """The replies that hand out resume tokens are logged without them: whoever reads
    the store files (or a backup) cannot take a session over. The session still
    resumes with its token after the restart, and a replay of those replies says
    everything but the token."""
    server = ServerProcess(tmp_path / "w.db", config=_config(tmp_path)).start()
    tokens: list[str] = []
    try:
        async def work(ada: Raw) -> None:
            tokens.append(ada.session["resume_token"])
            await ada.call("chat.say", text="hello")

        ada = trio.run(_session, server.url, "ada", work)
        trio.run(_resume, server.url, ada.session, max(ada.seen))
        tokens.append(ada.session["resume_token"])
        _restart(server, how)
        if how == "kill -9":  # what the journal and the WAL held at the crash
            server.kill9()
        else:
            assert server.stop() == 0  # checkpointed into the log's tables
        files = [p for p in tmp_path.rglob("*") if p.is_file() and ".db" in p.name]
        assert any(p.name.endswith("-wal") for p in files) or how == "SIGTERM"
        for path in files:
            content = path.read_bytes()
            for token in tokens:
                assert token.encode() not in content, f"{path.name} holds a resume token"
        server.start()
        reply, replayed = trio.run(_resume, server.url, ada.session, 0)
        assert reply["data"]["complete"] is True
        handed = [json.loads(t) for t in replayed
                  if json.loads(t)["signal"] in ("session.opened", "session.resumed")]
        assert [m["signal"] for m in handed] == ["session.opened", "session.resumed"]
        assert all("resume_token" not in m["data"] and m["data"]["session_id"] ==
                   ada.session["session_id"] for m in handed)
    finally:
        server.stop()
