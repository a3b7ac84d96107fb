"""The WebSocket channel on the ``websockets`` library (``[host] websocket = "websockets"``).

The same face as host/websocket.py (trio-websocket): messages in, frames out,
``ChannelClosed`` when the peer is gone. The handshake is the one the HTTP face
already read (host/http.py reads the request head before it knows what the
request is), fed to websockets' sans-I/O ``ServerProtocol``, which from then on
turns the bytes the connection's own tasks read and write into frames and back
(:class:`WebsocketsChannel`), with permessage-deflate if ``websocket_compression``
is on. The protocol sizes a frame in bytes (after inflating it) and closes with
1009, and answers a frame it cannot parse with a close frame (1002), which
host/websocket.py has to add to trio-websocket by hand. A text message that is
not UTF-8 is a ``bad_frame`` and the connection stays open, as PROTOCOL.md asks
of everything wrong with a frame but its size (RFC 6455 would close with 1007,
as trio-websocket does): the channel decodes text itself, the protocol only
frames it.
"""

from __future__ import annotations

import logging
from collections import deque
from typing import Any

import trio
from websockets.extensions.permessage_deflate import enable_server_permessage_deflate
from websockets.frames import Close, CloseCode, Frame, Opcode
from websockets.http11 import Request
from websockets.protocol import CLOSED, OPEN
from websockets.server import ServerProtocol

try:  # the library's own unmasking, in C where it was built with its speedups
    from websockets.speedups import apply_mask
except ImportError:  # pragma: no cover
    from websockets.utils import apply_mask

from host.actions import ActionError
from host.channel import SKIPPED, ChannelClosed, Incoming, Outgoing, Unreadable
from host.config import Config
from host.transport import Connection, Slot, Transport
from host.websocket import origin_ok

# the library logs every connection opened and closed at INFO: only its warnings here
_library_log = logging.getLogger("worldhost.transport.websockets")
_library_log.setLevel(logging.WARNING)

CLOSE_TIMEOUT_S = 1.0  # for the client's answer to our close frame, as trio-websocket waits
_RECEIVE_BYTES = 65536
_MAX_REASON = 123  # bytes: a close frame's payload is at most 125, two of them the code
# the first byte of a whole text or binary message in one frame (FIN, no RSV bit)
_TEXT, _BINARY = 0x81, 0x82
_OPCODES = frozenset(int(opcode) for opcode in Opcode)


