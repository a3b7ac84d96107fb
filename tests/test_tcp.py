"""Line-delimited JSON over TCP, through real sockets to an in-process host: the
session lifecycle, sessions moving between TCP and WebSocket, and hostile input.
The bots here are nothing but a TCP socket and ``json``."""

from __future__ import annotations

import itertools
import json
import socket
from collections.abc import Iterator
from typing import Any

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from host.testing import raw_connection
from serverproc import ServerProcess, free_port

TCP = {"transports": {"tcp": {"enabled": True}}}


def tcp(**keys: Any) -> dict[str, Any]:
    """Config with TCP on and these ``[transports.tcp]`` keys."""
    return {"transports": {"tcp": {"enabled": True, **keys}}}


class Lines:
    """A bot with a socket: JSON lines out, JSON lines in."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buffer = b""

    @classmethod
    async def connect(cls, port: int) -> Lines:
        return cls(await trio.open_tcp_stream("127.0.0.1", port))

    async def send(self, message: dict[str, Any] | bytes) -> None:
        data = message if isinstance(message, bytes) else json.dumps(message).encode() + b"\n"
        await self.stream.send_all(data)

    async def line(self, timeout: float = 10) -> bytes | None:
        """The next line as sent, or None at the end of the stream."""
        with trio.fail_after(timeout):
            while b"\n" not in self.buffer:
                data = await self.stream.receive_some(65536)
                if not data:
                    return None
                self.buffer += data
        line, _, self.buffer = self.buffer.partition(b"\n")
        return line

    async def recv(self, timeout: float = 10) -> dict[str, Any]:
        line = await self.line(timeout)
        assert line is not None, "the host closed the connection"
        message: dict[str, Any] = json.loads(line)
        return message

    async def until(self, signal: str, timeout: float = 10) -> dict[str, Any]:
        while True:
            message = await self.recv(timeout)
            if message["signal"] == signal:
                return message

    async def call(self, rid: Any, action: str, **params: Any) -> dict[str, Any]:
        """Send a request; the reply to it (signals meanwhile are skipped)."""
        await self.send({"id": rid, "action": action, "params": params})
        while True:
            message = await self.recv()
            if message.get("re") == rid:
                return message

    async def closed(self) -> dict[str, Any]:
        """The host's last line (``connection.closed``), then the end of the stream."""
        while True:
            message = await self.recv()
            if message["signal"] == "connection.closed":
                assert await self.line() is None, "a line after connection.closed"
                return message["data"]


async def opened(port: int, name: str = "bot") -> tuple[Lines, dict[str, Any]]:
    bot = await Lines.connect(port)
    assert (await bot.recv())["signal"] == "server.info"
    reply = await bot.call("open", "session.open", name=name)
    assert reply["signal"] == "session.opened", reply
    return bot, reply["data"]


async def test_a_whole_session_over_tcp(worldhost: Any) -> None:
    h = await worldhost.start(listen=True, config=TCP)
    bot = await Lines.connect(h.tcp_port)
    info = await bot.recv()
    assert info["signal"] == "server.info" and info["data"]["protocol"] == 1
    # before a session: only the open actions; \r\n is a line end too
    await bot.send(b'{"id": 1, "action": "chat.say", "params": {"text": "hi"}}\r\n')
    refused = await bot.recv()
    assert refused["re"] == 1 and refused["data"]["code"] == "unauthenticated"
    await bot.send(b"\n\r\n")  # empty lines (Enter in nc) ask nothing
    opened_ = await bot.call(2, "session.open", name="bot")
    assert opened_["signal"] == "session.opened" and opened_["seq"] == 1
    assert (await bot.recv())["signal"] == "sync_state"
    assert (await bot.call(3, "host.ping", n=7))["data"] == {"n": 7}
    said = await bot.call(4, "chat.say", text="hello")
    assert said["signal"] == "chat.said" and said["seq"] > 2, said
    message = await bot.until("chat.message")
    assert message["data"]["text"] == "hello" and message["data"]["from"] == "bot"
    assert (await bot.call(5, "session.open", name="again"))["data"]["code"] == "conflict"
    closed = await bot.call(6, "session.close")
    assert closed["signal"] == "session.closed"
    # the connection stays, without a session
    assert (await bot.call(7, "chat.say", text="x"))["data"]["code"] == "unauthenticated"
    assert (await bot.call(8, "host.ping"))["signal"] == "host.pong"


