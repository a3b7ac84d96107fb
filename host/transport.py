"""The transport: connections of every protocol, and the caps on them.

A connection reads messages from its channel (host/websocket.py: WebSocket
frames; host/lines.py: lines of JSON over TCP), decodes them (JSON text or CBOR
binary, hardened), checks the envelope and hands requests to the submitter. It
sends through a bounded outbox: a client that falls that far behind is
disconnected and its session stays resumable. A failure in one connection closes
only that connection, with 1011. Nothing here knows the server: a connection is
built with the config, the submitter, the ``server.info`` payload and whether
worker threads may be used.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import resource
from collections import deque
from collections.abc import Callable
from typing import Any

import trio
from trio_websocket import WebSocketRequest

from host import chunks
from host.actions import ActionError, BadRequest, RateLimited, Unauthenticated
from host.channel import SKIPPED, Channel, ChannelClosed, Refused, Unreadable
from host.config import Config
from host.framing import (
    BIG_DECODES,
    CBOR_CHUNK,
    JSON_CHUNK,
    THREAD_BYTES,
    decode_frame,
    decode_now,
    encode_frame,
    in_thread,
    is_id,
    item_budget,
    request_of,
    undecodable,
)
from host.limits import TokenBucket
from host.messages import Disconnect, Request, Signal, Submitter
from host.sessions import Session
from host.websocket import WebSocketChannel, address, origin_allowed, same_origin
from state.codec import DecodeError

__all__ = ["Connection", "Slot", "Transport", "encode_frame", "same_origin", "stream_address"]

log = logging.getLogger("worldhost.transport")

POLICY = 1008
GOING_AWAY = 1001
INTERNAL = 1011
TOO_BIG = 1009
_PIECE_TAKEN = object()
# what one write of the outbox may carry: several signals in one system call, but
# never a copy of a whole backlog at once
_BATCH_BYTES = 64 * 1024


def _load_malloc_trim() -> Any:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


_malloc_trim = _load_malloc_trim()


def _trim() -> None:
    """Give the heap a big decode freed back to the system (glibc keeps it otherwise)."""
    if _malloc_trim is not None:
        _malloc_trim(0)


class Connection:
    """One client connection: its outbox, encoding, session and limits."""

    def __init__(self, channel: Channel, remote: str, *, config: Config, submit: Submitter,
                 hello: Callable[[], dict[str, Any]], threads: bool,
                 transport: Transport, max_frame: int | None = None) -> None:
        self.channel = channel
        self.remote = remote
        self.config = config
        self.submit = submit
        self.hello = hello
        self.threads = threads
        self.transport = transport
        limits = config.host.limits
        self.session: Session | None = None
        self.encoding = "json"
        self.failed_opens = 0
        self.ever_had_session = False
        self.slot: Slot | None = None  # its place among the transport's connections
        self.bucket = TokenBucket(limits.rate_per_s, limits.rate_burst, limits.flood_factor)
        # (signal, or None to close; when it was queued). Whoever finds it unattended
        # sends it: the reader right after the action it dispatched (no hand-off to
        # another task for a reply), else the sender task.
        self._outbox: deque[tuple[Signal | None, float]] = deque()
        self._outbox_size = limits.outbox_size
        self._sending = False  # a task is writing the outbox to the socket
        self._unsent: float | None = None  # when the oldest signal being written was queued
        self._dispatching = False  # the reader will send what its action produced
        self._wake = trio.Event()
        self.cancel_scope = trio.CancelScope()
        self.reassembler = chunks.Reassembler(limits.max_transfer_bytes,
                                              max_open_bytes=limits.max_open_transfer_bytes,
                                              timeout_s=limits.transfer_timeout_s,
                                              max_id_bytes=limits.max_id_bytes,
                                              held=transport.transfers_held)
        # Requests read but not yet answered, plus signals not yet sent, stay under
        # half the outbox: a client that sends faster than it reads is slowed down
        # (TCP backpressure), not disconnected. Only broadcasts can overflow it.
        self.in_flight = 0
        self.budget = max(1, limits.outbox_size // 2)
        self._room = trio.Event()
        self.transfers = 0
        self.torn = False  # a frame was cut off mid-send: no close frame may follow it
        # a signal longer than this goes in pieces; a piece's JSON escaping (a quote or
        # a backslash doubles, a character is up to 4 bytes) stays under it
        self.max_frame = max_frame or limits.max_frame_bytes
        self.piece = chunks.PIECE if max_frame is None else \
            max(256, min(chunks.PIECE, (max_frame - 256) // 8))
        self.close_code: int | None = None
        self.close_reason = ""
        # a session's replay (host/gate.py), pulled whenever the outbox runs empty: it
        # hands over what fits in the budget, so a replay is never taken for a slow reader
        self.feed: Callable[[int], bool] | None = None

    # called by the dispatcher, synchronously -----------------------------------
    def deliver(self, sig: Signal) -> bool:
        if self.close_code is not None:
            self.transport.signals_dropped += 1
            return False
        if sig.has_re and self.in_flight:
            self.in_flight -= 1
        outbox = self._outbox
        if outbox or self._unsent is not None:  # (else nothing waits: neither can be true)
            if self.stalled():
                return False
            if len(outbox) >= self._outbox_size:
                log.warning("disconnecting %s: outbox full (%d signals behind)",
                            self.remote, self._outbox_size)
                self.abort(POLICY, "too slow: outbox full")
                self.transport.signals_dropped += 1
                return False
        elif not (self._sending or self._dispatching) and self._sent_now(sig):
            return True  # nothing waits: out now, with no task woken
        self._queue(sig, trio.current_time())
        return True

    def _sent_now(self, sig: Signal) -> bool:
        """Write one signal here and now if nothing else is being written, nothing
        waits and it is small (a big one goes a batch at a time, by the sender: never
        framed all at once); whether it was."""
        if self.torn or self.feed is not None or not self.channel.writable_now:
            return False
        frame = self.frame(sig)
        if len(frame) > _BATCH_BYTES or len(frame) > self.max_frame:
            return False
        self._send_now([frame])
        return True

    def _send_now(self, frames: list[str | bytes]) -> None:
        """Hand frames to the channel's write here and now; what the socket did not
        take is written by the sender task, and counts as waiting meanwhile."""
        channel = self.channel
        channel.send_now(frames)
        self._room.set()
        if channel.backlog and self._unsent is None:
            self._unsent = trio.current_time()
            self._wake.set()

    def stalled(self) -> bool:
        """Whether the oldest queued signal waited past max_lag_s, closing as too slow
        if so (also for signals that wait behind the outbox: a replay's)."""
        limits = self.config.host.limits
        oldest = self._unsent if self._unsent is not None else \
            self._outbox[0][1] if self._outbox else None
        lag = 0.0 if oldest is None else trio.current_time() - oldest
        if lag <= limits.max_lag_s:
            return False
        log.warning("disconnecting %s: %.1f s behind", self.remote, lag)
        self.abort(POLICY, f"too slow: more than {limits.max_lag_s:g} s behind")
        self.transport.signals_dropped += 1
        return True

    def _queue(self, sig: Signal | None, now: float) -> None:
        self._outbox.append((sig, now))
        if not (self._sending or self._dispatching):
            self._wake.set()

    def attached(self, session: Session) -> None:
        """A session now speaks through this connection: it no longer counts against
        the caps on connections without one."""
        self.session = session
        self.ever_had_session = True
        self.transport.authenticated(self)

    def detached(self) -> None:
        """The session was closed and the connection stays: it counts as one without
        a session again."""
        self.transport.unauthenticated(self)

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
    def greet(self) -> None:
        """The first signal on a new connection: what the host is and allows."""
        self.deliver(Signal("server.info", self.hello()))

    def frame(self, sig: Signal) -> str | bytes:
        """A signal as this connection's channel sends it."""
        return encode_frame(sig, sig.encoding or self.encoding)

    async def run(self) -> None:
        self.greet()
        try:
            with self.cancel_scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._sender)
                    if self.channel.pings:
                        nursery.start_soon(self._pinger)
                    nursery.start_soon(self._auth_timer)
                    await self._reader()
                    nursery.cancel_scope.cancel()
        finally:
            self._sending = True  # the tasks are gone: nothing is written from now on
            with trio.CancelScope(shield=True):
                try:
                    await self.submit.put(Disconnect(self))
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass  # the host is gone (crashed or stopped)
                if self.close_code is not None and not self.channel.closed and not self.torn:
                    with trio.move_on_after(1):
                        await self.channel.close(self.close_code, self.close_reason)
                if self.reassembler.clear() > THREAD_BYTES:  # big pieces held to the end
                    await self._trim()

    async def _reader(self) -> None:
        max_failed = self.config.sessions.max_failed_opens
        limits = self.config.host.limits
        while True:
            while self.in_flight + len(self._outbox) >= self.budget:
                self._room = trio.Event()
                await self._room.wait()
            message: str | bytes | None = None
            try:
                if self.reassembler.transfers:
                    with trio.move_on_at(self.reassembler.next_deadline()):
                        message = await self.channel.receive()
                else:  # nothing can run out of time: no cancel scope (the hot path)
                    message = await self.channel.receive()
            except ChannelClosed:
                return
            except Refused as exc:
                if exc.answer is None:
                    self.abort(exc.code, exc.reason)
                    return
                await self._refuse(exc.answer)
                with trio.move_on_after(self.config.host.ping_timeout_s):
                    while self.in_flight:  # the answer may wait its turn: close after it
                        self._room = trio.Event()
                        await self._room.wait()
                self.close_soon(exc.code, exc.reason)
                await trio.sleep_forever()  # the sender closes it once the answer is out
            except Unreadable as exc:
                self.bucket.take(trio.current_time())  # counted as any message is
                if self.bucket.flooding:
                    self.abort(POLICY, "flooding past the rate limit")
                    return
                await self._refuse(exc.error)
                continue
            if message is None:  # a transfer ran out of time
                for transfer in self.reassembler.expire(trio.current_time()):
                    await self._refuse(BadRequest(
                        f"transfer {transfer!r} not finished within "
                        f"{limits.transfer_timeout_s:g} s (host.limits.transfer_timeout_s); "
                        f"dropped"))
                continue
            if self.failed_opens >= max_failed:
                return  # closing: the dispatcher closes it after the last refusal is sent
            if self.session is None and len(message) > limits.max_frame_bytes_before_session:
                # nothing said before a session is big: close before any decode, so
                # sockets without a session cannot queue big frames behind one another
                self.abort(TOO_BIG, f"frame over {limits.max_frame_bytes_before_session} "
                                    f"bytes before a session")
                return
            bucket = self.bucket
            skipped = message is SKIPPED
            # every frame counts: bad ones, pieces, and (toward the flood only) empty ones
            allowed = bucket.take(trio.current_time(), not skipped)
            if bucket.flooding:
                log.warning("disconnecting %s: flooding past its rate limit", self.remote)
                self.abort(POLICY, "flooding past the rate limit")
                return
            if skipped:
                continue
            joined: Any = message
            if ('"chunk"' in message[:64] and JSON_CHUNK.match(message, 0, 64)) \
                    if isinstance(message, str) else message.startswith(CBOR_CHUNK):
                try:
                    joined = await self._chunk(message, allowed)
                except ActionError as exc:
                    await self._refuse(exc)
                    continue
                if joined is _PIECE_TAKEN:
                    continue
            big = len(joined) > THREAD_BYTES
            req = await self._request(joined)
            if not allowed and req.error is None:
                req.error = RateLimited(
                    f"more than {bucket.rate:g} actions/s (burst {bucket.burst}); slow down")
            req.more = self.channel.pending
            self.in_flight += 1
            await self._dispatch(req)
            if big:
                del req, joined, message  # what is left of the frame, for the trim to free
                await self._trim()

    async def _refuse(self, exc: ActionError) -> None:
        """Answer with an error a frame that was no request (a piece of a transfer)."""
        self.in_flight += 1
        await self._dispatch(Request("", None, None, True, self, self.encoding, error=exc))

    async def _dispatch(self, req: Request) -> None:
        """Hand a request to the dispatcher, then send what it produced at once. (If it
        must wait its turn, signals meanwhile are sent by the sender task.)"""
        writer = self.submit.ready(req)
        if writer is None:
            await self.submit.put(req)  # it waits its turn: the sender task sends meanwhile
        else:
            self._dispatching = True
            try:
                await writer.put(req)
            finally:
                self._dispatching = False
        outbox = self._outbox
        if len(outbox) == 1 and not self._sending and outbox[0][0] is not None and \
                self._unsent is None and self._sent_now(outbox[0][0]):
            outbox.popleft()  # its reply, released while it waited: out now
        elif outbox:
            await self._flush()

    async def _trim(self) -> None:
        """Give freed heap back to the system, off the loop where threads are allowed."""
        if self.threads:
            await trio.to_thread.run_sync(_trim, limiter=BIG_DECODES)
        else:
            _trim()

    def _budget(self) -> tuple[int, str]:
        session = self.session
        return item_budget(self.config.host.limits, session.role if session else None)

    async def _decode(self, message: str | bytes, plain: bool = True) -> Any:
        """Decode one frame within the item budget of this connection's role."""
        return await decode_frame(message, self._budget(), threads=self.threads, plain=plain)

    async def _chunk(self, message: str | bytes, allowed: bool) -> Any:
        """A piece of a chunked request (a frame that starts as one) is taken aside;
        a whole frame passes through. A piece over the rate limit drops its transfer."""
        try:
            decoded = await self._decode(message, plain=False)
        except DecodeError as exc:  # refused here, not decoded a second time as a request
            raise ActionError(str(exc), code="bad_frame") from None
        if not (isinstance(decoded, dict) and set(decoded) == {"chunk"}):
            return message
        self.encoding = "json" if isinstance(message, str) else "cbor"
        chunk = decoded["chunk"]
        if self.session is None:  # nothing said before a session needs pieces to say it
            raise Unauthenticated("chunked transfers need an open session: send "
                                  "session.open or session.resume first")
        if not allowed:
            transfer = chunk.get("transfer") if isinstance(chunk, dict) else None
            if is_id(transfer):
                self.reassembler.drop(transfer)
            bucket = self.bucket
            raise RateLimited(f"more than {bucket.rate:g} frames/s (burst {bucket.burst}); "
                              f"transfer {transfer!r} dropped")
        joined = self.reassembler.add(chunk, isinstance(message, str), trio.current_time())
        return _PIECE_TAKEN if joined is None else joined

    async def _request(self, message: str | bytes) -> Request:
        self.encoding = "json" if isinstance(message, str) else "cbor"
        try:
            if in_thread(message, self.threads):
                decoded = await self._decode(message)
            else:  # no await: the hot path
                decoded = decode_now(message, self._budget())
        except DecodeError as exc:
            return undecodable(message if isinstance(message, str) else None, exc, self,
                               self.encoding, self.config.host.limits.max_id_bytes)
        return request_of(decoded, self, self.encoding)

    async def _sender(self) -> None:
        """Sends what arrives while the reader is not dispatching: broadcasts, replies
        released by a journal commit."""
        while True:
            await self._wake.wait()
            self._wake = trio.Event()
            await self._flush()

    async def _flush(self) -> None:
        """Send the outbox until it is empty; one task at a time does this. What is
        queued goes out together (``send_many``), up to ``_BATCH_BYTES`` a write."""
        if self._sending:
            return
        self._sending = True
        outbox, channel = self._outbox, self.channel
        try:
            if channel.backlog:  # what a write here and now left
                await channel.send_many([])
                self._unsent = None
            while outbox or (self.feed is not None and self.feed(self.budget)):
                batch: list[str | bytes] = []
                size = 0
                while outbox and size < _BATCH_BYTES:
                    sig, queued = outbox[0]
                    if sig is None:
                        break
                    outbox.popleft()
                    if self._unsent is None:
                        self._unsent = queued
                    frame = self.frame(sig)
                    if len(frame) <= self.max_frame:
                        batch.append(frame)
                    else:
                        self.transfers += 1
                        batch += chunks.split(frame, f"h{self.transfers}", piece=self.piece)
                    size += len(frame)
                self._room.set()
                if batch:
                    for group in _groups(batch):
                        if channel.writable_now:  # no wait, no yield
                            channel.send_now(group)
                        else:
                            await channel.send_many(group)
                    if channel.backlog:
                        await channel.send_many([])
                    self._unsent = None
                    continue
                outbox.popleft()  # None: close once everything before it is out
                await self.channel.close(self.close_code or 1000, self.close_reason)
                self.cancel_scope.cancel()
                return
        except ChannelClosed:
            self.cancel_scope.cancel()
        except trio.Cancelled:
            self.torn = True  # (perhaps) part of a frame went out; the stream is unusable
            raise
        finally:
            self._sending = False

    async def _pinger(self) -> None:
        cfg = self.config.host
        while True:
            await trio.sleep(cfg.ping_interval_s)
            with trio.move_on_after(cfg.ping_timeout_s) as scope:
                try:
                    await self.channel.ping()
                except ChannelClosed:
                    return
            if scope.cancelled_caught:
                log.info("dropping %s: no pong within %gs", self.remote, cfg.ping_timeout_s)
                self.abort(GOING_AWAY, "ping timeout")
                return

    async def _auth_timer(self) -> None:
        await trio.sleep(self.config.sessions.auth_timeout_s)
        if self.session is None and not self.ever_had_session:
            self.close_soon(POLICY, "no session opened in time")


