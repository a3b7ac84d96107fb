"""A replay longer than the outbox: ``session.resume`` hands the missed signals to the
connection as it drains them, so a client that missed more than ``outbox_size``
signals is not dropped as too slow (it could never catch up: every resume would
overflow again), while one that stops reading is still dropped by ``max_lag_s``."""

from __future__ import annotations

import json
import socket
from typing import Any

import pytest
import trio
import trio_websocket
from trio_websocket import open_websocket_url

from test_http_api import Sse, open_session

OUTBOX = 16
CONFIG = {"host": {"limits": {"outbox_size": OUTBOX, "rate_per_s": 0}},
          "sessions": {"resume_ttl_s": 3600}}


async def _send(ws: Any, rid: str, action: str, **params: Any) -> None:
    await ws.send_message(json.dumps({"id": rid, "action": action, "params": params}))


async def _open_and_leave(url: str, name: str) -> tuple[dict[str, Any], int]:
    """Open a session and drop its connection; its credentials and the last seq read."""
    async with open_websocket_url(url) as ws:
        await ws.get_message()  # server.info
        await _send(ws, "o", "session.open", name=name)
        opened = json.loads(await ws.get_message())
        sync = json.loads(await ws.get_message())
        assert sync["signal"] == "sync_state"
    return {"session_id": opened["data"]["session_id"],
            "resume_token": opened["data"]["resume_token"]}, sync["seq"]


async def _chatter(h: Any, count: int, start: int = 0, size: int = 10) -> None:
    async with h.client("bob") as bob:
        for i in range(start, start + count):
            await bob.call("chat.say", text=f"{i:06d}" + "x" * size)


async def _resume(ws: Any, session: dict[str, Any], last_seq: int) -> None:
    await ws.get_message()  # server.info
    await _send(ws, "resume", "session.resume", last_seq=last_seq, **session)


@pytest.mark.parametrize("restart", [False, True])
async def test_a_replay_of_three_outboxes_arrives_whole_and_in_order(worldhost: Any,
                                                                     restart: bool) -> None:
    """Missed while away, or (after a kill -9) from the outbound log."""
    h = await worldhost.start(listen=True, config=CONFIG)
    ada, last = await _open_and_leave(h.url, "ada")
    await _chatter(h, 3 * OUTBOX)  # ada misses every one
    if restart:
        await h.crash()
        await h.restart()
    async with open_websocket_url(h.url) as ws:
        await _resume(ws, ada, last)
        reply = json.loads(await ws.get_message())
        assert reply["signal"] == "session.resumed", reply
        assert reply["data"]["complete"] is True and reply["data"]["replayed"] == 3 * OUTBOX
        got = [json.loads(await ws.get_message()) for _ in range(3 * OUTBOX)]
        assert [m["seq"] for m in got] == list(range(last + 1, last + 1 + 3 * OUTBOX))
        assert [m["data"]["text"][:6] for m in got] == [f"{i:06d}" for i in range(3 * OUTBOX)]
        assert json.loads(await ws.get_message())["signal"] == "sync_state"
        await _send(ws, "p", "host.ping", still="here")  # and the connection stays
        assert json.loads(await ws.get_message())["data"] == {"still": "here"}


async def test_signals_sent_during_a_replay_follow_it_in_seq_order(worldhost: Any) -> None:
    """bob keeps talking while ada, who reads slowly, is being replayed to: she gets
    every signal once, in seq order, the replay first."""
    h = await worldhost.start(listen=True, config=CONFIG)
    ada, last = await _open_and_leave(h.url, "ada")
    await _chatter(h, 3 * OUTBOX)
    async with trio.open_nursery() as nursery, open_websocket_url(h.url) as ws:
        await _resume(ws, ada, last)
        nursery.start_soon(_chatter, h, 2 * OUTBOX, 3 * OUTBOX)
        reply = json.loads(await ws.get_message())
        assert reply["data"]["complete"] is True
        seqs, texts = [], []
        while len(texts) < 5 * OUTBOX:
            msg = json.loads(await ws.get_message())
            seqs.append(msg["seq"])
            if msg["signal"] == "chat.message":
                texts.append(msg["data"]["text"][:6])
            await trio.sleep(0.005)  # a slow reader
        assert seqs == sorted(set(seqs)) and seqs[0] == last + 1
        assert seqs == [s for s in range(last + 1, seqs[-1] + 1) if s != reply["seq"]]
        assert texts == [f"{i:06d}" for i in range(5 * OUTBOX)]


async def test_a_client_that_resumes_and_never_reads_is_dropped_alone(
        worldhost: Any, caplog: pytest.LogCaptureFixture) -> None:
    config = {"host": {"limits": {"outbox_size": OUTBOX, "rate_per_s": 0, "max_lag_s": 0.5,
                                  "socket_send_buffer": 4096}},
              "sessions": {"resume_ttl_s": 3600}}
    h = await worldhost.start(listen=True, config=config)
    stuck, last = await _open_and_leave(h.url, "stuck")
    await _chatter(h, 3 * OUTBOX, size=2000)
    sid = stuck["session_id"]
    async with trio.open_nursery() as nursery:
        tcp = await trio.open_tcp_stream("127.0.0.1", h.host.port)
        tcp.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        ws = await trio_websocket.wrap_client_stream(nursery, tcp, "127.0.0.1", "/",
                                                     message_queue_size=1)
        await ws.get_message()  # server.info, then never read again
        await _send(ws, "resume", "session.resume", last_seq=last, **stuck)
        with trio.fail_after(10):
            while h.host.sessions.get(sid).outbox is None:  # resumed
                await trio.sleep(0.01)
        async with h.client("busy") as busy:
            with trio.fail_after(20):
                while h.host.sessions.get(sid).connected:
                    await busy.call("chat.say", text="y" * 2000)
            assert (await busy.call("host.ping", ok=1)) == {"ok": 1}  # the rest carry on
        record = h.sessions()[sid]
        with trio.fail_after(5):
            while record["state"] != "disconnected":  # resumable still
                await trio.sleep(0.05)
                record = h.sessions()[sid]
        await ws.aclose()
        nursery.cancel_scope.cancel()
    dropped = [r.getMessage() for r in caplog.records if "disconnecting" in r.getMessage()]
    assert dropped and all(" s behind" in m for m in dropped), dropped  # by max_lag_s


async def test_an_sse_stream_is_replayed_to_as_it_drains_too(worldhost: Any) -> None:
    h = await worldhost.start(listen=True, config=CONFIG)
    bearer, _ = await open_session(h.host.port, "ada")
    await _chatter(h, 3 * OUTBOX)
    sse = await Sse.open(h.host.port, bearer, last_id=2)  # opened 1, sync_state 2
    first = await sse.event()
    assert first is not None and first["event"] == "session.resumed"
    assert first["data"]["complete"] is True and first["data"]["replayed"] == 3 * OUTBOX
    got = await sse.until("sync_state")
    chat = [ev for ev in got if ev["event"] == "chat.message"]
    assert [ev["id"] for ev in got] == list(range(3, 3 + len(got)))
    assert [ev["data"]["text"][:6] for ev in chat] == [f"{i:06d}" for i in range(3 * OUTBOX)]
    await sse.aclose()
