"""The WebSocket channel: trio-websocket frames under a transport connection.

Only this module (and the transport that picks it) knows trio-websocket: the
connection above it sees messages in, frames out, and the two ways a channel
ends (``ChannelClosed``, ``Refused``).
"""

from __future__ import annotations

import ipaddress
import logging

import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, WebSocketRequest
from wsproto.connection import ConnectionState
from wsproto.events import CloseConnection

from host import chunks
from host.channel import ChannelClosed, Refused, TaskWrites

log = logging.getLogger("worldhost.transport")

TOO_BIG = 1009
_FAILED = (1002, 1007)  # wsproto could not parse a frame: a protocol violation, bad UTF-8


class WebSocketChannel(TaskWrites):
    """One accepted WebSocket. Text frames are JSON, binary frames CBOR."""

    pings = True

    def __init__(self, ws: WebSocketConnection, max_frame_bytes: int) -> None:
        self.ws = ws
        self.max_frame_bytes = max_frame_bytes
        _close_frame_on_parse_failure(ws)

    @classmethod
    async def accept(cls, request: WebSocketRequest,
                     max_frame_bytes: int) -> WebSocketChannel | None:
        """Complete the handshake; None if the client went away meanwhile."""
        try:
            return cls(await request.accept(), max_frame_bytes)
        except ConnectionClosed:
            return None

    @property
    def closed(self) -> bool:
        return self.ws.closed is not None

    async def receive(self) -> str | bytes:
        try:
            message = await self.ws.get_message()
        except ConnectionClosed:
            raise ChannelClosed from None
        if isinstance(message, str) and chunks.size_of(message) > self.max_frame_bytes:
            # trio-websocket counted characters; the limit is in bytes
            raise Refused(TOO_BIG, f"frame over {self.max_frame_bytes} bytes")
        return message

    async def send(self, frame: str | bytes) -> None:
        try:
            await self.ws.send_message(frame)
        except ConnectionClosed:
            raise ChannelClosed from None

    async def send_many(self, frames: list[str | bytes]) -> None:
        # trio-websocket writes each message on its own (its wsproto and stream are
        # private): one write a frame
        for frame in frames:
            await self.send(frame)

    async def ping(self) -> None:
        try:
            await self.ws.ping()
        except ConnectionClosed:
            raise ChannelClosed from None

    async def close(self, code: int, reason: str) -> None:
        try:
            await self.ws.aclose(code, reason)
        except ConnectionClosed:
            pass


def _close_frame_on_parse_failure(ws: WebSocketConnection) -> None:
    """Send a close frame when wsproto cannot parse the client's frames.

    wsproto reports an unparseable frame (invalid UTF-8 in a text frame: 1007, any
    other protocol violation: 1002) as a close event with that code; trio-websocket
    takes it for the peer's close and, being the server, drops the TCP connection
    without a close frame. This sends one first, so the client learns the code.
    """
    drop_tcp = ws._close_stream  # noqa: SLF001 -- trio-websocket has no hook for this

    async def close_stream() -> None:
        reason = ws.closed
        if reason is not None and reason.code in _FAILED and \
                ws._wsproto.state is ConnectionState.OPEN:  # noqa: SLF001
            with trio.move_on_after(1):
                try:
                    await ws._send(CloseConnection(reason.code, reason.reason or ""))  # noqa: SLF001
                except ConnectionClosed:
                    pass
        await drop_tcp()

    ws._close_stream = close_stream  # type: ignore[method-assign]  # noqa: SLF001


def same_origin(origin: str, host: str | None) -> bool:
    """A page the host served itself: the Origin names the Host the browser connected
    to. Only for an IP address or localhost: a DNS name could be rebound to this
    machine by a foreign page, which would then be "same-origin" with it."""
    if host is None:
        return False
    scheme, _, netloc = origin.partition("://")
    if scheme not in ("http", "https") or netloc.lower() != host.lower():
        return False
    name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
    name = name.strip("[]").lower()
    if name == "localhost":
        return True
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def origin_allowed(request: WebSocketRequest, allowed: list[str]) -> bool:
    """No Origin (not a browser), a listed one, ``*``, or the host's own page."""
    return origin_ok(_header(request, b"origin"), _host(request), allowed)


def origin_ok(origin: str | None, host: str | None, allowed: list[str]) -> bool:
    """The origin rule, whichever library parsed the handshake."""
    if origin is None or origin in allowed or "*" in allowed or same_origin(origin, host):
        return True
    log.info("refused handshake from origin %r", origin)
    return False


def _host(request: WebSocketRequest) -> str | None:
    """The Host header (wsproto keeps it apart from the other headers)."""
    host = getattr(getattr(request, "_event", None), "host", None)
    return host if isinstance(host, str) else None


def _header(request: WebSocketRequest, name: bytes) -> str | None:
    for key, value in request.headers:
        if key.lower() == name:
            return value.decode("latin-1")
    return None


def address(request: WebSocketRequest) -> str:
    remote = request.remote
    return getattr(remote, "address", None) or str(remote)