def _groups(frames: list[str | bytes]) -> list[list[str | bytes]]:
    """Frames in consecutive groups of at most ``_BATCH_BYTES`` (or one frame)."""
    if len(frames) == 1:
        return [frames]
    groups: list[list[str | bytes]] = [[]]
    size = 0
    for frame in frames:
        if size and size + len(frame) > _BATCH_BYTES:
            groups.append([])
            size = 0
        groups[-1].append(frame)
        size += len(frame)
    return groups


class Slot:
    """One accepted socket, from before its handshake until it is closed."""

    __slots__ = ("address", "scope", "conn", "authenticated", "closing")

    def __init__(self, address: str) -> None:
        self.address = address
        self.scope = trio.CancelScope()
        self.conn: Connection | None = None
        self.authenticated = False  # its connection has a session
        self.closing = False  # evicted: no longer counted

    def evict(self, reason: str) -> None:
        self.closing = True
        if self.conn is not None:
            self.conn.abort(POLICY, reason)
        else:
            self.scope.cancel()


def fd_limit() -> int:
    """The soft open-file limit, raised to the hard limit first: every socket is a
    file, and a host that runs out of them cannot even accept the socket it would
    close to make room."""
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard == resource.RLIM_INFINITY or soft < hard:
            target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
            try:
                resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
                soft = target
            except (ValueError, OSError):
                pass
        return int(soft)
    except (OSError, ValueError):
        return 1024