async def test_a_session_moves_between_tcp_and_websocket_without_gaps(worldhost: Any) -> None:
    h = await worldhost.start(listen=True, config=TCP)
    async with h.client("other") as other:
        bot, data = await opened(h.tcp_port)
        sid, token = data["session_id"], data["resume_token"]
        await other.call("chat.say", text="a")
        last_seq = (await bot.until("chat.message"))["seq"]
        await bot.stream.aclose()  # gone: the session waits, resumable
        for text in ("b", "c"):
            await other.call("chat.say", text=text)
        async with raw_connection(h) as ws:  # back on WebSocket
            assert json.loads(await ws.get_message())["signal"] == "server.info"
            await ws.send_message(json.dumps({"id": 1, "action": "session.resume", "params": {
                "session_id": sid, "resume_token": token, "last_seq": last_seq}}))
            got = [json.loads(await ws.get_message()) for _ in range(4)]
            assert [g["signal"] for g in got] == ["session.resumed", "chat.message",
                                                  "chat.message", "sync_state"]
            assert got[0]["data"]["replayed"] == 2 and got[0]["data"]["complete"]
            assert [g["data"]["text"] for g in got[1:3]] == ["b", "c"]
            seqs = [g["seq"] for g in got]
            assert sorted(seqs[1:3]) == [last_seq + 1, last_seq + 2]  # what it missed, in order
            token = got[0]["data"]["resume_token"]
            last_seq = max(seqs)
        await other.call("chat.say", text="d")
        bot = await Lines.connect(h.tcp_port)  # and back on TCP
        assert (await bot.recv())["signal"] == "server.info"
        resumed = await bot.call(1, "session.resume", session_id=sid, resume_token=token,
                                 last_seq=last_seq)
        assert resumed["data"]["replayed"] == 1, resumed
        replayed = await bot.recv()
        assert replayed["data"]["text"] == "d" and replayed["seq"] == last_seq + 1
        await other.call("chat.say", text="e")
        live = await bot.until("chat.message")
        assert live["data"]["text"] == "e" and live["seq"] > replayed["seq"]


async def test_websocket_and_tcp_clients_see_the_same_signals_in_the_same_order(
        worldhost: Any) -> None:
    h = await worldhost.start(listen=True, config=TCP)
    async with h.client("web") as web, h.tcp_client("line") as line:
        async with trio.open_nursery() as nursery:
            for who in (web, line):  # both talk at once
                async def talk(client: Any = who) -> None:
                    for n in range(20):
                        await client.call("chat.say", text=f"{client.name} {n}")
                nursery.start_soon(talk)
        seen: dict[str, list[tuple[str, int]]] = {}
        for client in (web, line):
            got: list[dict[str, Any]] = []
            while len(got) < 40:
                sig = await client.next_signal("chat.message")
                got.append(sig)
            seen[client.name] = [(s["data"]["text"], s["data"]["id"]) for s in got]
        assert seen["web"] == seen["line"]
        assert sorted(i for _, i in seen["web"]) == [i for _, i in seen["web"]]


async def test_an_overlong_line_is_answered_then_closed_and_others_carry_on(
        worldhost: Any) -> None:
    h = await worldhost.start(listen=True, config=tcp(max_line_bytes=4096))
    bot, _ = await opened(h.tcp_port)
    other, _ = await opened(h.tcp_port, "other")
    await bot.send(b'{"action": "host.ping", "params": {"x": "' + b"y" * 10_000 + b'"}}\n')
    error = await bot.until("error")
    assert error["data"]["code"] == "bad_frame"
    assert "max_line_bytes" in error["data"]["message"] and "4096" in error["data"]["message"]
    closed = await bot.closed()
    assert closed["code"] == 1009 and "max_line_bytes" in closed["reason"]
    assert (await other.call(1, "host.ping", n=1))["data"] == {"n": 1}


