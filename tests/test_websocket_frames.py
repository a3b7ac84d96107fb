"""The ``websockets`` channel's own framing (host/websockets_channel.py).

The channel unmasks whole, simple text and binary frames itself and makes the
frames it sends, and leaves everything else to the library's protocol. Here the
channel is fed random client byte streams, cut at random places, and must take
exactly the messages, and send exactly the bytes (pongs, close frames with their
codes), that the library's protocol alone takes and sends from the same stream;
its frames must be the library's, byte for byte.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from typing import Any

import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.client import ClientProtocol
from websockets.frames import Close, Frame, Opcode
from websockets.http11 import Response
from websockets.protocol import OPEN
from websockets.server import ServerProtocol
from websockets.uri import parse_uri

from host import config as config_mod
from host.channel import SKIPPED, Unreadable
from host.websockets_channel import HostProtocol, WebsocketsChannel
from serverproc import ServerProcess

BOUND = 300  # bytes a frame may hold before a session, here
CONFIG = config_mod.from_dict(
    {"host": {"limits": {"max_frame_bytes": 4 * BOUND, "max_frame_bytes_before_session": BOUND}}})


def channel() -> WebsocketsChannel:
    stream, _ = trio.testing.memory_stream_pair()
    return WebsocketsChannel(stream, HostProtocol(CONFIG, state=OPEN))


NOT_UTF8 = "(a text message that is not UTF-8)"


def reference(data: bytes, eof: bool) -> tuple[list[Any], bytes]:
    """The messages and the bytes to send of the library's protocol alone, fed the
    stream a byte at a time: each frame taken as soon as it is whole."""
    proto = HostProtocol(CONFIG, state=OPEN)
    messages: list[Any] = []
    parts: list[bytes] = []
    text = False
    for i in range(len(data)):
        proto.receive_data(data[i:i + 1])
        for frame in proto.events_received():
            assert isinstance(frame, Frame)
            if frame.opcode in (Opcode.TEXT, Opcode.BINARY):
                text, parts = frame.opcode is Opcode.TEXT, [frame.data]
            elif frame.opcode is Opcode.CONT:
                parts.append(frame.data)
            else:
                continue
            if not frame.fin:
                continue
            message = b"".join(parts)
            if not text:
                messages.append(message)
                continue
            try:
                messages.append(message.decode("utf-8"))
            except UnicodeDecodeError:  # a bad_frame for the host, and it reads on
                messages.append(NOT_UTF8)
    if eof and not proto.reader.eof:
        proto.receive_eof()
    return messages, b"".join(proto.data_to_send())


def head(first: int, length: int, masked: bool, wide: int | None) -> bytes:
    """A frame header, its length encoded minimally or as ``wide`` (2 or 8 bytes)."""
    mask_bit = 0x80 if masked else 0
    if wide is None:
        wide = 0 if length < 126 else 2 if length < 65536 else 8
    if wide == 0:
        return bytes((first, mask_bit | length))
    return bytes((first, mask_bit | (126 if wide == 2 else 127))) + length.to_bytes(wide, "big")


@st.composite
def frames(draw: st.DrawFn) -> bytes:
    """One client frame: mostly well-formed, some hostile."""
    kind = draw(st.sampled_from(["text", "text", "binary", "fragmented", "ping", "pong",
                                 "bad utf-8", "odd header", "close"]))
    mask = draw(st.binary(min_size=4, max_size=4))
    size = draw(st.one_of(st.integers(0, 130), st.integers(BOUND - 2, BOUND + 2)))
    payload = draw(st.binary(min_size=size, max_size=size))
    if kind == "text":
        text = draw(st.text(max_size=size))
        return Frame(Opcode.TEXT, text.encode()).serialize(mask=True)
    if kind == "binary":
        return Frame(Opcode.BINARY, payload).serialize(mask=True)
    if kind == "fragmented":
        cut = draw(st.integers(0, len(payload)))
        opcode = draw(st.sampled_from([Opcode.TEXT, Opcode.BINARY]))
        data = payload if opcode is Opcode.BINARY else payload.decode("latin-1").encode()
        return (Frame(opcode, data[:cut], fin=False).serialize(mask=True)
                + Frame(Opcode.CONT, data[cut:]).serialize(mask=True))
    if kind in ("ping", "pong"):
        opcode = Opcode.PING if kind == "ping" else Opcode.PONG
        return Frame(opcode, payload[:125]).serialize(mask=True)
    if kind == "bad utf-8":
        return Frame(Opcode.TEXT, b"ok\xff" + payload[:20]).serialize(mask=True)
    if kind == "close":
        return Frame(Opcode.CLOSE, Close(1000, "bye").serialize()).serialize(mask=True)
    # "odd header": a non-minimal length, no mask, a reserved bit, or a bad opcode
    first = draw(st.sampled_from([0x81, 0x82, 0x91, 0x83, 0x01, 0x80]))
    masked = draw(st.booleans())
    wide = draw(st.sampled_from([None, 2, 8]))
    body = bytes(b ^ mask[i % 4] for i, b in enumerate(payload)) if masked else payload
    return head(first, len(payload), masked, wide) + (mask if masked else b"") + body


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(frames(), max_size=8), st.data(), st.booleans())
def test_the_channel_takes_and_sends_what_the_library_alone_would(
        stream: list[bytes], data: st.DataObject, eof: bool) -> None:
    joined = b"".join(stream)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(joined)), max_size=12)))
    ch = channel()
    for start, stop in zip([0, *cuts], [*cuts, len(joined)]):
        if start < stop:
            ch._feed(joined[start:stop])
    if eof:
        ch._feed(b"")
    messages, sent = reference(joined, eof)
    assert [NOT_UTF8 if isinstance(m, Unreadable) else m for m in ch._messages
            if m is not SKIPPED] == messages
    assert b"".join(ch._take_writes()) == sent


@pytest.mark.parametrize("start", [b"\x83\xfe", b"\x81\x7e"], ids=["bad opcode", "no mask"])
def test_a_bad_header_is_refused_from_its_first_two_bytes(start: bytes) -> None:
    ch = channel()
    ch._feed(start)
    assert ch.proto.close_sent is not None and ch.proto.close_sent.code == 1002
    assert b"".join(ch._take_writes()).startswith(b"\x88")  # the close frame, to send


def test_a_frame_right_behind_the_handshake_is_taken() -> None:
    stream, _ = trio.testing.memory_stream_pair()
    ping = Frame(Opcode.TEXT, b'{"action": "host.ping"}').serialize(mask=True)
    ch = WebsocketsChannel(stream, HostProtocol(CONFIG, state=OPEN), rest=ping[:5])
    ch.start()
    assert not ch._messages
    ch._feed(ping[5:] + ping)
    assert list(ch._messages) == ['{"action": "host.ping"}'] * 2


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(st.text(max_size=200), st.binary(max_size=200),
                          st.sampled_from([125, 126, 65535, 65536]).map(lambda n: b"x" * n))))
def test_the_frames_sent_are_the_librarys_byte_for_byte(messages: list[str | bytes]) -> None:
    library = ServerProtocol(state=OPEN)
    for message in messages:
        if isinstance(message, str):
            library.send_text(message.encode())
        else:
            library.send_binary(message)
    ch = channel()
    ch._frame(messages)
    assert b"".join(ch._take_writes()) == b"".join(library.data_to_send())


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    proc = ServerProcess(tmp_path_factory.mktemp("frames") / "world.db",
                         env={"WORLDHOST_WEBSOCKET": "websockets"}).start()
    yield proc
    assert proc.stop() == 0


def test_frames_sent_with_the_handshake_in_one_write_are_answered(server: ServerProcess) -> None:
    """A real server, a real socket: the upgrade request and two pings (one of them
    cut in two by the write) arrive together; the pings are answered after
    ``server.info``, in order, in frames a client's protocol reads."""
    client = ClientProtocol(parse_uri(server.url))
    client.send_request(client.connect())
    pings = [Frame(Opcode.TEXT, json.dumps(
        {"id": n, "action": "host.ping", "params": {"n": n}}).encode()).serialize(mask=True)
        for n in (1, 2)]
    head = b"".join(client.data_to_send())
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(head + pings[0] + pings[1][:3])
        sock.sendall(pings[1][3:])
        messages: list[dict[str, Any]] = []
        while len(messages) < 3:
            data = sock.recv(65536)
            assert data, "the server hung up"
            client.receive_data(data)
            for event in client.events_received():
                if isinstance(event, Response):
                    assert event.status_code == 101
                elif isinstance(event, Frame) and event.opcode is Opcode.TEXT:
                    messages.append(json.loads(event.data))
    assert [m["signal"] for m in messages] == ["server.info", "host.pong", "host.pong"]
    assert [(m["re"], m["data"]) for m in messages[1:]] == [(1, {"n": 1}), (2, {"n": 2})]
