"""Line-delimited JSON over TCP: one envelope per line each way.

A line is a message as a WebSocket text frame is, and the transport's connection
does the rest the same way (envelopes, limits, sessions, replay). What only a
line needs is here: finding lines in a byte stream within a length cap and a
time limit, and saying why the connection closes, since TCP has no close code:
the last line the host sends is ``connection.closed`` ``{code, reason}``, with the
WebSocket close codes. JSON only: CBOR is binary, and binary has no lines.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable
from functools import partial

import trio

from host.actions import ActionError
from host.channel import (
    SKIPPED,
    ChannelClosed,
    Incoming,
    Outgoing,
    Refused,
    Unreadable,
    send_within,
)
from host.config import Config
from host.framing import encode_frame
from host.messages import Signal
from host.transport import GOING_AWAY, POLICY, TOO_BIG, Slot, Transport, stream_address

log = logging.getLogger("worldhost.transport")

CRASHED = 1006  # the host vanished (tests' crash()): nothing more is said
_READ = 64 * 1024


def _lines(frames: list[str | bytes]) -> bytes:
    return b"".join((f.encode("utf-8", "surrogatepass") if isinstance(f, str) else f) + b"\n"
                    for f in frames)


class LineChannel:
    """Lines of UTF-8 JSON on a byte stream.

    ``cap`` gives the longest line the connection takes now, and whether a longer
    one is answered (``error``, then the connection closes 1009) or closes it at
    once (before a session, as an oversize WebSocket frame does).
    """

    pings = False  # TCP keepalive finds dead peers; a stuck reader meets the send timeout

    def __init__(self, stream: trio.abc.Stream, cap: Callable[[], tuple[int, bool]], *,
                 line_timeout_s: float, send_timeout_s: float) -> None:
        self.stream = stream
        self.cap = cap
        self.line_timeout_s = line_timeout_s
        self.send_timeout_s = send_timeout_s
        self._buffer = bytearray()
        self._scanned = 0  # bytes of the buffer known to hold no newline
        self._begun: float | None = None  # when the unfinished line's first byte came
        self.closed = False
        self.said_why = False  # the connection.closed line went out
        self._out = Outgoing(stream)
        self._incoming = Incoming(stream)
        self._writing = False  # a task is in send_many
        self._read_since = True  # a read happened since the last line was returned

    async def receive(self) -> str:
        if not self._read_since:  # lines read together: a turn for the others first
            await trio.lowlevel.checkpoint()
        self._read_since = False
        while True:
            end = self._buffer.find(b"\n", self._scanned)
            if end < 0:
                self._scanned = len(self._buffer)
                self._check_length(len(self._buffer))
                await self._read()
                continue
            self._check_length(end)
            line = bytes(self._buffer[:end])
            del self._buffer[:end + 1]
            self._scanned = 0
            self._begun = trio.current_time() if self._buffer else None
            if line.endswith(b"\r"):
                line = line[:-1]
            if not line.strip():
                return SKIPPED  # an empty line (Enter pressed in nc) asks nothing
            try:
                return line.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise Unreadable(ActionError(
                    f"a line must be UTF-8 JSON: invalid byte at offset {exc.start}",
                    code="bad_frame")) from None

    def _check_length(self, length: int) -> None:
        limit, answered = self.cap()
        if length <= limit:
            return
        self._buffer.clear()  # not read on: the connection closes
        self._scanned = 0
        if not answered:
            raise Refused(TOO_BIG, f"line over {limit} bytes before a session "
                                   f"(host.limits.max_frame_bytes_before_session)")
        reason = f"line over {limit} bytes (transports.tcp.max_line_bytes)"
        raise Refused(TOO_BIG, reason, ActionError(reason + "; closing", code="bad_frame"))

    async def _read(self) -> None:
        if self._begun is None and self._buffer:
            self._begun = trio.current_time()
        if self._begun is None:  # no line begun: nothing to time (the hot path)
            data = await self._receive()
        else:
            with trio.move_on_at(self._begun + self.line_timeout_s) as timer:
                data = await self._receive()
            if timer.cancelled_caught:
                self._buffer.clear()
                raise Refused(POLICY, f"line not finished within {self.line_timeout_s:g} s "
                                      f"(transports.tcp.line_timeout_s)")
        if not data:
            self.closed = True
            raise ChannelClosed
        self._buffer += data
        self._read_since = True

    async def _receive(self) -> bytes | bytearray:
        """The next bytes read; b"" once the peer is gone."""
        try:
            return await self._incoming.receive(_READ)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return b""

    async def send(self, frame: str | bytes) -> None:
        await self.send_many([frame])

    async def send_many(self, frames: list[str | bytes]) -> None:
        data = self._out.take_rest() + _lines(frames)
        self._writing = True
        try:
            await send_within(self.stream, data, self.send_timeout_s)
        except ChannelClosed:
            self.closed = True
            raise
        finally:
            self._writing = False

    @property
    def writable_now(self) -> bool:
        return not (self._writing or self.closed) and self._out.ready

    @property
    def pending(self) -> bool:
        return b"\n" in self._buffer

    def send_now(self, frames: list[str | bytes]) -> None:
        self._out.write_now(_lines(frames))

    @property
    def backlog(self) -> bool:
        return bool(self._out.rest)

    async def ping(self) -> None:
        raise NotImplementedError("a line channel does not ping")

    async def close(self, code: int, reason: str) -> None:
        """Say why in a last line (``linger`` then closes the socket)."""
        if self.closed:
            return
        self.closed = True
        if code == CRASHED:
            return
        line = encode_frame(Signal("connection.closed", {"code": code, "reason": reason}),
                            "json")
        with trio.move_on_after(1):
            try:
                await self.send(line)
                self.said_why = True
            except ChannelClosed:
                pass

    async def linger(self) -> None:
        """Once the connection's tasks are done: close so that the last line is read.
        Closing with unread input resets the connection, and a reset can destroy
        the line before the client reads it, so stop sending and drain what the
        client still sends, for a second at most."""
        if not self.said_why:
            return
        with trio.CancelScope(shield=True), trio.move_on_after(1):
            try:
                await self.stream.send_eof()  # type: ignore[attr-defined]
                while await self.stream.receive_some(_READ):
                    pass
            except (trio.BrokenResourceError, trio.ClosedResourceError, AttributeError):
                pass


async def serve_tcp(nursery: trio.Nursery, transport: Transport, config: Config) -> int:
    """Listen for line connections (``[transports.tcp]``) and return the bound port.
    Each connection runs in ``nursery``, so it ends with the server."""
    tcp = config.transports.tcp
    listeners = await trio.open_tcp_listeners(tcp.port, host=tcp.host or config.host.bind)
    for listener in listeners:
        # as for WebSocket: a client that stops reading fills its buffers within
        # seconds, so its outbox lag shows and it is dropped
        listener.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF,
                                   config.host.limits.socket_send_buffer)
    started = await nursery.start(partial(
        trio.serve_listeners, partial(serve_lines, transport), listeners,
        handler_nursery=nursery))
    return int(started[0].socket.getsockname()[1])


async def serve_lines(transport: Transport, stream: trio.abc.Stream) -> None:
    """One line connection, in a slot of the transport's like any other."""
    config = transport.config
    slot = transport.admit(stream_address(stream))
    try:
        if slot is None:
            return  # every connection has a session: no room
        sock = getattr(stream, "socket", None)
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        channel = None
        with slot.scope:  # cancelled to close it when room is needed
            channel = await _run(transport, stream, slot, config)
        if channel is not None:
            await channel.linger()
    finally:
        if slot is not None:
            transport.release(slot)
        await trio.aclose_forcefully(stream)


async def _run(transport: Transport, stream: trio.abc.Stream, slot: Slot,
               config: Config) -> LineChannel:
    tcp = config.transports.tcp
    limits = config.host.limits
    conn = None

    def cap() -> tuple[int, bool]:
        if conn is not None and conn.session is None:
            return min(tcp.max_line_bytes, limits.max_frame_bytes_before_session), False
        return tcp.max_line_bytes, True

    channel = LineChannel(stream, cap, line_timeout_s=tcp.line_timeout_s,
                          send_timeout_s=config.host.ping_timeout_s)
    if not transport.submit.accepting:
        await channel.close(GOING_AWAY, "server shutting down")
        return channel
    conn = transport.connection(channel, stream_address(stream), slot,
                                max_frame=min(tcp.max_line_bytes, limits.max_frame_bytes))
    await transport.run(conn)
    return channel