async def test_an_overlong_line_behind_a_durable_action_is_still_answered(
        worldhost: Any) -> None:
    """The refusal waits its turn behind a reply held for its journal commit; the
    connection closes only after both are sent."""
    h = await worldhost.start(listen=True, config=tcp(max_line_bytes=4096))
    bot, _ = await opened(h.tcp_port)
    await bot.send(json.dumps({"id": 1, "action": "chat.say", "params": {"text": "hi"}})
                   .encode() + b"\n" + b'{"id": 2, "action": "' + b"x" * 8000 + b'"}\n')
    got = []
    while True:
        message = await bot.recv()
        got.append(message["signal"])
        if message["signal"] == "connection.closed":
            break
    assert got[-4:] == ["chat.said", "chat.message", "error", "connection.closed"], got


async def test_a_big_line_before_a_session_closes_unread(worldhost: Any) -> None:
    h = await worldhost.start(listen=True, config={
        **tcp(), "host": {"limits": {"max_frame_bytes_before_session": 1024}}})
    bot = await Lines.connect(h.tcp_port)
    await bot.send(b'{"action": "host.ping", "params": {"x": "' + b"y" * 100_000)  # no end
    closed = await bot.closed()
    assert closed["code"] == 1009 and "before a session" in closed["reason"]


async def test_bad_utf8_and_bad_json_are_answered_and_the_connection_survives(
        worldhost: Any) -> None:
    h = await worldhost.start(listen=True, config=TCP)
    bot, _ = await opened(h.tcp_port)
    for bad, says in ((b'{"action": "host.ping", "params": {"x": "\xff\xfe"}}', "UTF-8"),
                      (b'{"action": "host.ping",', "JSON"),
                      (b'{"id": 3, "action": "host.ping", "params": {"x": NaN}}', "JSON"),
                      (b"[1, 2]", "object"),
                      (b"[" * 1000 + b"]" * 1000, "depth"),
                      (b"[" * 100_000 + b"]" * 100_000, "max_player_frame_items"),
                      (b'{"action": "host.ping", "params": {"a": [' +
                       b",".join([b"0"] * 200_000) + b"]}}", "max_player_frame_items")):
        await bot.send(bad + b"\n")
        error = await bot.until("error")
        assert error["data"]["code"] == "bad_frame", error
        assert says.lower() in error["data"]["message"].lower(), (says, error)
    assert error["re"] is None
    assert (await bot.call(9, "host.ping", n=1))["data"] == {"n": 1}


async def test_a_half_line_then_a_stall_is_closed(worldhost: Any) -> None:
    h = await worldhost.start(listen=True, config={
        **tcp(line_timeout_s=0.5), "sessions": {"auth_timeout_s": 1.0}})
    bot, _ = await opened(h.tcp_port)
    await bot.send(b'{"action": "host.pi')
    closed = await bot.closed()
    assert closed["code"] == 1008 and "line_timeout_s" in closed["reason"]
    # without a session the auth timeout closes it first (or the line timeout: either ends it)
    idle = await Lines.connect(h.tcp_port)
    await idle.send(b"{")
    assert (await idle.closed())["code"] == 1008


async def test_no_session_in_time_is_closed_with_a_reason(worldhost: Any) -> None:
    h = await worldhost.start(listen=True, config={**TCP, "sessions": {"auth_timeout_s": 0.5}})
    bot = await Lines.connect(h.tcp_port)
    assert (await bot.closed()) == {"code": 1008, "reason": "no session opened in time"}


async def test_the_rate_limit_applies_to_lines(worldhost: Any) -> None:
    h = await worldhost.start(listen=True, config={**TCP, "host": {"limits": {
        "rate_per_s": 5, "rate_burst": 5, "flood_factor": 100}}})
    bot, _ = await opened(h.tcp_port)
    await bot.send(b"".join(json.dumps({"id": n, "action": "host.ping"}).encode() + b"\n"
                            for n in range(20)))
    replies = []
    while len(replies) < 20:
        message = await bot.recv()
        if "re" in message:
            replies.append(message)
    assert [r["re"] for r in replies] == list(range(20))  # each answered, in order
    limited = [r for r in replies if r["signal"] == "error"]
    assert len(limited) >= 10, replies
    assert all(r["data"]["code"] == "rate_limited" for r in limited)
    assert "actions/s" in limited[0]["data"]["message"]


