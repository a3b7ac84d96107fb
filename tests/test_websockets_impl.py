"""The second WebSocket implementation: ``[host] websocket = "websockets"``.

The host's own tests run on the default, ``websockets``; the whole suite runs on
trio-websocket with ``WORLDHOST_WEBSOCKET=trio-websocket``. Here, whatever the default:
the config key; a session, the HTTP face, origins and compression through the
``websockets`` library; and the hostile-frame, slow-reader, 1011 and kill -9
tests of the other files, imported and run again with this module's servers on
the ``websockets`` library (the environment's default for every host started
here, in-process or ``worldhost serve``).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from host import config as config_mod
from host.websockets_channel import WebsocketsChannel
from killtest import run as kill_cycles
from serverproc import ServerProcess
from test_hostile_frames import (  # noqa: F401 - fixtures and tests, run again here
    call,
    client,
    close_frame,
    server,
    test_a_big_frame_before_a_session_closes_the_connection_undecoded,
    test_a_flood_of_pieces_is_rate_limited_and_disconnected,
    test_a_protocol_violation_closes_with_1002,
    test_a_text_frame_is_limited_in_bytes_not_characters,
    test_a_text_frame_that_is_not_utf8_is_a_bad_frame,
    test_json_with_a_duplicate_key_is_refused,
    tight,
)
from test_protocol import test_frame_over_the_limit_closes_with_1009  # noqa: F401
from test_slow_clients import (  # noqa: F401
    test_a_reader_stalled_mid_frame_is_cut_off_without_a_broken_frame,
)
from test_unchanged import test_a_connection_that_fails_closes_alone_with_1011  # noqa: F401

WEBSOCKETS = {"host": {"websocket": "websockets"}}


@pytest.fixture(scope="module", autouse=True)
def websockets_by_default() -> Iterator[None]:
    """Every host this module starts (in-process, or a ``worldhost serve`` that
    inherits the environment) serves WebSocket with the ``websockets`` library."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(config_mod.WEBSOCKET_ENV, "websockets")
        yield


