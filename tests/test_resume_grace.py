"""A resume whose reply is lost (to a crash, to a dropped socket) does not lock the
client out: the token it presented stays good until it presents the new one (the
reuse grace of refresh-token rotation), journaled, so it holds across kill -9 and a
restart. A wrong, superseded or forgotten token gets the same ``unauthenticated``."""

from __future__ import annotations

import json
import sqlite3
import uuid
from pathlib import Path
from typing import Any

import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from trio_websocket import open_websocket_url

from host.sessions import token_hash
from host.testing import open_harness, raw_connection
from serverproc import ServerProcess, free_port
from state.codec import canonical, load_stored
from state.store import JournalEntry, Store
from test_http_api import Sse, exchange

BAD = "invalid or expired resume token"


async def _call(ws: Any, action: str, params: dict[str, Any]) -> tuple[dict[str, Any],
                                                                         list[dict[str, Any]]]:
    """Send one request on a fresh connection; its reply, and the signals after it up
    to ``sync_state`` (a resume's replay) when it succeeded."""
    await ws.get_message()  # server.info
    await ws.send_message(json.dumps({"id": "r", "action": action, "params": params}))
    while (reply := json.loads(await ws.get_message())).get("re") != "r":
        pass
    after: list[dict[str, Any]] = []
    if reply["signal"] == "session.resumed":
        for _ in range(reply["data"]["replayed"] + 1):
            after.append(json.loads(await ws.get_message()))
        assert after[-1]["signal"] == "sync_state", after
    elif reply["signal"] == "session.opened":
        after.append(json.loads(await ws.get_message()))
    return reply, after


async def _open(h: Any, name: str) -> tuple[str, str]:
    async with raw_connection(h) as ws:
        reply, _ = await _call(ws, "session.open", {"name": name})
    return reply["data"]["session_id"], reply["data"]["resume_token"]


async def _resume(h: Any, sid: str, token: str, last_seq: int = 0) -> dict[str, Any]:
    """Resume on a fresh connection and drop it: the reply (its new token, if any)."""
    async with raw_connection(h) as ws:
        reply, _ = await _call(ws, "session.resume", {"session_id": sid, "resume_token": token,
                                                      "last_seq": last_seq})
    return reply


def _refused(reply: dict[str, Any]) -> bool:
    return reply["signal"] == "error" and reply["data"]["code"] == "unauthenticated" \
        and reply["data"]["message"] == BAD


def _token(reply: dict[str, Any]) -> str:
    assert reply["signal"] == "session.resumed", reply
    return reply["data"]["resume_token"]  # type: ignore[no-any-return]


async def test_the_presented_token_stays_good_until_the_new_one_is_presented(
        worldhost: Any) -> None:
    h = await worldhost.start()
    sid, t0 = await _open(h, "ada")
    t1 = _token(await _resume(h, sid, t0))  # its reply is "lost": ada still holds t0
    t2 = _token(await _resume(h, sid, t0))  # the grace: t0 is still good
    assert h.sessions()[sid]["previous_hash"] == token_hash(t0)
    assert _refused(await _resume(h, sid, t1))  # t1 was never presented: superseded
    t3 = _token(await _resume(h, sid, t2))  # t2 presented: t0 is forgotten
    assert h.sessions()[sid]["previous_hash"] == token_hash(t2)
    assert _refused(await _resume(h, sid, t0))
    t4 = _token(await _resume(h, sid, t2))  # t3's reply lost in its turn: t2 still good
    assert _refused(await _resume(h, sid, t3))
    _token(await _resume(h, sid, t4))
    assert _refused(await _resume(h, sid, t2))
    # a wrong token, another session's, and an unknown session: the same answer
    other, other_token = await _open(h, "bob")
    for name, token in ((sid, "wrong"), (sid, other_token), ("s-none", t4),
                        (sid, "no such session")):
        assert _refused(await _resume(h, name, token)), (name, token)
    records = h.sessions()
    assert set(records[sid]) >= {"token_hash", "previous_hash"}
    await h.crash()  # the grace is journaled: it holds after a kill -9 too
    await h.restart()
    assert h.sessions()[sid] == records[sid]