def connection_budget(fd_soft_limit: int) -> int:
    """Connections allowed when ``max_connections`` is 0: the open-file limit less
    an eighth (at least 64) for the store, logs and the sockets being closed."""
    return max(16, fd_soft_limit - max(64, fd_soft_limit // 8))


class Transport:
    """Runs connections of every protocol and applies the connection caps.

    Every accepted socket holds a slot, whatever its protocol. At
    ``max_connections`` the oldest socket without a session is closed to make room
    (a new one is closed at once when every slot has a session). Sockets without a
    session count against ``max_connections_per_address``; past it the oldest of
    that address is closed, so a pile of idle sockets never locks out a client
    that opens a session.
    """

    def __init__(self, config: Config, *, submit: Submitter,
                 hello: Callable[[], dict[str, Any]], threads: bool) -> None:
        self.config = config
        self.submit = submit
        self.hello = hello
        self.threads = threads
        self.connections: set[Connection] = set()
        self.slots: dict[Slot, None] = {}  # oldest first
        self.open = 0  # slots not closing
        self.pre_auth: dict[Slot, None] = {}  # slots without a session, oldest first
        self.pre_auth_by_address: dict[str, dict[Slot, None]] = {}
        self._quiet_until = 0.0
        files = fd_limit()
        self.max_connections = config.host.limits.max_connections or \
            connection_budget(files)
        self.signals_dropped = 0  # not delivered: the connection was closing or too slow
        self.transfers_held = chunks.Held(config.host.limits.max_all_transfer_bytes)

    def admit(self, address: str) -> Slot | None:
        """A slot for a new socket, closing older unauthenticated ones to make room;
        None when every slot is held by a connection with a session."""
        limits = self.config.host.limits
        if self.open >= self.max_connections:
            oldest = next(iter(self.pre_auth), None)
            if oldest is None:
                now = trio.current_time()
                if now >= self._quiet_until:  # one line per 10 s, not one per socket
                    self._quiet_until = now + 10
                    log.warning("refusing connections (from %s, ...): all %d have sessions "
                                "(max_connections)", address, self.open)
                return None
            self._evict(oldest, "too many connections: the oldest without a session "
                                "are closed first")
        same = self.pre_auth_by_address.get(address)
        if same is not None and len(same) >= limits.max_connections_per_address:
            self._evict(next(iter(same)), "too many connections from this address without "
                                          "a session")
        slot = Slot(address)
        self.slots[slot] = None
        self.open += 1
        self.pre_auth[slot] = None
        self.pre_auth_by_address.setdefault(address, {})[slot] = None
        return slot

    def _evict(self, slot: Slot, reason: str) -> None:
        self._forget_pre_auth(slot)
        self.open -= 1
        slot.evict(reason)

    def _forget_pre_auth(self, slot: Slot) -> None:
        if slot in self.pre_auth:
            del self.pre_auth[slot]
            same = self.pre_auth_by_address[slot.address]
            del same[slot]
            if not same:
                del self.pre_auth_by_address[slot.address]

    def authenticated(self, conn: Connection) -> None:
        """A connection has a session: it no longer counts against the pre-auth caps."""
        slot = conn.slot
        if slot is not None and not slot.authenticated:
            slot.authenticated = True
            self._forget_pre_auth(slot)

    def unauthenticated(self, conn: Connection) -> None:
        """A connection's session was closed and the connection stays: it counts
        against the pre-auth caps again (the newest of them)."""
        slot = conn.slot
        if slot is not None and slot.authenticated and slot in self.slots and not slot.closing:
            slot.authenticated = False
            self.pre_auth[slot] = None
            self.pre_auth_by_address.setdefault(slot.address, {})[slot] = None

    def release(self, slot: Slot) -> None:
        """The socket is closed."""
        if slot in self.slots:
            del self.slots[slot]
            self._forget_pre_auth(slot)
            if not slot.closing:
                self.open -= 1

    def connection(self, channel: Channel, remote: str, slot: Slot | None,
                   max_frame: int | None = None,
                   cls: type[Connection] | None = None) -> Connection:
        """A connection over ``channel``, in its slot (closed at once if the slot was
        taken back while the socket was being set up); ``cls`` for a kind of its own
        (an SSE stream)."""
        conn = (cls or Connection)(channel, remote, config=self.config, submit=self.submit,
                          hello=self.hello, threads=self.threads, transport=self,
                          max_frame=max_frame)
        conn.slot = slot
        if slot is not None:
            slot.conn = conn
            if slot.closing:
                conn.abort(POLICY, "too many connections")
        return conn

    async def run(self, conn: Connection) -> None:
        """Run a connection to its end; a failure closes it alone, with 1011."""
        self.connections.add(conn)
        try:
            await conn.run()
        except Exception:
            log.exception("connection %s failed; closing it with 1011", conn.remote)
            if not conn.torn and not conn.channel.closed:
                with trio.CancelScope(shield=True), trio.move_on_after(1):
                    await conn.channel.close(INTERNAL, "internal error")
        finally:
            self.connections.discard(conn)

    async def handle(self, request: WebSocketRequest, slot: Slot | None = None) -> None:
        """A WebSocket handshake, then its connection."""
        cfg = self.config.host
        if not origin_allowed(request, cfg.allowed_origins):
            await request.reject(403, body=b"origin not allowed")
            return
        if not self.submit.accepting:
            await request.reject(503, body=b"shutting down")
            return
        channel = await WebSocketChannel.accept(request, cfg.limits.max_frame_bytes)
        if channel is not None:
                await self.run(self.connection(channel, address(request), slot))

    def close_all(self, code: int = GOING_AWAY, reason: str = "server shutting down") -> None:
        for conn in list(self.connections):
            conn.close_soon(code, reason)


def stream_address(stream: Any) -> str:
    """The peer address of an accepted socket ("local" for an in-memory stream)."""
    sock = getattr(stream, "socket", None)
    if sock is None:
        return "local"
    try:
        peer = sock.getpeername()
    except OSError:
        return "unknown"
    return str(peer[0]) if isinstance(peer, tuple) else str(peer)
