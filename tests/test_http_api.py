"""The HTTP API through the real server: POST /v1/actions, GET /v1/events (SSE),
curl, sessions moving between WebSocket and SSE, and hostile HTTP input."""

from __future__ import annotations

import json
import shutil
import socket
from collections.abc import Iterator
from typing import Any

import pytest
import trio
from hypothesis import given, settings
from trio_websocket import ConnectionClosed
from hypothesis import strategies as st

from host.testing import raw_connection
from serverproc import ServerProcess

Headers = dict[str, str]


async def exchange(port: int, raw: bytes, timeout: float = 10) -> tuple[int, Headers, bytes]:
    """Send raw bytes, read to EOF; (status, headers, body). Status 0: closed unanswered."""
    with trio.fail_after(timeout):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            try:
                await stream.send_all(raw)
            except trio.BrokenResourceError:
                pass
            data = b""
            try:
                while chunk := await stream.receive_some(65536):
                    data += chunk
            except trio.BrokenResourceError:
                pass
    if not data:
        return 0, {}, b""
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split()[1]), headers, body


def post_bytes(body: bytes, bearer: str | None = None, extra: str = "",
               kind: str = "application/json") -> bytes:
    auth = f"Authorization: Bearer {bearer}\r\n" if bearer else ""
    return (f"POST /v1/actions HTTP/1.1\r\nHost: x\r\nContent-Type: {kind}\r\n{auth}{extra}"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


async def post(port: int, envelope: Any, bearer: str | None = None) -> tuple[int, dict[str, Any]]:
    status, _, body = await exchange(port, post_bytes(json.dumps(envelope).encode(), bearer))
    return status, json.loads(body)


async def open_session(port: int, name: str = "ada") -> tuple[str, dict[str, Any]]:
    status, reply = await post(port, {"action": "session.open", "params": {"name": name},
                                      "id": "o"})
    assert status == 200 and reply["signal"] == "session.opened", reply
    data = reply["data"]
    return f"{data['session_id']}.{data['resume_token']}", reply


class Sse:
    """A GET /v1/events stream read event by event."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buf = b""
        self.status = 0
        self.headers: Headers = {}

    @classmethod
    async def open(cls, port: int, bearer: str, last_id: int | None = None,
                   rcvbuf: int | None = None) -> Sse:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        if rcvbuf is not None:
            stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        last = f"Last-Event-ID: {last_id}\r\n" if last_id is not None else ""
        await stream.send_all(f"GET /v1/events HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                              f"{bearer}\r\n{last}\r\n".encode())
        sse = cls(stream)
        if rcvbuf is None:
            await sse._head()
        return sse

    async def _head(self) -> None:
        while b"\r\n\r\n" not in self.buf:
            data = await self.stream.receive_some(65536)
            assert data, self.buf
            self.buf += data
        head, _, self.buf = self.buf.partition(b"\r\n\r\n")
        lines = head.decode().split("\r\n")
        self.status = int(lines[0].split()[1])
        self.headers = {k.lower(): v.strip() for k, _, v in
                        (line.partition(":") for line in lines[1:])}

    async def event(self, timeout: float = 10, comments: bool = False) -> dict[str, Any] | None:
        """The next event ({id?, event, data}); None at the end of the stream."""
        with trio.fail_after(timeout):
            while True:
                while b"\n\n" not in self.buf:
                    data = await self.stream.receive_some(65536)
                    if not data:
                        return None
                    self.buf += data
                block, _, self.buf = self.buf.partition(b"\n\n")
                if block.startswith(b":"):
                    if comments:
                        return {"comment": block.decode()}
                    continue
                out: dict[str, Any] = {}
                for line in block.decode().split("\n"):
                    field, _, value = line.partition(": ")
                    out[field] = int(value) if field == "id" else \
                        json.loads(value) if field == "data" else value
                return out

    async def until(self, name: str, timeout: float = 10) -> list[dict[str, Any]]:
        got = []
        while True:
            ev = await self.event(timeout)
            assert ev is not None, got
            got.append(ev)
            if ev["event"] == name:
                return got

    async def aclose(self) -> None:
        await self.stream.aclose()


# POST /v1/actions --------------------------------------------------------------------

async def test_actions_answer_with_the_status_their_code_implies(worldhost: Any) -> None:
    h = await worldhost.start(listen=True, config={"host": {"limits": {"rate_per_s": 1, "rate_burst": 30}}})
    port = h.host.port
    bearer, opened = await open_session(port)
    assert opened["seq"] == 1 and opened["re"] == "o"
    status, reply = await post(port, {"action": "host.ping", "params": {"x": 1}, "id": 7}, bearer)
    assert status == 200 and reply == {"signal": "host.pong", "re": 7, "seq": 3, "data": {"x": 1}}
    cases = [
        ({"action": "chat.say", "params": {"text": "hi"}}, None, 401, "unauthenticated"),
        ({"action": "map.import", "params": {}}, bearer, 403, "forbidden"),
        ({"action": "no.such"}, bearer, 404, "unknown_action"),
        ({"action": "chat.say", "params": {"text": 5}}, bearer, 400, "validation_error"),
        ({"action": "chat.say", "paramz": {}}, bearer, 400, "bad_request"),
        ({"action": "session.open", "params": {"name": "x"}}, bearer, 409, "conflict"),
        ({"action": "session.resume", "params": {"session_id": "s", "resume_token": "t"}},
         bearer, 400, "bad_request"),
        ({"action": "host.ping"}, "s-nope.wrong", 401, "unauthenticated"),
        ({"action": "host.ping"}, "no-dot", 401, "unauthenticated"),
    ]
    for envelope, auth, code, name in cases:
        status, reply = await post(port, envelope, auth)
        assert (status, reply["data"]["code"]) == (code, name), (envelope, reply)
    status, _, body = await exchange(port, post_bytes(b'{"action": "host.ping", "id": 3',
                                                      bearer))
    assert status == 400 and json.loads(body)["data"]["code"] == "bad_frame"
    status, _, body = await exchange(port, post_bytes(b'{"action":"host.ping"}', bearer,
                                                      kind="text/plain"))
    assert status == 415 and b"application/json" in body
    status, headers, _ = await exchange(port, b"GET /v1/actions HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status == 405 and headers["allow"] == "POST"
    for _ in range(40):  # past the burst: 429 with the rate in the message
        status, reply = await post(port, {"action": "host.ping"}, bearer)
        if status == 429:
            break
    assert status == 429 and reply["data"]["code"] == "rate_limited"


async def test_a_repeated_id_gets_its_first_reply_and_seq_runs_on(worldhost: Any) -> None:
    h = await worldhost.start(listen=True)
    bearer, _ = await open_session(h.host.port)
    _, first = await post(h.host.port, {"action": "chat.say", "params": {"text": "one"},
                                        "id": "c1"}, bearer)
    _, again = await post(h.host.port, {"action": "chat.say", "params": {"text": "one"},
                                        "id": "c1"}, bearer)
    assert first["data"] == again["data"] and again["seq"] > first["seq"]
    said = [m for m in h.world()["chat"].values() if isinstance(m, dict) and "text" in m]
    assert [m["text"] for m in said] == ["one"]  # applied once


async def test_http_does_not_displace_the_websocket_nor_rotate_its_token(worldhost: Any) -> None:
    h = await worldhost.start(listen=True)
    async with h.client("ada") as ada:
        bearer = f"{ada.session_id}.{ada.resume_token}"
        status, reply = await post(h.host.port, {"action": "chat.say",
                                                 "params": {"text": "by http"}, "id": 1}, bearer)
        assert status == 200
        # the reply is the session's signal: its WebSocket sees it too, with that seq
        seen = await ada.next_signal("chat.said")
        assert seen["seq"] == reply["seq"] and seen["re"] == 1
        assert (await ada.call("host.ping", n=2)) == {"n": 2}  # still connected
        status, _ = await post(h.host.port, {"action": "host.ping"}, bearer)
        assert status == 200  # the token still works
        assert h.host.sessions.get(ada.session_id).outbox is not None


async def test_session_close_over_http_ends_the_websocket_of_that_session(worldhost: Any) -> None:
    h = await worldhost.start(listen=True)
    async with raw_connection(h) as ws:
        await ws.send_message(json.dumps({"action": "session.open", "params": {"name": "a"}}))
        while (msg := json.loads(await ws.get_message()))["signal"] != "session.opened":
            pass
        bearer = f"{msg['data']['session_id']}.{msg['data']['resume_token']}"
        status, reply = await post(h.host.port, {"action": "session.close"}, bearer)
        assert status == 200 and reply["signal"] == "session.closed"
        with trio.fail_after(5):
            while (msg := json.loads(await ws.get_message()))["signal"] != "session.ended":
                pass
        assert msg["data"]["reason"] == "closed"
    status, _ = await post(h.host.port, {"action": "host.ping"}, bearer)
    assert status == 401


async def test_an_http_only_session_stays_resumable_while_it_is_used(worldhost: Any) -> None:
    h = await worldhost.start(listen=True, config={"sessions": {"resume_ttl_s": 1.0}})
    bearer, _ = await open_session(h.host.port)
    for _ in range(8):  # 2 s of requests: each restarts the window (every 0.25 s at most)
        status, _ = await post(h.host.port, {"action": "host.ping"}, bearer)
        assert status == 200
        await trio.sleep(0.25)
    await trio.sleep(1.3)
    status, _ = await post(h.host.port, {"action": "host.ping"}, bearer)
    assert status == 401  # unused past the window: gone


async def test_curl_is_enough_to_drive_a_world(worldhost: Any) -> None:
    curl = shutil.which("curl")
    assert curl is not None, "curl is needed for this test"
    h = await worldhost.start(listen=True)
    url = f"http://127.0.0.1:{h.host.port}/v1"

    async def run(*args: str) -> dict[str, Any]:
        done = await trio.run_process([curl, "-sS", "--fail-with-body", *args],
                                      capture_stdout=True)
        return json.loads(done.stdout)  # type: ignore[no-any-return]

    async def call(envelope: dict[str, Any], bearer: str | None = None) -> dict[str, Any]:
        auth = ["-H", f"Authorization: Bearer {bearer}"] if bearer else []
        return await run("-H", "Content-Type: application/json", "-d", json.dumps(envelope),
                         *auth, f"{url}/actions")

    opened = await call({"action": "session.open", "params": {"name": "curl"}})
    bearer = f"{opened['data']['session_id']}.{opened['data']['resume_token']}"
    said = await call({"action": "chat.say", "params": {"text": "from curl"}, "id": 1}, bearer)
    assert said["signal"] == "chat.said"
    snap = await call({"action": "world.snapshot", "params": {"slices": ["chat"]}}, bearer)
    assert "from curl" in json.dumps(snap["data"])
    # the stream, until curl gives up after a second
    done = await trio.run_process([curl, "-sN", "--max-time", "1", "-H",
                                   f"Authorization: Bearer {bearer}", f"{url}/events"],
                                  capture_stdout=True, check=False)
    text = done.stdout.decode()
    assert text.startswith("event: session.resumed\n") and "event: chat.message" in text


# GET /v1/events ------------------------------------------------------------------------

async def test_a_websocket_and_an_sse_stream_see_the_same_signals_in_order(worldhost: Any) -> None:
    h = await worldhost.start(listen=True)
    bearer, _ = await open_session(h.host.port, "sse")
    sse = await Sse.open(h.host.port, bearer, last_id=2)
    assert sse.status == 200 and sse.headers["content-type"].startswith("text/event-stream")
    first = await sse.event()
    assert first is not None and first["event"] == "session.resumed" and "id" not in first
    assert first["data"]["complete"] is True and "resume_token" not in first["data"]
    await sse.until("sync_state")
    async with h.client("ws") as ws:
        for i in range(20):
            await ws.call("chat.say", text=f"m{i}")
        by_ws = []
        while len(by_ws) < 20:
            sig = await ws.next_signal("chat.message")
            by_ws.append(sig["data"]["text"])
        by_sse = []
        last = 0
        while len(by_sse) < 20:
            ev = await sse.event()
            assert ev is not None and ev["id"] > last  # numbered, in order
            last = ev["id"]
            if ev["event"] == "chat.message":
                by_sse.append(ev["data"]["text"])
        assert by_sse == by_ws == [f"m{i}" for i in range(20)]
    await sse.aclose()


async def test_a_session_moves_websocket_sse_websocket_without_gaps(worldhost: Any) -> None:
    h = await worldhost.start(listen=True)
    seqs: list[int] = []
    async with raw_connection(h) as ws:
        await ws.send_message(json.dumps({"action": "session.open", "params": {"name": "m"}}))
        while (msg := json.loads(await ws.get_message()))["signal"] != "sync_state":
            if msg["signal"] == "session.opened":
                sid, token = msg["data"]["session_id"], msg["data"]["resume_token"]
            if "seq" in msg:
                seqs.append(msg["seq"])
        seqs.append(msg["seq"])
        for i in range(3):
            await ws.send_message(json.dumps({"action": "chat.say", "params": {"text": f"w{i}"}}))
        while len(seqs) < 2 + 6:  # three replies, three broadcasts
            seqs.append(json.loads(await ws.get_message())["seq"])
        # signals the WebSocket never reads: the stream replays them
        await ws.send_message(json.dumps({"action": "chat.say", "params": {"text": "unread"}}))
        await trio.sleep(0.3)
        sse = await Sse.open(h.host.port, f"{sid}.{token}", last_id=seqs[-1])
        with pytest.raises(ConnectionClosed):  # displaced: closed by the host with 1000
            while True:
                await ws.get_message()
        assert ws.closed is not None and ws.closed.code == 1000
    got = await sse.until("sync_state")
    assert got[0]["event"] == "session.resumed" and got[0]["data"]["replayed"] == 2
    seqs += [ev["id"] for ev in got[1:]]
    bearer = f"{sid}.{token}"
    await post(h.host.port, {"action": "chat.say", "params": {"text": "via http"}}, bearer)
    seqs += [ev["id"] for ev in await sse.until("chat.message")]
    # back to a WebSocket, with the same token (the stream did not rotate it)
    async with raw_connection(h) as ws:
        await ws.send_message(json.dumps({"action": "session.resume", "params": {
            "session_id": sid, "resume_token": token, "last_seq": seqs[-1]}}))
        while (msg := json.loads(await ws.get_message()))["signal"] != "sync_state":
            if msg["signal"] != "server.info":
                seqs.append(msg["seq"])
        seqs.append(msg["seq"])
        closed = await sse.until("connection.closed")
        assert closed[-1]["data"] == {"code": 1000,
                                      "reason": "session resumed on another connection"}
        assert await sse.event() is None
    assert seqs == list(range(1, len(seqs) + 1)), seqs


async def test_last_event_id_says_when_the_replay_is_incomplete(worldhost: Any) -> None:
    h = await worldhost.start(listen=True, config={"sessions": {"replay_buffer": 4}})
    bearer, _ = await open_session(h.host.port)
    for i in range(6):
        await post(h.host.port, {"action": "host.ping", "params": {"i": i}}, bearer)
    sse = await Sse.open(h.host.port, bearer, last_id=1)
    first = await sse.event()
    assert first is not None and first["data"]["complete"] is False
    assert first["data"]["replayed"] == 4
    got = await sse.until("sync_state")
    assert [ev["id"] for ev in got] == [5, 6, 7, 8, 9]
    await sse.aclose()
    for raw_id, code in ((b"abc", 400), (b"-1", 400), (b"99", 400)):
        status, _, body = await exchange(h.host.port, b"GET /v1/events HTTP/1.1\r\nHost: x\r\n"
                                         b"Authorization: Bearer " + bearer.encode() +
                                         b"\r\nLast-Event-ID: " + raw_id + b"\r\n\r\n")
        assert status == code and json.loads(body)["data"]["code"] == "validation_error", body
    status, headers, _ = await exchange(h.host.port,
                                        b"GET /v1/events HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status == 401 and headers["www-authenticate"].startswith("Bearer")


async def test_the_stream_keeps_alive_and_a_reader_that_never_reads_is_dropped(
        worldhost: Any) -> None:
    h = await worldhost.start(listen=True, config={"host": {
        "ping_interval_s": 0.2, "limits": {"socket_send_buffer": 4096, "outbox_size": 32,
                                           "max_lag_s": 0.5}}})
    bearer, _ = await open_session(h.host.port, "idle")
    sse = await Sse.open(h.host.port, bearer)
    await sse.until("sync_state")
    while (ev := await sse.event(comments=True)) is not None and "comment" not in ev:
        pass
    assert ev == {"comment": ": keep-alive"}
    await sse.aclose()
    idle = h.host.sessions.get(bearer.split(".")[0])
    with trio.fail_after(5):  # the stream's end detaches the session, still resumable
        while idle.connected or idle.record["state"] != "disconnected":
            await trio.sleep(0.05)
    stuck_bearer, _ = await open_session(h.host.port, "stuck")
    stuck = await Sse.open(h.host.port, stuck_bearer, rcvbuf=4096)  # never read
    sid = stuck_bearer.split(".")[0]
    async with h.client("busy") as busy:
        with trio.fail_after(20):
            while h.host.sessions.get(sid).connected:
                await busy.call("chat.say", text="x" * 2000)
        assert (await busy.call("host.ping", ok=1)) == {"ok": 1}  # the rest carry on
    await stuck.aclose()


async def test_many_streams_at_once(worldhost: Any) -> None:
    h = await worldhost.start(listen=True, config={
        "sessions": {"max_sessions_per_address": 0},
        "plugins": {"session_cleanup": {"max_sessions": 1000}}})
    bearers = [(await open_session(h.host.port, f"s{i}"))[0] for i in range(60)]
    streams = [await Sse.open(h.host.port, b) for b in bearers]
    for s in streams:
        await s.until("sync_state")
    await post(h.host.port, {"action": "chat.say", "params": {"text": "all"}}, bearers[0])
    for s in streams:
        got = await s.until("chat.message")
        assert got[-1]["data"]["text"] == "all"
    # a second stream of one session displaces the first
    again = await Sse.open(h.host.port, bearers[1])
    closed = await streams[1].until("connection.closed")
    assert closed[-1]["data"]["code"] == 1000
    await again.until("sync_state")
    for s in [*streams, again]:
        await s.aclose()


# hostile input ---------------------------------------------------------------------------

async def ping_still_works(port: int) -> None:
    status, reply = await post(port, {"action": "host.ping", "params": {"ok": 1}})
    assert status == 200 and reply["data"] == {"ok": 1}


async def test_smuggling_huge_chunked_and_stalled_bodies(worldhost: Any) -> None:
    h = await worldhost.start(listen=True, config={"host": {"limits": {
        "http_body_timeout_s": 0.5, "max_frame_bytes_before_session": 4096}}})
    port = h.host.port
    bearer, _ = await open_session(port)
    smuggled = (b"POST /v1/actions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Content-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
                b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    status, _, body = await exchange(port, smuggled)
    assert status == 400 and b"Transfer-Encoding" in body and b"HTTP/1.1" not in body
    # a declared size over the bound: 413 before the body is read (none is sent)
    with trio.fail_after(5):
        status, _, body = await exchange(port, (
            b"POST /v1/actions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 1000000000\r\n\r\n"))
    assert status == 413 and b"max_frame_bytes_before_session" in body
    # chunked: taken when small, refused once it passes the bound
    env = b'{"action":"host.ping","params":{"c":1}}'
    chunked = (b"POST /v1/actions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
               b"Transfer-Encoding: chunked\r\n\r\n")
    status, _, body = await exchange(port, chunked + b"%x\r\n%s\r\n0\r\n\r\n" % (len(env), env))
    assert status == 200 and json.loads(body)["data"] == {"c": 1}
    piece = b"1000\r\n" + b" " * 4096 + b"\r\n"
    status, _, body = await exchange(port, chunked + piece * 3)
    assert status == 413
    # a body that stalls: 408 naming the key
    status, _, body = await exchange(port, (
        b"POST /v1/actions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: 100\r\n\r\n{\"action\""))
    assert status == 408 and b"http_body_timeout_s" in body
    # a bad chunk
    status, _, _ = await exchange(port, chunked + b"zz\r\nabc\r\n")
    assert status == 400
    await ping_still_works(port)
    status, _ = await post(port, {"action": "host.ping"}, bearer)
    assert status == 200


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """A real ``worldhost serve`` for the property tests (hypothesis runs them
    synchronously, many examples against one server)."""
    proc = ServerProcess(tmp_path_factory.mktemp("http-api") / "w.db").start()
    yield proc
    assert proc.stop() == 0, proc.log()


def blocking_exchange(port: int, raw: bytes) -> tuple[int, bytes]:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        try:
            sock.sendall(raw)
        except OSError:
            pass
        data = b""
        try:
            while chunk := sock.recv(65536):
                data += chunk
        except OSError:
            pass
    if not data:
        return 0, b""
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), body


def blocking_ping(port: int) -> None:
    status, body = blocking_exchange(port, post_bytes(b'{"action":"host.ping","params":{"ok":1}}'))
    assert status == 200 and json.loads(body)["data"] == {"ok": 1}


@settings(max_examples=60, deadline=None)
@given(name=st.binary(min_size=1, max_size=40), value=st.binary(max_size=200))
def test_arbitrary_headers_are_an_answer_or_a_close(server: ServerProcess, name: bytes,
                                                    value: bytes) -> None:
    raw = (b"POST /v1/actions HTTP/1.1\r\nHost: x\r\n" + name + b": " + value + b"\r\n"
           b"Content-Type: application/json\r\nContent-Length: 17\r\n\r\n"
           b'{"action":"x.y"}\n')
    status, _ = blocking_exchange(server.port, raw)
    assert status in (0, 400, 401, 404, 413, 415, 431), status
    blocking_ping(server.port)


@settings(max_examples=60, deadline=None)
@given(value=st.binary(max_size=300).filter(lambda v: b"\r" not in v and b"\n" not in v))
def test_an_arbitrary_stream_cookie_is_refused_clearly(server: ServerProcess,
                                                       value: bytes) -> None:
    """Whatever the cookie holds (but a live credential), the stream is a 401 that
    names it, or a 400 for a header h11 cannot take; the host carries on."""
    raw = (b"GET /v1/events HTTP/1.1\r\nHost: x\r\nCookie: a=b; worldhost_events=" + value +
           b"\r\n\r\n")
    status, body = blocking_exchange(server.port, raw)
    assert status in (400, 401), (status, body)
    if status == 401:
        message = json.loads(body)["data"]["message"]
        assert "worldhost_events" in message or "invalid or expired" in message, message
    blocking_ping(server.port)


_bearer: dict[int, str] = {}


@settings(max_examples=100, deadline=None)
@given(body=st.one_of(st.binary(max_size=300),
                      st.recursive(st.none() | st.booleans() | st.integers() | st.text(),
                                   lambda c: st.lists(c) | st.dictionaries(st.text(), c),
                                   max_leaves=20).map(lambda v: json.dumps(v).encode())))
def test_arbitrary_bodies_get_a_clear_reply(server: ServerProcess, body: bytes) -> None:
    if server.port not in _bearer:
        _, opened = blocking_exchange(server.port, post_bytes(
            b'{"action":"session.open","params":{"name":"fuzz"}}'))
        data = json.loads(opened)["data"]
        _bearer[server.port] = f"{data['session_id']}.{data['resume_token']}"
    status, reply = blocking_exchange(server.port, post_bytes(body, _bearer[server.port]))
    assert status in (200, 400, 404, 409, 429), (status, reply)
    envelope = json.loads(reply)
    assert (envelope["signal"] == "error") == (status != 200)
    if status != 200:
        assert envelope["data"]["message"]
    blocking_ping(server.port)


async def test_a_client_that_does_not_read_its_response_is_cut_off(worldhost: Any) -> None:
    h = await worldhost.start(listen=True, config={"host": {
        "ping_timeout_s": 0.5, "limits": {"socket_send_buffer": 4096,
                                          "max_ping_bytes": 4 << 20}}})
    bearer, _ = await open_session(h.host.port)
    body = json.dumps({"action": "host.ping", "params": {"x": "y" * (2 << 20)}}).encode()
    stream = await trio.open_tcp_stream("127.0.0.1", h.host.port)
    stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    await stream.send_all(post_bytes(body, bearer))
    with trio.fail_after(10):
        while h.host.transport.slots:  # its slot is given back: the socket was closed
            await trio.sleep(0.05)
    got = 0
    try:
        while data := await stream.receive_some(65536):
            got += len(data)
    except trio.BrokenResourceError:
        pass
    assert got < len(body)  # cut off, not sent whole
    await stream.aclose()
    await ping_still_works(h.host.port)


async def test_a_stream_outlives_the_handshake_timeout(worldhost: Any) -> None:
    h = await worldhost.start(listen=True, config={"sessions": {"auth_timeout_s": 0.5}})
    bearer, _ = await open_session(h.host.port)
    sse = await Sse.open(h.host.port, bearer)
    await sse.until("sync_state")
    await trio.sleep(1.5)
    await post(h.host.port, {"action": "chat.say", "params": {"text": "later"}}, bearer)
    got = await sse.until("chat.message", timeout=5)
    assert got[-1]["data"]["text"] == "later"
    await sse.aclose()


# POST /v1/cookie --------------------------------------------------------------------------

async def test_the_stream_cookie_stands_for_the_header_on_the_stream_only(worldhost: Any) -> None:
    """A browser's EventSource cannot send a header: POST /v1/cookie (with the header)
    sets an HttpOnly, SameSite=Strict cookie scoped to /v1/events, which the stream
    takes in its place; actions never take it, and a bad one is a 401."""
    h = await worldhost.start(listen=True, config={"sessions": {"resume_ttl_s": 120}})
    port = h.host.port
    bearer, _ = await open_session(port)

    def cookie_request(auth: str | None) -> bytes:
        line = f"Authorization: Bearer {auth}\r\n" if auth else ""
        return f"POST /v1/cookie HTTP/1.1\r\nHost: x\r\n{line}\r\n".encode()

    status, _, body = await exchange(port, cookie_request(None))
    assert status == 401 and json.loads(body)["data"]["code"] == "unauthenticated"
    status, _, _ = await exchange(port, cookie_request("nobody.nothing"))
    assert status == 401
    status, headers, body = await exchange(port, cookie_request(bearer))
    assert status == 200 and json.loads(body)["max_age"] == 120
    assert headers["set-cookie"] == (f"worldhost_events={bearer}; Path=/v1/events; "
                                     f"Max-Age=120; HttpOnly; SameSite=Strict")
    # the stream, with the cookie alone
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    await stream.send_all(f"GET /v1/events HTTP/1.1\r\nHost: x\r\nCookie: theme=dark; "
                          f"worldhost_events={bearer}\r\n\r\n".encode())
    sse = Sse(stream)
    await sse._head()
    assert sse.status == 200
    assert (await sse.event())["event"] == "session.resumed"  # type: ignore[index]
    await sse.aclose()
    # a wrong cookie is refused; an action with only the cookie has no session
    status, _, _ = await exchange(port, b"GET /v1/events HTTP/1.1\r\nHost: x\r\n"
                                        b"Cookie: worldhost_events=nobody.nothing\r\n\r\n")
    assert status == 401
    status, _, body = await exchange(port, post_bytes(
        json.dumps({"action": "chat.say", "params": {"text": "x"}}).encode(),
        extra=f"Cookie: worldhost_events={bearer}\r\n"))
    assert status == 401 and json.loads(body)["data"]["code"] == "unauthenticated"


@pytest.mark.parametrize("name, good_first", [("Authorization", True),
                                              ("Authorization", False),
                                              ("Last-Event-ID", True)])
async def test_a_header_that_says_one_thing_twice_is_refused(worldhost: Any, name: str,
                                                             good_first: bool) -> None:
    """Two Authorization (or Last-Event-ID) headers: which counts is a guess a proxy
    in front may make differently, so neither does (400), in either order."""
    h = await worldhost.start(listen=True)
    port = h.host.port
    bearer, _ = await open_session(port)
    good, bad = f"{name}: Bearer {bearer}", f"{name}: Bearer s-x.y"
    if name == "Last-Event-ID":
        good, bad = f"Authorization: Bearer {bearer}\r\n{name}: 1", f"{name}: 999"
        target = b"GET /v1/events HTTP/1.1\r\nHost: x\r\n"
    else:
        target = (b"POST /v1/actions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 24\r\n")
    first, second = (good, bad) if good_first else (bad, good)
    request = target + f"{first}\r\n{second}\r\n\r\n".encode()
    if name != "Last-Event-ID":
        request += b'{"action": "host.ping"}\n'
    with trio.fail_after(5):
        status, _, body = await exchange(port, request)
    assert status == 400 and name.encode() in body


@pytest.mark.parametrize("raw, answer", [
    (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(32), 400),  # a TLS hello
    (b"GET /healthz HTTP/1.1\nHost: x\n\n", 200),  # bare newlines: h11 reads them
], ids=["TLS", "bare newlines"])
async def test_a_head_is_answered_as_soon_as_it_ends_or_cannot_be_one(
        worldhost: Any, raw: bytes, answer: int) -> None:
    """Not after the header timeout (10 s): a TLS hello is no request (400), and a
    head whose lines end with a bare newline ends at its blank line."""
    h = await worldhost.start(listen=True)
    with trio.fail_after(2):
        status, _, body = await exchange(h.host.port, raw)
    assert status == answer
    if answer == 400:
        assert body.startswith(b"bad request")


async def test_a_bad_chunk_is_told_without_pythons_reprs(worldhost: Any) -> None:
    h = await worldhost.start(listen=True)
    bad = (b"POST /v1/actions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
           b"Transfer-Encoding: chunked\r\n\r\nfffffffffffffffffffffff\r\n")
    status, _, body = await exchange(h.host.port, bad)
    assert status == 400 and b"bytearray" not in body and b"b'" not in body


async def test_guessed_credentials_come_no_faster_than_the_rate_limit(worldhost: Any) -> None:
    """A wrong bearer is a 401, and costs its address a token as a request without a
    credential does: past the burst, guesses get 429 (a right one still works)."""
    h = await worldhost.start(listen=True, config={"host": {"limits": {
        "rate_per_s": 1, "rate_burst": 5}}})
    port = h.host.port
    bearer, _ = await open_session(port)
    statuses = [(await post(port, {"action": "host.ping"}, bearer="s-nobody.guess"))[0]
                for _ in range(8)]
    assert statuses[0] == 401 and statuses[-1] == 429 and set(statuses) == {401, 429}
    assert (await post(port, {"action": "host.ping"}, bearer=bearer))[0] == 200