@given(st.lists(st.text(max_size=60), min_size=1, max_size=8))
@settings(max_examples=5, deadline=None, suppress_health_check=[
    HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
async def test_any_other_token_is_refused_alike_and_changes_nothing(
        tmp_path: Path, tokens: list[str]) -> None:
    async with open_harness(tmp_path) as harness:
        h = await harness.start(builtins=False, db=tmp_path / f"{uuid.uuid4().hex}.db")
        sid, t0 = await _open(h, "eve")
        t1 = _token(await _resume(h, sid, t0))  # t0 previous, t1 current
        before = h.sessions()[sid]
        for token in tokens:
            if token not in (t0, t1):
                assert _refused(await _resume(h, sid, token)), token
        assert h.sessions()[sid] == before
        _token(await _resume(h, sid, t1))


async def test_a_stream_keeps_its_token_and_forgets_the_previous(worldhost: Any) -> None:
    """An SSE stream attaches with the current token and keeps it (its Authorization
    header stays valid), so the client holds it: the previous one is forgotten."""
    h = await worldhost.start(listen=True)
    sid, t0 = await _open(h, "ada")
    t1 = _token(await _resume(h, sid, t0))
    for path in (b"GET /v1/events", b"POST /v1/actions"):  # the grace is resume's alone
        status, _, _ = await exchange(h.host.port, path + b" HTTP/1.1\r\nHost: x\r\n"
                                      b"Authorization: Bearer " + f"{sid}.{t0}".encode() +
                                      b"\r\nContent-Length: 0\r\n\r\n")
        assert status == 401, path
    sse = await Sse.open(h.host.port, f"{sid}.{t1}")
    first = await sse.event()
    assert first is not None and first["event"] == "session.resumed"
    assert "resume_token" not in first["data"]
    await sse.until("sync_state")
    record = h.sessions()[sid]
    assert record["token_hash"] == token_hash(t1) and record["previous_hash"] is None
    await sse.aclose()
    assert _refused(await _resume(h, sid, t0))
    _token(await _resume(h, sid, t1))


async def test_a_session_saved_by_an_older_host_still_loads_and_resumes(worldhost: Any) -> None:
    """A record without ``previous_hash`` in the checkpoint, and a ``sessions.attach``
    journaled without it, as a host from before the grace wrote them."""
    h = await worldhost.start()
    sid, t0 = await _open(h, "ada")
    await h.stop()
    server_db = h.db.with_suffix(".server.db")
    with sqlite3.connect(server_db) as conn:
        (blob,) = conn.execute("SELECT value FROM records WHERE slice = 'sessions' AND key = ?",
                               (sid,)).fetchone()
        record = load_stored(blob)
        record.pop("previous_hash", None)
        conn.execute("UPDATE records SET value = ? WHERE slice = 'sessions' AND key = ?",
                     (canonical(record), sid))
    conn.close()
    store = Store.open(server_db)
    last = int(store.meta("checkpoint_id"))
    store.append([JournalEntry(last + 1, "sessions.attach", canonical(
        {"session_id": sid, "token_hash": token_hash("an older host's token")}),
        0.0, None, None)], {})
    store.close()
    await h.start()
    assert h.sessions()[sid]["previous_hash"] is None
    assert _refused(await _resume(h, sid, t0))
    t1 = _token(await _resume(h, sid, "an older host's token"))
    _token(await _resume(h, sid, t1))


async def _open_raw(url: str) -> tuple[dict[str, str], int]:
    """Open a session and say something; its credentials and the last seq it read."""
    async with open_websocket_url(url) as ws:
        reply, after = await _call(ws, "session.open", {"name": "ada"})
        await ws.send_message(json.dumps({"id": "s", "action": "chat.say",
                                          "params": {"text": "before"}}))
        seen = {msg["signal"]: msg["seq"] for msg in after}
        while not {"chat.said", "chat.message"} <= set(seen):  # its reply, its broadcast
            msg = json.loads(await ws.get_message())
            seen[msg["signal"]] = msg["seq"]
        last = max(seen.values())
    return {"session_id": reply["data"]["session_id"],
            "resume_token": reply["data"]["resume_token"]}, last


async def _resume_raw(url: str, session: dict[str, str], token: str,
                      last_seq: int) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    async with open_websocket_url(url) as ws:
        return await _call(ws, "session.resume", {"session_id": session["session_id"],
                                                  "resume_token": token, "last_seq": last_seq})


def test_a_resume_reply_lost_to_kill_9_does_not_lock_the_client_out(tmp_path: Path) -> None:
    """ada resumes; the host commits the new token and is killed before she reads the
    reply. After the restart her old token still resumes her, with a complete replay
    (the lost resume's own signals included, its reply without the token it handed
    out: the store keeps none); then the new token works, and once it has been
    presented the old one is refused."""
    server = ServerProcess(tmp_path / "w.db", port=free_port()).start()
    try:
        ada, last = trio.run(_open_raw, server.url)
        old = ada["resume_token"]
        lost, _ = trio.run(_resume_raw, server.url, ada, old, last)
        assert lost["signal"] == "session.resumed"  # read by the test, "lost" to ada
        server.kill9()
        server.start()
        reply, replayed = trio.run(_resume_raw, server.url, ada, old, last)
        assert reply["signal"] == "session.resumed", reply
        assert reply["data"]["complete"] is True
        seqs = [m["seq"] for m in replayed[:-1]]
        assert seqs == list(range(last + 1, last + 1 + reply["data"]["replayed"]))
        assert [m["signal"] for m in replayed[:-1]] == ["session.resumed", "sync_state"]
        assert "resume_token" not in replayed[0]["data"]  # the store holds no token
        assert replayed[0]["data"]["session_id"] == lost["data"]["session_id"]
        new = reply["data"]["resume_token"]
        after = replayed[-1]["seq"]
        again, _ = trio.run(_resume_raw, server.url, ada, new, after)
        assert again["signal"] == "session.resumed", again
        refused, _ = trio.run(_resume_raw, server.url, ada, old, after)
        assert _refused(refused), refused
    finally:
        assert server.stop() == 0
