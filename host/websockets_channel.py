"""The WebSocket channel on the ``websockets`` library (``[host] websocket = "websockets"``).

The same face as host/websocket.py (trio-websocket): messages in, frames out,
``ChannelClosed`` when the peer is gone. The handshake is the one the HTTP face
already read (host/http.py reads the request head before it knows what the
request is), fed to websockets' sans-I/O ``ServerProtocol``; from then on its
trio ``Connection`` reads and writes the frames, with permessage-deflate if
``websocket_compression`` is on. The library itself sizes a frame in bytes
(after inflating it) and closes with 1009, checks text as UTF-8 (1007) and
answers a frame it cannot parse with a close frame (1002), which host/websocket.py
has to add to trio-websocket by hand.
"""

from __future__ import annotations

import logging
from typing import Any

import trio
from websockets.exceptions import ConnectionClosed
from websockets.extensions.permessage_deflate import enable_server_permessage_deflate
from websockets.frames import Close, CloseCode
from websockets.http11 import Request
from websockets.protocol import OPEN
from websockets.server import ServerProtocol
from websockets.trio.connection import Connection as WsConnection

from host.channel import ChannelClosed
from host.config import Config
from host.transport import Connection, Slot, Transport
from host.websocket import origin_ok

# the library logs every connection opened and closed at INFO: only its warnings here
_library_log = logging.getLogger("worldhost.transport.websockets")
_library_log.setLevel(logging.WARNING)

CLOSE_TIMEOUT_S = 1.0  # for the client's answer to our close frame, as trio-websocket waits
_MAX_REASON = 123  # bytes: a close frame's payload is at most 125, two of them the code


class WebsocketsChannel:
    """One accepted WebSocket on websockets' trio connection. Text frames are JSON,
    binary frames CBOR."""

    pings = True

    def __init__(self, ws: WsConnection) -> None:
        self.ws = ws

    @property
    def closed(self) -> bool:
        return self.ws.protocol.state is not OPEN

    async def receive(self) -> str | bytes:
        try:
            return await self.ws.recv()
        except ConnectionClosed:
            raise ChannelClosed from None

    async def send(self, frame: str | bytes) -> None:
        await self.send_many([frame])

    async def send_many(self, frames: list[str | bytes]) -> None:
        # What the library's own broadcast() does (frame it, then write what the
        # protocol has to send), without send()'s async context manager (a generator
        # per frame, in the hot path), and with the frames joined into one write.
        ws = self.ws
        proto = ws.protocol
        if proto.state is not OPEN:
            raise ChannelClosed
        for frame in frames:
            if isinstance(frame, str):
                proto.send_text(frame.encode())
            else:
                proto.send_binary(frame)
        try:
            async with ws.send_lock:
                data = proto.data_to_send()
                await ws.stream.send_all(b"".join(data))
                if not all(data):  # the protocol is done with the stream: as the library does
                    await _end(ws.stream)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            raise ChannelClosed from None

    async def ping(self) -> None:
        try:
            pong = await self.ws.ping(ack_on_close=True)
        except ConnectionClosed:
            raise ChannelClosed from None
        await pong.wait()
        if self.closed:  # acknowledged by the close, not by a pong
            raise ChannelClosed

    async def close(self, code: int, reason: str) -> None:
        if not _sendable(code):  # 1006 (vanished, as under kill -9): no frame at all
            await trio.aclose_forcefully(self.ws.stream)
            return
        await self.ws.aclose(code, _truncate(reason))


async def _end(stream: trio.abc.Stream) -> None:
    """Half-close the TCP connection when possible, else close it."""
    if isinstance(stream, trio.abc.HalfCloseableStream):
        try:
            await stream.send_eof()
        except Exception:  # noqa: BLE001 - as websockets' own send_data: it is closing anyway
            pass
    else:
        await stream.aclose()


def _sendable(code: int) -> bool:
    try:
        Close(code, "").check()
    except Exception:  # noqa: BLE001 - websockets raises ProtocolError for a reserved code
        return False
    return True


