"""The WebSocket transport: one trio task group per connection.

A connection reads frames, decodes them (JSON text or CBOR binary, hardened),
checks the envelope and hands requests to the dispatcher. It sends through a
bounded outbox: a client that falls that far behind is disconnected and its
session stays resumable. A failure in one connection closes only that
connection, with 1011.
"""

from __future__ import annotations

import ipaddress
import logging
import re
from collections import deque
from collections import Counter
from typing import TYPE_CHECKING, Any

import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, WebSocketRequest

from host import chunks
from host.actions import ActionError, BadRequest, RateLimited
from host.dispatcher import Disconnect, Request
from host.limits import TokenBucket
from host.sessions import Session, Signal
from state.codec import (
    DecodeError,
    decode_cbor,
    decode_json,
    encode_cbor,
    encode_json,
)

if TYPE_CHECKING:
    from host.server import Host

log = logging.getLogger("worldhost.transport")

POLICY = 1008
GOING_AWAY = 1001
INTERNAL = 1011
_ENVELOPE_KEYS = frozenset({"id", "action", "params"})
_PIECE_TAKEN = object()
_JSON_CHUNK = re.compile(r'\s*\{\s*"chunk"\s*:')
_CBOR_CHUNK = b"\xa1\x65chunk"  # a map of one entry whose key is "chunk"