class WebsocketsChannel:
    """One accepted WebSocket on websockets' sans-I/O protocol. Text frames are
    JSON, binary frames CBOR.

    The connection's own tasks read and write the socket: its reader feeds what
    arrives to the protocol and takes the messages out, its sender frames signals
    and writes them (several in one write). The library's trio ``Connection`` would
    put a reader task of its own and a queue between the socket and the host: a
    hand-off per message, about a third of the CPU an echo costs on it
    (bench/roundtrip.py). The protocol still does all of WebSocket: parsing and
    unmasking, the size bound (after inflating), pongs, the close handshake and
    its codes, except for the two commonest frames, which the channel takes and
    makes itself (:meth:`_feed`, :meth:`_frame`).
    """

    pings = True

    def __init__(self, stream: trio.abc.Stream, proto: HostProtocol,
                 rest: bytes = b"") -> None:
        self.stream = stream
        self.proto = proto
        self._incoming = Incoming(stream)
        self._unread = bytearray(rest)  # read, and not yet a whole frame
        self._owed = 0  # bytes of a frame the protocol has begun that go to it as read
        # to send, in order: what the protocol had to send when a frame was made here,
        # and that frame; what it has to send now comes after all of it
        self._writes: list[bytes] = []
        # what was read, for the connection: messages, the text ones that were not
        # UTF-8, and SKIPPED for each frame that completed none (charged as a frame)
        self._messages: deque[str | bytes | Unreadable] = deque()
        self._parts: list[bytes | bytearray | memoryview] = []  # of a fragmented message
        self._text = False  # the message being received is text
        self._writing = False  # a task is in _write
        self._pongs: dict[bytes, trio.Event] = {}
        self._pinged = 0
        self._receiving = False
        self._done = trio.Event()  # closed (both close frames, or the stream ended)
        self._finished = False
        self._out = Outgoing(stream)
        self._torn = False  # a write was cut off mid-frame: no close frame may follow

    @property
    def closed(self) -> bool:
        return self.proto.state is not OPEN

    async def receive(self) -> str | bytes:
        if self._messages:  # read with an earlier one: a turn for the others first
            await trio.lowlevel.checkpoint()
        while not self._messages:
            if self.proto.state is not OPEN:
                raise ChannelClosed
            self._receiving = True
            try:
                data = await self._incoming.receive(_RECEIVE_BYTES)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self._gone()
                raise ChannelClosed from None
            finally:
                self._receiving = False
            self._feed(data)
            await self._write()  # pongs, and the answer to a close
        message = self._messages.popleft()
        if isinstance(message, Unreadable):
            raise message
        return message

    def start(self) -> None:
        """Take what came right behind the handshake (a client need not wait for it)."""
        self._feed(b"", more=True)

    def _feed(self, data: bytes | bytearray, more: bool = False) -> None:
        """Take the messages in what was read (b"", unless ``more``: the end).

        A whole unfragmented text or binary frame, masked, within the size bound,
        on an open connection without compression, is unmasked here: on a small
        message the protocol's parser costs as much as the rest of a ping. Every
        other frame goes to the protocol as it comes (a bad header is refused at
        once), and so does everything once the connection is compressed or
        closing: the protocol sees exactly the bytes the peer sent, in order, and
        each frame as soon as it is whole, as if it were read a byte at a time."""
        proto = self.proto
        if proto.reader.eof:  # type: ignore[attr-defined]  # done reading: nothing is taken
            return
        if not (data or more) or proto.extensions or proto.state is not OPEN:
            if self._unread:  # (the end, or a close): what was held goes first
                unread, self._unread = bytes(self._unread), bytearray()
                self._protocol(unread, True)
            self._protocol(data, more)
            return
        if self._owed:  # the rest of a frame the protocol has begun
            part = data[:self._owed]
            self._owed -= len(part)
            self._protocol(part, True)
            data = data[len(part):]
            if self._owed or not data:
                return
        buf = self._unread
        buf += data
        pos, end = 0, len(buf)
        messages = self._messages
        while end - pos >= 2 and proto.state is OPEN:
            first, second = buf[pos], buf[pos + 1]
            if first & 0x0F not in _OPCODES or not second & 0x80:
                # refused from its first two bytes (a bad opcode, no mask): at once
                self._protocol(bytes(buf[pos:]), True)
                pos = end
                break
            length, head = second & 0x7F, 6  # (with the mask)
            if length >= 126:
                head += 2 if length == 126 else 8
                if end - pos < head - 4:
                    break  # the rest of its length is on its way
                length = int.from_bytes(buf[pos + 2:pos + head - 4], "big")
            stop = pos + head + length
            if (first != _TEXT and first != _BINARY) or proto.current_size is not None or \
                    length > proto.max_message_size:
                # the protocol's to take (or to refuse) as it comes
                self._owed = max(0, stop - end)
                self._protocol(bytes(buf[pos:min(stop, end)]), True)
                pos = min(stop, end)
                continue
            if stop > end:
                break  # the rest of the frame is on its way
            payload = apply_mask(buf[pos + head:stop], buf[pos + head - 4:pos + head])
            pos = stop
            if first == _BINARY:
                messages.append(payload)
                continue
            try:
                messages.append(payload.decode("utf-8"))
            except UnicodeDecodeError as exc:
                messages.append(_not_utf8(exc))
        if pos < end and proto.state is not OPEN:
            rest = bytes(buf[pos:])
            buf.clear()
            self._protocol(rest, True)
        else:
            del buf[:pos]

    def _protocol(self, data: bytes | bytearray, more: bool) -> None:
        """Hand bytes to the protocol (b"" and not ``more``: the end); queue the
        messages it completes and what it has to send."""
        proto = self.proto
        if proto.reader.eof:  # type: ignore[attr-defined]
            return
        if data or more:
            proto.receive_data(data)
        else:
            proto.receive_eof()
        for frame in proto.events_received():
            if not isinstance(frame, Frame):
                continue
            opcode = frame.opcode
            if opcode is Opcode.TEXT or opcode is Opcode.BINARY:
                self._text = opcode is Opcode.TEXT
                self._parts = [frame.data]
            elif opcode is Opcode.CONT:
                self._parts.append(frame.data)
            else:
                if opcode is Opcode.PONG:
                    answered = self._pongs.pop(bytes(frame.data), None)
                    if answered is not None:
                        answered.set()
                if opcode is not Opcode.CLOSE:
                    self._messages.append(SKIPPED)  # a ping the protocol answered, a pong
                continue
            if not frame.fin:
                self._messages.append(SKIPPED)
                continue
            message, self._parts = b"".join(self._parts), []
            if not self._text:
                self._messages.append(message)
                continue
            try:
                self._messages.append(message.decode("utf-8"))
            except UnicodeDecodeError as exc:
                self._messages.append(_not_utf8(exc))
        if proto.state is CLOSED or proto.close_rcvd is not None or \
                proto.reader.eof:  # type: ignore[attr-defined]
            self._gone()

    def _gone(self) -> None:
        """Nothing more will be read: wake whoever waits for a pong or the close."""
        self._done.set()
        for answered in self._pongs.values():
            answered.set()
        self._pongs.clear()

    def _take_writes(self) -> list[bytes]:
        """What there is to send, in order (b"" last: then the end of the stream)."""
        writes, self._writes = self._writes, []
        writes += self.proto.data_to_send()
        return writes

    async def _write(self) -> None:
        """Write what there is to send, in one write; then perhaps the end. One task
        writes at a time: one that finds another writing leaves what it framed to it
        (the writer takes what there is until nothing is left)."""
        if self._writing:
            return
        self._writing = True
        try:
            if self._out.rest:
                await self.stream.send_all(self._out.take_rest())
            while data := self._take_writes():
                payload = b"".join(data)
                if payload:
                    await self.stream.send_all(payload)
                if not data[-1]:  # the protocol is done with the stream
                    await _end(self.stream)
                    break
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self._gone()
            raise ChannelClosed from None
        except trio.Cancelled:  # whichever task wrote (the sender, the pinger, the reader)
            self._torn = True
            raise
        finally:
            self._writing = False

    async def send(self, frame: str | bytes) -> None:
        await self.send_many([frame])

    async def send_many(self, frames: list[str | bytes]) -> None:
        if self.proto.state is not OPEN:
            raise ChannelClosed
        self._frame(frames)
        await self._write()

    def _frame(self, frames: list[str | bytes]) -> None:
        """Frame messages to send, each whole in one frame: made here, unless
        compressed (a server's frames are not masked, so a frame is its length and
        its bytes)."""
        proto = self.proto
        if proto.extensions:
            for frame in frames:
                if isinstance(frame, str):
                    proto.send_text(frame.encode())
                else:
                    proto.send_binary(frame)
            return
        writes = self._writes
        writes += proto.data_to_send()  # (a pong it owes, say, goes first)
        for frame in frames:
            if isinstance(frame, str):
                data, first = frame.encode(), _TEXT
            else:
                data, first = frame, _BINARY
            length = len(data)
            if length < 126:
                writes.append(bytes((first, length)))
            elif length < 65536:
                writes.append(bytes((first, 126)) + length.to_bytes(2, "big"))
            else:
                writes.append(bytes((first, 127)) + length.to_bytes(8, "big"))
            if length:  # (b"" would say the end of the stream)
                writes.append(data)

    @property
    def writable_now(self) -> bool:
        return not self._writing and self._out.ready and self.proto.state is OPEN

    @property
    def pending(self) -> bool:
        return bool(self._messages) and self._messages[0] is not SKIPPED

    def send_now(self, frames: list[str | bytes]) -> None:
        self._frame(frames)
        self._out.write_now(b"".join(self._take_writes()))

    @property
    def backlog(self) -> bool:
        return bool(self._out.rest)

    async def ping(self) -> None:
        if self.proto.state is not OPEN:
            raise ChannelClosed
        self._pinged += 1
        data = self._pinged.to_bytes(4, "big")
        answered = self._pongs[data] = trio.Event()
        self.proto.send_ping(data)
        await self._write()
        await answered.wait()
        if self.proto.state is not OPEN:  # woken by the end, not by a pong
            raise ChannelClosed

    async def close(self, code: int, reason: str) -> None:
        """Say why in a close frame (1006, a vanished host, says nothing; nor may a
        stream a write was cut off in), then :meth:`finish`."""
        if not _sendable(code) or self._torn:
            self._finished = True
            await trio.aclose_forcefully(self.stream)
            return
        if self.proto.state is OPEN:
            self.proto.send_close(code, _truncate(reason))
            try:
                await self._write()
            except ChannelClosed:
                pass
        await self.finish()

    async def finish(self) -> None:
        """Wait (``CLOSE_TIMEOUT_S``) for the client to answer our close frame, or to
        hang up after a failure, reading and dropping what it still sends; then end
        the TCP connection. A close frame is read before the socket goes: closed
        at once, unread data would reset the connection and lose it."""
        if self._finished:
            return
        self._finished = True
        with trio.move_on_after(CLOSE_TIMEOUT_S):
            if self._receiving:  # the reader is reading: it sees the answer
                await self._done.wait()
            else:
                while not self._done.is_set():
                    try:
                        self._feed(await self._incoming.receive(_RECEIVE_BYTES))
                        await self._write()
                    except (trio.BrokenResourceError, trio.ClosedResourceError,
                            ChannelClosed):
                        break
        self._gone()
        await trio.aclose_forcefully(self.stream)


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
    """One WebSocket connection whose request head is ``head``, to its end. What
    the client sent right behind its request is the channel's to read, not the
    protocol's: so the protocol is left between two frames."""
    end = head.find(b"\r\n\r\n") + 4
    request, rest = (head[:end], head[end:]) if end >= 4 else (head, b"")
    with trio.move_on_at(handshake_deadline):
        proto = await handshake(transport, stream, request)
    if proto is None:
        return
    channel = WebsocketsChannel(stream, proto, rest)
    conn = transport.connection(channel, remote, slot)
    proto.conn = conn  # from now on the frame bound follows its session
    try:
        channel.start()
        await transport.run(conn)
    finally:
        with trio.CancelScope(shield=True):
            await channel.finish()


def _first(request: Request, name: str) -> str | None:
    values = request.headers.get_all(name)
    return values[0] if values else None


def _not_utf8(exc: UnicodeDecodeError) -> Unreadable:
    return Unreadable(ActionError(f"a text frame must be UTF-8: {exc.reason} at byte "
                                  f"{exc.start}", code="bad_frame"))