async def test_hundreds_of_idle_sockets_do_not_hold_up_a_working_client(
        worldhost: Any) -> None:
    h = await worldhost.start(listen=True, config=TCP)
    async with h.tcp_client("worker") as worker:
        idle: list[trio.SocketStream] = []
        try:
            for n in range(500):
                idle.append(await trio.open_tcp_stream("127.0.0.1", h.tcp_port))
                if n % 50 == 0:
                    with trio.fail_after(2):
                        assert await worker.call("host.ping", n=n) == {"n": n}
            with trio.fail_after(2):
                assert await worker.call("chat.say", text="still here")
            # idle sockets count against max_connections_per_address: the oldest are closed
            transport = h.host.transport
            assert transport.open <= h.config.host.limits.max_connections_per_address + 1
            oldest = Lines(idle[0])
            assert (await oldest.recv())["signal"] == "server.info"
            closed = await oldest.closed()
            assert closed["code"] == 1008 and "from this address" in closed["reason"]
        finally:
            for stream in idle:
                await stream.aclose()


async def test_tcp_and_websocket_connections_share_the_connection_caps(worldhost: Any) -> None:
    h = await worldhost.start(listen=True, config={
        **TCP, "host": {"limits": {"max_connections_per_address": 2}}})
    first, second = await Lines.connect(h.tcp_port), await Lines.connect(h.tcp_port)
    for bot in (first, second):
        assert (await bot.recv())["signal"] == "server.info"
    async with raw_connection(h) as ws:  # a third without a session, over WebSocket
        assert json.loads(await ws.get_message())["signal"] == "server.info"
        closed = await first.closed()
        assert closed["code"] == 1008 and "from this address" in closed["reason"]
        assert (await second.call(1, "host.ping"))["signal"] == "host.pong"


async def test_a_tcp_client_that_never_reads_is_dropped_and_others_carry_on(
        worldhost: Any) -> None:
    h = await worldhost.start(listen=True, config={**TCP, "host": {"limits": {
        "max_lag_s": 0.5, "socket_send_buffer": 16384, "rate_per_s": 10_000,
        "rate_burst": 10_000}}})
    stuck, data = await opened(h.tcp_port, "stuck")
    async with h.tcp_client("talker") as talker, h.client("watcher") as watcher:
        with trio.fail_after(20):
            while h.host.sessions.get(data["session_id"]).outbox is not None:
                await talker.call("chat.say", text="x" * 2000)  # stuck never reads these
        assert await watcher.call("host.ping", n=1) == {"n": 1}
        assert (await watcher.next_signal("chat.message"))["data"]["from"] == "talker"
        with trio.fail_after(10):  # the host closed it: what it had sent, then the end
            while await stuck.stream.receive_some(1 << 20):
                pass


async def test_lines_written_at_once_keep_their_order_when_the_socket_fills(
        worldhost: Any) -> None:
    """A line to an idle socket is written from the turn that made it; what the
    socket does not take goes first with the next write: a client that pauses
    while its socket fills then reads every line, whole, in seq order."""
    h = await worldhost.start(listen=True, config={**TCP, "host": {"limits": {
        "max_lag_s": 60.0, "socket_send_buffer": 4096, "outbox_size": 4096,
        "rate_per_s": 100_000, "rate_burst": 100_000}}})
    paused, _ = await opened(h.tcp_port, "pauses")
    texts = [f"{i:04d} " + "x" * 400 for i in range(300)]  # some 130 KB, past both buffers
    async with h.client("talker") as talker:
        for text in texts:
            await talker.call("chat.say", text=text)
    said, seqs = [], []
    while len(said) < len(texts):
        signal = await paused.recv()  # a torn line would not parse
        seqs.append(signal["seq"])
        if signal["signal"] == "chat.message":
            said.append(signal["data"]["text"])
    assert said == texts
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))


async def test_a_clean_stop_says_so_and_a_tcp_client_resumes_after_a_crash(
        worldhost: Any) -> None:
    h = await worldhost.start(listen=True, config=TCP)
    bot, _ = await opened(h.tcp_port)
    async with h.tcp_client("ada") as ada:
        await ada.call("chat.say", text="one")
        await h.crash()
        await h.restart()  # on a new port: the client follows the harness
        await ada.call("chat.say", text="two")
        assert ada.resumes == 1 and ada.last_resume is not None
        texts = []
        while len(texts) < 2:
            texts.append((await ada.next_signal("chat.message"))["data"]["text"])
        assert texts == ["one", "two"]
        bot, _ = await opened(h.tcp_port, "bot")
        await h.stop()
        assert await bot.closed() == {"code": 1001, "reason": "server shutting down"}