def encode_frame(sig: Signal, encoding: str) -> str | bytes:
    """The frame for one signal. ``data`` is encoded once per encoding and spliced
    into each session's envelope, so a broadcast is not re-encoded per client."""
    cache = sig.encoded if sig.encoded is not None else {}
    if encoding == "cbor":
        data: bytes | None = cache.get("cbor")
        if data is None:
            data = cache["cbor"] = encode_cbor(sig.data)
        parts = [b"\x66signal", encode_cbor(sig.signal)]
        if sig.has_re:
            parts += [b"\x62re", encode_cbor(sig.re)]
        if sig.seq is not None:
            parts += [b"\x63seq", encode_cbor(sig.seq)]
        parts += [b"\x64data", data]
        return bytes([0xA0 + len(parts) // 2]) + b"".join(parts)
    text: str | None = cache.get("json")
    if text is None:  # kept as text: a broadcast's data is decoded once, not per client
        text = cache["json"] = encode_json(sig.data).decode("utf-8")
    head = '{"signal":' + encode_json(sig.signal).decode("utf-8")
    if sig.has_re:
        head += ',"re":' + encode_json(sig.re).decode("utf-8")
    if sig.seq is not None:
        head += ',"seq":%d' % sig.seq
    return head + ',"data":' + text + "}"


def _is_id(value: Any) -> bool:
    return isinstance(value, (str, int)) and not isinstance(value, bool)


def parse_envelope(message: Any) -> tuple[Any, bool]:
    """The request id (and whether one was given) if it can be told, for the reply."""
    if isinstance(message, dict) and "id" in message:
        rid = message["id"]
        return (rid if _is_id(rid) else None), True
    return None, False


def check_envelope(message: Any) -> tuple[str, dict[str, Any]]:
    if not isinstance(message, dict):
        raise ActionError(f"a frame must hold one object, not {type(message).__name__}",
                          code="bad_frame")
    extra = set(message) - _ENVELOPE_KEYS
    if extra:
        raise BadRequest(f"unknown envelope fields: {sorted(extra)}; "
                         f"a request has only id, action and params")
    if "id" in message and not _is_id(message["id"]):
        raise BadRequest("id must be a string or an integer")
    action = message.get("action")
    if not isinstance(action, str) or not action:
        raise BadRequest("action is required and must be a non-empty string")
    params = message.get("params", {})
    if not isinstance(params, dict):
        raise BadRequest(f"params must be an object, not {type(params).__name__}")
    return action, params


class Connection:
    """One client connection: its outbox, encoding, session and limits."""

    def __init__(self, host: Host, ws: WebSocketConnection, remote: str) -> None:
        self.host = host
        self.ws = ws
        self.remote = remote
        limits = host.config.host.limits
        self.session: Session | None = None
        self.encoding = "json"
        self.failed_opens = 0
        self.ever_had_session = False
        self.bucket = TokenBucket(limits.rate_per_s, limits.rate_burst, limits.flood_factor)
        # (signal, or None to close; when it was queued). Whoever finds it unattended
        # sends it: the reader right after the action it dispatched (no hand-off to
        # another task for a reply), else the sender task.
        self._outbox: deque[tuple[Signal | None, float]] = deque()
        self._outbox_size = limits.outbox_size
        self._sending = False  # a task is writing the outbox to the socket
        self._dispatching = False  # the reader will send what its action produced
        self._wake = trio.Event()
        self.cancel_scope = trio.CancelScope()
        self.reassembler = chunks.Reassembler(limits.max_transfer_bytes)
        # Requests read but not yet answered, plus signals not yet sent, stay under
        # half the outbox: a client that sends faster than it reads is slowed down
        # (TCP backpressure), not disconnected. Only broadcasts can overflow it.
        self.in_flight = 0
        self.budget = max(1, limits.outbox_size // 2)
        self._room = trio.Event()
        self.transfers = 0
        self.torn = False  # a frame was cut off mid-send: no close frame may follow it
        self.close_code: int | None = None
        self.close_reason = ""

    # called by the dispatcher, synchronously -----------------------------------
    def deliver(self, sig: Signal) -> bool:
        if self.close_code is not None:
            self.host.transport.signals_dropped += 1
            return False
        if sig.has_re and self.in_flight:
            self.in_flight -= 1
        now = trio.current_time()
        limits = self.host.config.host.limits
        if self._outbox and now - self._outbox[0][1] > limits.max_lag_s:
            log.warning("disconnecting %s: %.1f s behind", self.remote, now - self._outbox[0][1])
            self.abort(POLICY, f"too slow: more than {limits.max_lag_s:g} s behind")
            self.host.transport.signals_dropped += 1
            return False
        if len(self._outbox) >= self._outbox_size:
            log.warning("disconnecting %s: outbox full (%d signals behind)",
                        self.remote, self._outbox_size)
            self.abort(POLICY, "too slow: outbox full")
            self.host.transport.signals_dropped += 1
            return False
        self._queue(sig, now)
        return True

    def _queue(self, sig: Signal | None, now: float) -> None:
        self._outbox.append((sig, now))
        if not (self._sending or self._dispatching):
            self._wake.set()

    def displace(self) -> None:
        """The session was resumed on another connection."""
        self.session = None
        self.close_soon(1000, "session resumed on another connection")

    def close_soon(self, code: int, reason: str) -> None:
        """Close after what is already queued has been sent."""
        if self.close_code is None:
            self.close_code, self.close_reason = code, reason
            if len(self._outbox) >= self._outbox_size:
                self.cancel_scope.cancel()
            else:
                self._queue(None, trio.current_time())

    def abort(self, code: int, reason: str) -> None:
        self.close_code, self.close_reason = code, reason
        self.cancel_scope.cancel()

    # the connection's tasks --------------------------------------------------------
    async def run(self) -> None:
        self.deliver(Signal("server.info", self.host.server_info()))
        try:
            with self.cancel_scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._sender)
                    nursery.start_soon(self._pinger)
                    nursery.start_soon(self._auth_timer)
                    await self._reader()
                    nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                try:
                    await self.host.dispatcher.put(Disconnect(self))
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass  # the host is gone (crashed or stopped)
                if self.close_code is not None and not self.ws.closed and not self.torn:
                    with trio.move_on_after(1):
                        await self.ws.aclose(self.close_code, self.close_reason)

    async def _reader(self) -> None:
        max_failed = self.host.config.sessions.max_failed_opens
        while True:
            while self.in_flight + len(self._outbox) >= self.budget:
                self._room = trio.Event()
                await self._room.wait()
            try:
                message = await self.ws.get_message()
            except ConnectionClosed:
                return
            if self.failed_opens >= max_failed:
                return  # closing: the dispatcher closes it after the last refusal is sent
            try:
                joined = self._chunk(message)
            except ActionError as exc:
                self.in_flight += 1
                await self._dispatch(Request("", None, None, True, self, self.encoding,
                                             error=exc))
                continue
            if joined is _PIECE_TAKEN:
                continue
            req = self._request(joined)
            self.in_flight += 1
            bucket = self.bucket
            allowed = bucket.take(trio.current_time())  # every frame counts, even bad ones
            if bucket.flooding:
                log.warning("disconnecting %s: flooding past its rate limit", self.remote)
                self.abort(POLICY, "flooding past the rate limit")
                return
            if not allowed and req.error is None:
                req.error = RateLimited(
                    f"more than {bucket.rate:g} actions/s (burst {bucket.burst}); slow down")
            await self._dispatch(req)

    async def _dispatch(self, req: Request) -> None:
        """Hand a request to the dispatcher, then send what it produced at once. (If it
        must wait its turn, signals meanwhile are sent by the sender task.)"""
        self._dispatching = self.host.dispatcher.applies_now
        try:
            await self.host.dispatcher.put(req)
        finally:
            self._dispatching = False
        if self._outbox:
            await self._flush()

    def _chunk(self, message: str | bytes) -> Any:
        """A piece of a chunked request is taken aside; a whole frame passes through."""
        if isinstance(message, str):
            if not _JSON_CHUNK.match(message[:64]):
                return message
        elif not message.startswith(_CBOR_CHUNK):
            return message
        try:
            decoded = decode_json(message) if isinstance(message, str) else \
                decode_cbor(message, plain=False)
        except DecodeError:
            return message  # the normal path names the problem
        if not (isinstance(decoded, dict) and set(decoded) == {"chunk"}):
            return message
        self.encoding = "json" if isinstance(message, str) else "cbor"
        joined = self.reassembler.add(decoded["chunk"], isinstance(message, str))
        return _PIECE_TAKEN if joined is None else joined

    def _request(self, message: str | bytes) -> Request:
        try:
            if isinstance(message, str):
                self.encoding = "json"
                decoded = decode_json(message)
            else:
                self.encoding = "cbor"
                decoded = decode_cbor(message)
        except DecodeError as exc:
            return Request("", None, None, True, self, self.encoding,
                           error=ActionError(str(exc), code="bad_frame"))
        rid, has_id = parse_envelope(decoded)
        try:
            action, params = check_envelope(decoded)
        except ActionError as exc:
            named = decoded.get("action") if isinstance(decoded, dict) else None
            return Request(named if isinstance(named, str) else "", None, rid, True, self,
                           self.encoding, error=exc)
        return Request(action, params, rid, has_id, self, self.encoding)

    async def _sender(self) -> None:
        """Sends what arrives while the reader is not dispatching: broadcasts, replies
        released by a journal commit."""
        while True:
            await self._wake.wait()
            self._wake = trio.Event()
            await self._flush()

    async def _flush(self) -> None:
        """Send the outbox until it is empty; one task at a time does this."""
        if self._sending:
            return
        self._sending = True
        try:
            while self._outbox:
                sig, _ = self._outbox.popleft()
                self._room.set()
                if sig is None:
                    await self.ws.aclose(self.close_code or 1000, self.close_reason)
                    self.cancel_scope.cancel()
                    return
                frame = encode_frame(sig, sig.encoding or self.encoding)
                if len(frame) <= self.host.config.host.limits.max_frame_bytes:
                    await self.ws.send_message(frame)
                    continue
                self.transfers += 1
                for piece in chunks.split(frame, f"h{self.transfers}"):
                    await self.ws.send_message(piece)
        except ConnectionClosed:
            self.cancel_scope.cancel()
        except trio.Cancelled:
            self.torn = True  # (perhaps) part of a frame went out; the stream is unusable
            raise
        finally:
            self._sending = False

    async def _pinger(self) -> None:
        cfg = self.host.config.host
        while True:
            await trio.sleep(cfg.ping_interval_s)
            with trio.move_on_after(cfg.ping_timeout_s) as scope:
                try:
                    await self.ws.ping()
                except ConnectionClosed:
                    return
            if scope.cancelled_caught:
                log.info("dropping %s: no pong within %gs", self.remote, cfg.ping_timeout_s)
                self.abort(GOING_AWAY, "ping timeout")
                return

    async def _auth_timer(self) -> None:
        await trio.sleep(self.host.config.sessions.auth_timeout_s)
        if self.session is None and not self.ever_had_session:
            self.close_soon(POLICY, "no session opened in time")


class Transport:
    """Accepts handshakes, applies the origin and per-address limits, runs connections."""

    def __init__(self, host: Host) -> None:
        self.host = host
        self.connections: set[Connection] = set()
        self.per_address: Counter[str] = Counter()
        self.signals_dropped = 0  # not delivered: the connection was closing or too slow

    async def handle(self, request: WebSocketRequest) -> None:
        cfg = self.host.config.host
        origin = _header(request, b"origin")
        if origin is not None and origin not in cfg.allowed_origins and \
                "*" not in cfg.allowed_origins and \
                not same_origin(origin, _host(request)):
            log.info("refused handshake from origin %r", origin)
            await request.reject(403, body=b"origin not allowed")
            return
        remote = _address(request)
        if self.per_address[remote] >= cfg.limits.max_connections_per_address:
            await request.reject(429, body=b"too many connections from this address")
            return
        if not self.host.dispatcher.accepting:
            await request.reject(503, body=b"shutting down")
            return
        self.per_address[remote] += 1
        try:
            ws = await request.accept()
            conn = Connection(self.host, ws, remote)
            self.connections.add(conn)
            try:
                await conn.run()
            except Exception:
                log.exception("connection %s failed; closing it with 1011", remote)
                if not conn.torn:
                    with trio.CancelScope(shield=True), trio.move_on_after(1):
                        await ws.aclose(INTERNAL, "internal error")
            finally:
                self.connections.discard(conn)
        except ConnectionClosed:
            pass
        finally:
            self.per_address[remote] -= 1
            if self.per_address[remote] <= 0:
                del self.per_address[remote]

    def close_all(self, code: int = GOING_AWAY, reason: str = "server shutting down") -> None:
        for conn in list(self.connections):
            conn.close_soon(code, reason)


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


def _host(request: WebSocketRequest) -> str | None:
    """The Host header (wsproto keeps it apart from the other headers)."""
    host = getattr(getattr(request, "_event", None), "host", None)
    return host if isinstance(host, str) else None


def _header(request: WebSocketRequest, name: bytes) -> str | None:
    for key, value in request.headers:
        if key.lower() == name:
            return value.decode("latin-1")
    return None


def _address(request: WebSocketRequest) -> str:
    remote = request.remote
    return getattr(remote, "address", None) or str(remote)