def handshake_head(port: int, extra: str = "") -> str:
    """The host's answer to a bare upgrade request: status line and headers."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(f"GET / HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
                     f"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                     f"Sec-WebSocket-Version: 13\r\n{extra}\r\n".encode())
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(4096)
            if not chunk:
                break
            data += chunk
    return data.partition(b"\r\n\r\n")[0].decode("latin-1")


# the config key ------------------------------------------------------------------

def test_the_key_names_a_library_and_anything_else_is_refused_naming_it() -> None:
    assert config_mod.from_dict(WEBSOCKETS).host.websocket == "websockets"
    assert config_mod.from_dict(
        {"host": {"websocket": "trio-websocket"}}).host.websocket == "trio-websocket"
    with pytest.raises(config_mod.ConfigError, match=r"key 'host\.websocket'"):
        config_mod.from_dict({"host": {"websocket": "wsproto"}})
    with pytest.raises(config_mod.ConfigError, match=r"key 'host\.websocket_compression'.*"
                                                     r"websocket = \"websockets\""):
        config_mod.from_dict({"host": {"websocket": "trio-websocket",
                                       "websocket_compression": True}})


def test_the_default_is_websockets_and_the_environment_sets_only_the_default(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(config_mod.WEBSOCKET_ENV)
    assert config_mod.from_dict({}).host.websocket == "websockets"
    monkeypatch.setenv(config_mod.WEBSOCKET_ENV, "trio-websocket")
    assert config_mod.from_dict({}).host.websocket == "trio-websocket"
    assert config_mod.from_dict(WEBSOCKETS).host.websocket == "websockets"
    monkeypatch.setenv(config_mod.WEBSOCKET_ENV, "tornado")
    with pytest.raises(config_mod.ConfigError, match="WORLDHOST_WEBSOCKET='tornado'"):
        config_mod.from_dict({})


def test_serve_refuses_an_unknown_library_in_one_line(tmp_path: Path) -> None:
    (tmp_path / "bad.toml").write_text('[host]\nwebsocket = "uvicorn"\n')
    done = subprocess.run([sys.executable, "-m", "host", "serve", "--config",
                           str(tmp_path / "bad.toml"), "--db", str(tmp_path / "w.db"),
                           "--port", "0"], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "WORLDHOST_LOG": "WARNING"})
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "host.websocket" in lines[0], done.stderr


def test_a_real_server_follows_the_library_chosen(tmp_path: Path) -> None:
    """websockets dates its 101 and wsproto does not: the answer shows which one
    served it (so the tests imported above are known to run on websockets)."""
    chosen = ServerProcess(tmp_path / "a.db").start()  # this module's default
    (tmp_path / "trio.toml").write_text('[host]\nwebsocket = "trio-websocket"\n')
    other = ServerProcess(tmp_path / "b.db", config=tmp_path / "trio.toml").start()
    try:
        head = handshake_head(chosen.port).lower()
        assert head.startswith("http/1.1 101") and "\r\ndate:" in head, head
        head = handshake_head(other.port).lower()
        assert head.startswith("http/1.1 101") and "\r\ndate:" not in head, head
    finally:
        assert chosen.stop() == 0 and other.stop() == 0


# the protocol through the websockets library --------------------------------------

async def test_sessions_broadcasts_and_resume_over_the_websockets_library(
        worldhost: Any) -> None:
    h = await worldhost.start(config=WEBSOCKETS)  # over in-memory streams: the same path
    async with h.client("ada") as ada, h.client("bob") as bob:
        channels = {type(c.channel) for c in h.host.transport.connections}
        assert channels == {WebsocketsChannel}
        assert await ada.call("host.ping", n=1) == {"n": 1}
        await ada.call("chat.say", text="hello")
        with trio.fail_after(10):
            async for signal in bob.signals():
                if signal["signal"] == "chat.message":
                    assert signal["data"]["text"] == "hello"
                    break
        await h.crash()
        await h.restart()  # ada resumes, and what she says still reaches bob
        await ada.call("chat.say", text="again")
        with trio.fail_after(10):
            async for signal in bob.signals():
                if signal["signal"] == "chat.message" and signal["data"]["text"] == "again":
                    break
        history = (await bob.call("chat.history", limit=10))["messages"]
        assert [m["text"] for m in history] == ["hello", "again"]


async def test_http_and_the_websocket_share_the_port_and_origins_are_checked(
        worldhost: Any) -> None:
    h = await worldhost.start(listen=True, config={
        "host": {"websocket": "websockets", "allowed_origins": ["https://game.example"]}})
    port = h.host.port
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    await stream.send_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    answer = b""
    while chunk := await stream.receive_some(4096):
        answer += chunk
    assert answer.startswith(b"HTTP/1.1 200") and b'"up": true' in answer
    foreign = await trio.to_thread.run_sync(
        handshake_head, port, "Origin: https://evil.example\r\n")
    assert foreign.startswith("HTTP/1.1 403"), foreign
    listed = await trio.to_thread.run_sync(
        handshake_head, port, "Origin: https://game.example\r\n")
    assert listed.startswith("HTTP/1.1 101"), listed


def test_compression_is_offered_when_configured_and_bounded_after_inflating(
        tmp_path: Path) -> None:
    (tmp_path / "deflate.toml").write_text(
        '[host]\nwebsocket = "websockets"\nwebsocket_compression = true\n'
        '[host.limits]\nmax_frame_bytes = 65536\n')
    proc = ServerProcess(tmp_path / "w.db", config=tmp_path / "deflate.toml").start()
    plain = ServerProcess(tmp_path / "p.db").start()  # compression off: the default
    try:
        ws = client(proc, "zip")
        assert [e.name for e in ws.protocol.extensions] == ["permessage-deflate"]
        text = "abc" * 10_000  # 30 KB that deflate makes small
        assert call(ws, "host.ping", {"x": text})["data"] == {"x": text}
        ws.send(json.dumps({"id": 1, "action": "host.ping", "params": {"x": "0" * 1_000_000}}))
        code, reason = close_frame(ws)  # some 1 KB on the wire, 1 MB inflated
        assert code == 1009, (code, reason)
        with connect(plain.url) as other:
            assert other.protocol.extensions == []
            assert json.loads(other.recv(timeout=10))["signal"] == "server.info"
        with client(proc) as other:  # the host carries on
            assert call(other, "host.ping")["signal"] == "host.pong"
    finally:
        assert proc.stop() == 0 and plain.stop() == 0


def test_a_compressed_frame_before_a_session_inflates_no_further_than_its_bound(
        tmp_path: Path) -> None:
    """Some 60 KB deflated, 60 MB inflated, under max_frame_bytes but sent without a
    session: inflating stops at max_frame_bytes_before_session and the connection
    closes with 1009 naming it; the host's memory never holds the 60 MB, others
    carry on, and with a session the bound is max_frame_bytes again."""
    (tmp_path / "deflate.toml").write_text(
        '[host]\nwebsocket = "websockets"\nwebsocket_compression = true\n'
        '[host.limits]\nmax_frame_bytes = 67108864\n')
    proc = ServerProcess(tmp_path / "w.db", config=tmp_path / "deflate.toml").start()
    try:
        bystander = client(proc, "bystander")
        bomb = client(proc)
        assert [e.name for e in bomb.protocol.extensions] == ["permessage-deflate"]
        before = proc.memory_mib("VmHWM")
        bomb.send(json.dumps({"id": 1, "action": "host.ping",
                              "params": {"x": "0" * 60_000_000}}))
        code, reason = close_frame(bomb)
        assert proc.memory_mib("VmHWM") - before < 16, (before, proc.memory_mib("VmHWM"))
        assert code == 1009 and "131072 bytes before a session" in reason and \
            "max_frame_bytes_before_session" in reason, (code, reason)
        assert call(bystander, "host.ping", {"ok": 1})["data"] == {"ok": 1}
        reply = call(bystander, "host.ping", {"x": "0" * 1_000_000}, rid="big")
        assert reply["data"]["code"] == "validation_error"  # read: over max_ping_bytes
        bystander.send(json.dumps({"id": 2, "action": "host.ping",
                                   "params": {"x": "0" * 70_000_000}}))
        code, reason = close_frame(bystander)
        assert code == 1009 and "67108864 bytes (host.limits.max_frame_bytes)" in reason, \
            (code, reason)
        with client(proc, "after") as other:
            assert call(other, "host.ping")["signal"] == "host.pong"
            assert call(other, "session.close")["signal"] == "session.closed"
            other.send(json.dumps({"id": 3, "action": "host.ping",
                                   "params": {"x": "0" * 1_000_000}}))
            code, reason = close_frame(other)  # without its session, the lower bound again
            assert code == 1009 and "before a session" in reason, (code, reason)
    finally:
        assert proc.stop() == 0


def test_a_client_gone_mid_frame_leaves_the_host_serving(server: ServerProcess) -> None:  # noqa: F811
    """Half a frame, then the socket closes: the connection ends, nothing else does."""
    ws = client(server, "half")
    ws.socket.sendall(b"\x81\xfe\x10\x00\x11\x22\x33\x44" + b"x" * 100)  # 4096 declared
    ws.socket.close()
    with client(server, "after") as other:
        assert call(other, "host.ping", {"ok": 1})["data"] == {"ok": 1}
    with pytest.raises((ConnectionClosed, OSError)):
        ws.recv(timeout=1)


def test_kill_nine_loses_nothing_acknowledged_over_websockets(tmp_path: Path) -> None:
    totals = kill_cycles(3, tmp_path, seed=20261130, websocket="websockets")
    assert totals.cycles == 3 and totals.acknowledged > 10
    assert (totals.lost, totals.invented, totals.check_failures) == (0, 0, 0), \
        totals.problems
    assert totals.resume_failures == 0