# --- a real `worldhost serve`, and arbitrary lines -----------------------------------

@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProcess, int]]:
    folder = tmp_path_factory.mktemp("lines")
    port = free_port()
    (folder / "tcp.toml").write_text(
        f"[transports.tcp]\nenabled = true\nport = {port}\n"
        "[host.limits]\nrate_per_s = 100000\nrate_burst = 100000\n")
    proc = ServerProcess(folder / "world.db", config=folder / "tcp.toml").start()
    assert proc.proc is not None and proc.proc.stdout is not None
    yield proc, port
    assert proc.stop() == 0


def test_serve_says_where_it_listens_for_lines(served: tuple[ServerProcess, int]) -> None:
    proc, port = served
    assert proc.proc is not None and proc.proc.stdout is not None
    assert proc.proc.stdout.readline() == f"listening on tcp://127.0.0.1:{port}\n"


class SyncLines:
    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.file = self.sock.makefile("rb")

    def recv(self) -> dict[str, Any]:
        line = self.file.readline()
        assert line.endswith(b"\n"), "the host closed the connection"
        message: dict[str, Any] = json.loads(line)
        return message


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=12)
_lines = st.one_of(
    st.binary(max_size=200),
    st.text(max_size=100).map(lambda t: t.encode("utf-8", "surrogatepass")),
    st.dictionaries(st.sampled_from(["id", "action", "params", "chunk", "x"]), _json_values,
                    max_size=4).map(lambda d: json.dumps(d).encode()),
).map(lambda b: b.replace(b"\n", b" "))


@given(line=_lines)
@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_any_line_gets_one_answer_and_the_connection_survives(
        served: tuple[ServerProcess, int], line: bytes) -> None:
    conn = _session(served[1])
    probe = f"probe-{next(_probes)}"
    conn.sock.sendall(line + b"\n" + json.dumps({"id": probe, "action": "host.ping"}).encode()
                      + b"\n")
    answers = []
    while True:
        message = conn.recv()
        if message.get("re") == probe:
            break
        if "re" in message:
            answers.append(message)
    blank = not line.rstrip(b"\r").strip()
    assert len(answers) == (0 if blank else 1), (line, answers)
    if answers and answers[0]["signal"] == "error":
        assert answers[0]["data"]["code"] in ("bad_frame", "bad_request", "unknown_action",
                                              "validation_error", "conflict",
                                              "unauthenticated"), answers


_probes = itertools.count()
_sessions: dict[int, SyncLines] = {}


def _session(port: int) -> SyncLines:
    """One connection with a session for every example (a new one if an example
    closed the session)."""
    conn = _sessions.get(port)
    if conn is None:
        conn = _sessions[port] = SyncLines(port)
        assert conn.recv()["signal"] == "server.info"
        conn.sock.sendall(b'{"id": "open", "action": "session.open", "params": {"name": "h"}}\n')
        while conn.recv().get("re") != "open":
            pass
    return conn


async def test_a_flood_of_blank_lines_is_a_flood(worldhost: Any) -> None:
    """A blank line asks nothing, but reading one costs the host as a request does:
    each counts toward the flood rule (not the rate), and a client that sends them
    by the million is disconnected as any flooder is, session or not."""
    h = await worldhost.start(listen=True, config={
        **tcp(), "host": {"limits": {"rate_per_s": 20, "rate_burst": 40}}})
    other, _ = await opened(h.tcp_port, "other")
    for with_session in (False, True):
        if with_session:
            bot, _ = await opened(h.tcp_port)
        else:
            bot = await Lines.connect(h.tcp_port)
            assert (await bot.recv())["signal"] == "server.info"
        await bot.send(b"\n\r\n  \n" * 20)  # a few: Enter in nc, nothing to say
        assert (await bot.call(7, "host.ping", n=7))["data"] == {"n": 7}
        try:
            for _ in range(200):
                await bot.send(b"\n" * 65536)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        closed = await bot.closed()
        assert closed["code"] == 1008 and "flooding" in closed["reason"]
        assert (await other.call(1, "host.ping", n=1))["data"] == {"n": 1}