def _truncate(reason: str) -> str:
    data = reason.encode("utf-8")
    return reason if len(data) <= _MAX_REASON else \
        data[:_MAX_REASON].decode("utf-8", "ignore")


class HostProtocol(ServerProtocol):
    """websockets' server protocol with the host's two frame bounds, in bytes after
    inflating: ``max_frame_bytes_before_session`` until the connection has a session,
    ``max_frame_bytes`` while it has one.

    The library reads ``max_message_size`` as it starts parsing each frame (in its
    reader task, ahead of the transport) and hands the bound to permessage-deflate,
    which stops inflating there: so a small compressed frame sent before a session
    cannot inflate past the pre-session bound, as it could with one fixed
    ``max_size``. The 1009 it closes with names the limit and its key.
    """

    def __init__(self, config: Config, **kwargs: Any) -> None:
        limits = config.host.limits
        self.before_session = limits.max_frame_bytes_before_session
        self.conn: Connection | None = None  # set once the transport has a connection
        super().__init__(max_size=limits.max_frame_bytes, **kwargs)

    @property  # type: ignore[override]
    def max_message_size(self) -> int:
        return self.full if self.in_session else min(self.full, self.before_session)

    @max_message_size.setter
    def max_message_size(self, value: int) -> None:
        self.full = value  # the library's own max_size, set in its __init__

    @property
    def in_session(self) -> bool:
        return self.conn is not None and self.conn.session is not None

    def fail(self, code: CloseCode | int, reason: str = "") -> None:
        if code == CloseCode.MESSAGE_TOO_BIG:
            reason = f"frame over {self.full} bytes (host.limits.max_frame_bytes)" \
                if self.max_message_size == self.full else \
                f"frame over {self.before_session} bytes before a session " \
                f"(host.limits.max_frame_bytes_before_session)"
        super().fail(code, reason)


def protocol(config: Config) -> HostProtocol:
    """A server protocol bounding frames as the host does (:class:`HostProtocol`),
    with permessage-deflate if ``websocket_compression`` is on."""
    cfg = config.host
    extensions = enable_server_permessage_deflate(None) if cfg.websocket_compression else None
    return HostProtocol(config, extensions=extensions, logger=_library_log)


async def handshake(transport: Transport, stream: trio.abc.Stream,
                    head: bytes) -> HostProtocol | None:
    """Answer the upgrade request in ``head``: 101, or 403 (origin), 503 (shutting
    down), 400/426 (not a valid WebSocket request). The protocol, if it is open."""
    proto = protocol(transport.config)
    proto.receive_data(head)
    request = next((e for e in proto.events_received() if isinstance(e, Request)), None)
    if request is not None:
        cfg = transport.config.host
        if not origin_ok(_first(request, "Origin"), _first(request, "Host"),
                         cfg.allowed_origins):
            response = proto.reject(403, "origin not allowed")
        elif not transport.submit.accepting:
            response = proto.reject(503, "shutting down")
        else:
            response = proto.accept(request)
        proto.send_response(response)
    try:
        for data in proto.data_to_send():
            if data:
                await stream.send_all(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        return None
    return proto if proto.state is OPEN else None


async def serve(transport: Transport, stream: trio.abc.Stream, head: bytes, remote: str,
                slot: Slot | None, handshake_deadline: float) -> None:
    """One WebSocket connection whose request head is ``head``, to its end."""
    with trio.move_on_at(handshake_deadline):
        proto = await handshake(transport, stream, head)
    if proto is None:
        return
    async with trio.open_nursery() as nursery:  # websockets' reader task lives here
        ws = WsConnection(nursery, stream, proto, ping_interval=None,  # the host pings
                          close_timeout=CLOSE_TIMEOUT_S, max_queue=8)
        conn = transport.connection(WebsocketsChannel(ws), remote, slot)
        proto.conn = conn  # from now on the frame bound follows its session
        await transport.run(conn)
        nursery.cancel_scope.cancel()


def _first(request: Request, name: str) -> str | None:
    values = request.headers.get_all(name)
    return values[0] if values else None
