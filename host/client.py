"""A trio client for worldhost.

``async with connect(url) as c:`` opens a session; ``await c.call(action, **params)``
returns the reply's ``data`` or raises CallError with the error ``code``, or
CallTimeout when no reply came in time; ``c.signals()`` iterates everything that
is not a reply; ``c.state`` and ``c.state_changes()`` tell a UI whether it is
connected. After a drop the client reconnects, resumes its session and resends
unanswered requests with their ids, so each is applied once. See
docs/client-python.md.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, Final, Literal

import trio
import trio_websocket
from trio_websocket import ConnectionClosed, HandshakeError, WebSocketConnection
from wsproto.utilities import LocalProtocolError

from host import chunks
from state.codec import check_plain, decode_cbor, decode_json, encode_cbor, encode_json

log = logging.getLogger("worldhost.client")

Opener = Callable[[trio.Nursery], Awaitable[WebSocketConnection]]

State = Literal["connecting", "open", "resuming", "offline"]
"""``connecting``: opening the first connection and session; ``open``: connected, calls
go out; ``resuming``: the connection dropped, the client is reconnecting (calls wait);
``offline``: closed for good (closed, or the session could not be resumed)."""

DEFAULT_TIMEOUT: Final = 30.0  # connect()'s default seconds to wait for a reply
RECONNECT_ATTEMPT_S: Final = 10.0  # one reconnect (connect, handshake, resume) at most
BACKOFF_FIRST_S: Final = 0.05  # after a failed attempt; doubles up to BACKOFF_MAX_S
BACKOFF_MAX_S: Final = 2.0


class _Unset:
    pass


UNSET: Final = _Unset()


class CallError(Exception):
    """The host answered a request with an ``error`` signal; ``data`` is that
    signal's data as sent (``{code, message, details?, action?}``)."""

    def __init__(self, code: str, message: str, details: Any = None, action: str = "",
                 data: dict[str, Any] | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.details = details
        self.action = action
        self.data = data if data is not None else {
            k: v for k, v in (("code", code), ("message", message), ("details", details),
                              ("action", action)) if v is not None}


class CallTimeout(TimeoutError):
    """No reply came within the timeout. The request is not resent after this, but
    it may already have reached the host and been applied (or be applied when a
    queued copy arrives): resending it with the same ``request_id`` is safe, the
    host applies an id once per session and answers a repeat with the first reply."""

    def __init__(self, action: str, request_id: Any, timeout: float, state: str) -> None:
        super().__init__(
            f"no reply to {action} within {timeout:g}s (connection {state}); it may still "
            f"have been applied: resend it with request_id={request_id!r} to learn its "
            f"outcome without applying it twice")
        self.action = action
        self.request_id = request_id
        self.timeout = timeout
        self.state = state


class Disconnected(Exception):
    """The connection is gone and could not be resumed."""


class _Pending:
    def __init__(self, frame: dict[str, Any]) -> None:
        self.frame = frame
        self.done = trio.Event()
        self.reply: dict[str, Any] | None = None


class Client:
    def __init__(self, opener: Opener, nursery: trio.Nursery, *, name: str = "client",
                 token: str | None = None, encoding: str = "json", reconnect: bool = True,
                 max_frame_bytes: int = 64 * 1024 * 1024, timeout: float | None = None) -> None:
        self._opener = opener
        self._nursery = nursery
        self.name = name
        self.token = token
        self.encoding = encoding
        self.reconnect = reconnect
        self.max_frame_bytes = max_frame_bytes
        self.timeout = timeout  # seconds a call waits for its reply; None: no limit
        self._state: State = "connecting"
        self._state_watchers: list[trio.MemorySendChannel[State]] = []
        self._ids = itertools.count(1)
        self._prefix = f"c{id(self) % 100000}-"
        self._pending: dict[Any, _Pending] = {}
        self._ws: WebSocketConnection | None = None
        self._connected = trio.Event()
        self._send_signal, self._signals = trio.open_memory_channel[dict[str, Any]](100_000)
        self.server_info: dict[str, Any] = {}
        self.session_id: str | None = None
        self.resume_token: str | None = None
        self.role: str | None = None
        self.last_seq = 0
        # a resume's replay: signals numbered after the last_seq it sent and before its
        # reply's seq come after that reply, and are new to this client
        self._replay_window: tuple[int, int] | None = None
        self._replayed: set[int] = set()
        self.resumes = 0
        self.last_resume: dict[str, Any] | None = None
        self.closed = False
        self._failure: BaseException | None = None
        self._reassembler = chunks.Reassembler(1 << 40)
        self._transfers = itertools.count(1)
        self._send_lock = trio.Lock()

    # public -----------------------------------------------------------------
    @property
    def state(self) -> State:
        """``connecting``, ``open``, ``resuming`` or ``offline`` (see ``State``)."""
        return self._state

    async def state_changes(self) -> AsyncIterator[State]:
        """The current state, then each new one; ends after ``offline``."""
        send, receive = trio.open_memory_channel[State](64)
        send.send_nowait(self._state)
        self._state_watchers.append(send)
        try:
            async for state in receive:
                yield state
                if state == "offline":
                    return
        finally:
            if send in self._state_watchers:
                self._state_watchers.remove(send)

    async def call(self, action: str, params: dict[str, Any] | None = None, *,
                   timeout: float | None | _Unset = UNSET, **kwargs: Any) -> dict[str, Any]:
        """Send one action and return its reply data; raises CallError on ``error``,
        CallTimeout when no reply came within ``timeout`` seconds (default: the
        client's). A param named ``timeout`` goes in ``params``."""
        reply = await self.request(action, {**(params or {}), **kwargs}, timeout=timeout)
        if reply["signal"] == "error":
            data = reply.get("data", {})
            raise CallError(data.get("code", "?"), data.get("message", ""), data.get("details"),
                            data.get("action", action), data=data)
        return reply.get("data", {})

    async def request(self, action: str, params: dict[str, Any] | None = None,
                      request_id: Any = None, *,
                      timeout: float | None | _Unset = UNSET) -> dict[str, Any]:
        """Send one action and return the whole reply envelope."""
        rid = request_id if request_id is not None else f"{self._prefix}{next(self._ids)}"
        check_plain(params or {}, max_depth=10_000)  # the host would refuse the frame unanswered
        limit = self.timeout if isinstance(timeout, _Unset) else timeout
        pending = _Pending({"id": rid, "action": action, "params": params or {}})
        self._pending[rid] = pending
        try:
            with trio.move_on_after(float("inf") if limit is None else limit) as scope:
                await self._send(pending.frame)
                await pending.done.wait()
        finally:
            self._pending.pop(rid, None)
        if scope.cancelled_caught:
            assert limit is not None
            raise CallTimeout(action, rid, limit, self._state)
        if pending.reply is None:
            raise Disconnected(f"connection lost before {action} was answered") from self._failure
        return pending.reply

    async def signals(self) -> AsyncIterator[dict[str, Any]]:
        """Every signal that is not a reply to this client's requests, in order."""
        async for sig in self._signals:
            yield sig

    async def next_signal(self, name: str | None = None, timeout: float = 10) -> dict[str, Any]:
        """The next signal (named ``name``, skipping others), or TimeoutError."""
        with trio.fail_after(timeout):
            async for sig in self._signals:
                if name is None or sig["signal"] == name:
                    return sig
        raise Disconnected("signal stream ended")

    async def send_raw(self, frame: str | bytes) -> None:
        """Send a frame as is (for testing how the host takes bad input)."""
        await self._connected.wait()
        assert self._ws is not None
        await self._ws.send_message(frame)

    async def close_session(self) -> None:
        """End the session for good (``session.close``) and stop reconnecting."""
        if self.session_id is not None:
            await self.call("session.close")
            self.session_id = None
        self.reconnect = False

    async def aclose(self) -> None:
        self.closed = True
        self._set_state("offline")
        if self._ws is not None:
            with trio.move_on_after(2):
                await self._ws.aclose()

    async def drop(self) -> None:
        """Drop the connection without closing the session (it will resume)."""
        if self._ws is not None:
            await self._ws.aclose()

    # internals ----------------------------------------------------------------
    def _set_state(self, state: State) -> None:
        if state == self._state:
            return
        self._state = state
        for watcher in list(self._state_watchers):
            try:
                watcher.send_nowait(state)
            except trio.WouldBlock:  # a watcher 64 changes behind misses this one
                pass

    def _encode(self, frame: dict[str, Any]) -> str | bytes:
        if self.encoding == "cbor":
            return encode_cbor(frame)
        return encode_json(frame).decode()

    async def _send(self, frame: dict[str, Any]) -> None:
        while True:
            await self._connected.wait()
            if self.closed:
                raise Disconnected("client closed")
            ws = self._ws
            assert ws is not None
            try:
                await self._send_frame(ws, self._encode(frame))
                return
            except ConnectionClosed:
                if not self.reconnect:
                    raise Disconnected("connection closed") from None
                await trio.sleep(0.01)  # the reader reconnects; resend after it

    def _frame_limit(self) -> int:
        return int(self.server_info.get("limits", {}).get("max_frame_bytes", 16 * 1024 * 1024))

    async def _send_frame(self, ws: WebSocketConnection, encoded: str | bytes) -> None:
        """Send one frame, in chunks when it is over the host's frame limit."""
        if len(encoded) <= self._frame_limit():
            await ws.send_message(encoded)
            return
        pieces = chunks.split(encoded, f"c{next(self._transfers)}",
                              piece=min(chunks.PIECE, self._frame_limit() // 4),
                              as_request=True)
        async with self._send_lock:
            for piece in pieces:
                await ws.send_message(piece)

    async def _open(self, open_session: bool) -> None:
        ws = await self._opener(self._nursery)
        info = self._decode(await ws.get_message())
        self.server_info = info.get("data", {}) if info else {}
        self._ws = ws
        if not open_session:
            self._set_state("open")
            self._connected.set()
            return
        if self.session_id is None:
            params: dict[str, Any] = {"name": self.name}
            if self.token:
                params["token"] = self.token
            reply = await self._handshake(ws, "session.open", params)
            data = reply["data"]
            self.session_id, self.resume_token, self.role = (
                data["session_id"], data["resume_token"], data["role"])
        else:
            floor = self.last_seq
            reply = await self._handshake(ws, "session.resume", {
                "session_id": self.session_id, "resume_token": self.resume_token,
                "last_seq": floor})
            self._replay_window = (floor, reply.get("seq") or floor)
            self._replayed = set()
            data = reply["data"]
            self.resume_token = data.get("resume_token", self.resume_token)
            self.resumes += 1
            self.last_resume = data
        self._set_state("open")
        self._connected.set()

    async def _handshake(self, ws: WebSocketConnection, action: str,
                         params: dict[str, Any]) -> dict[str, Any]:
        rid = f"{self._prefix}{next(self._ids)}"
        await ws.send_message(self._encode({"id": rid, "action": action, "params": params}))
        while True:
            msg = self._decode(await ws.get_message())
            if msg is None:
                continue
            if msg.get("re") == rid:
                self._note_seq(msg)
                if msg["signal"] == "error":
                    data = msg["data"]
                    raise CallError(data["code"], data["message"], data.get("details"), action,
                                    data=data)
                return msg
            self._dispatch(msg)

    def _decode(self, message: str | bytes) -> dict[str, Any] | None:
        """A decoded signal; None for a piece of a chunked one still incomplete."""
        if isinstance(message, str):
            msg = decode_json(message)
        else:
            msg = decode_cbor(message, max_depth=10_000, plain=False)
        if msg.get("signal") == "chunk" and "re" not in msg:
            joined = self._reassembler.add(msg["data"], isinstance(message, str))
            return None if joined is None else self._decode(joined)
        return msg

    def _note_seq(self, msg: dict[str, Any]) -> bool:
        """Track seq; False for a signal already seen (a replayed duplicate)."""
        seq = msg.get("seq")
        if seq is None:
            return True
        if seq <= self.last_seq and msg.get("re") is None:
            window = self._replay_window
            if window is None or not window[0] < seq < window[1] or seq in self._replayed:
                return False
            self._replayed.add(seq)  # missed, replayed after the resume's reply
            return True
        self.last_seq = max(self.last_seq, seq)
        return True

    def _dispatch(self, msg: dict[str, Any]) -> None:
        if not self._note_seq(msg):
            return
        rid = msg.get("re")
        if rid is not None and rid in self._pending:
            pending = self._pending[rid]
            if not pending.done.is_set():
                pending.reply = msg
                pending.done.set()
            return
        try:
            self._send_signal.send_nowait(msg)
        except trio.WouldBlock:
            log.warning("signal buffer full; dropping %s", msg.get("signal"))

    async def _reader(self) -> None:
        delay = BACKOFF_FIRST_S
        while not self.closed:
            ws = self._ws
            assert ws is not None
            try:
                while True:
                    msg = self._decode(await ws.get_message())
                    if msg is not None:
                        self._dispatch(msg)
            except ConnectionClosed as exc:
                self._failure = exc
            if self.closed or not self.reconnect:
                break
            self._set_state("resuming")
            self._connected = trio.Event()
            while not self.closed:
                try:
                    with trio.fail_after(RECONNECT_ATTEMPT_S):
                        await self._open(open_session=self.session_id is not None)
                    delay = BACKOFF_FIRST_S
                    break
                except CallError as exc:
                    self._failure = exc
                    self.closed = True
                    break
                except (OSError, ConnectionClosed, HandshakeError, trio.TooSlowError) as exc:
                    self._failure = exc
                    await trio.sleep(delay)
                    delay = min(delay * 2, BACKOFF_MAX_S)
            if not self.closed:
                for pending in list(self._pending.values()):
                    if not pending.done.is_set():
                        self._nursery.start_soon(self._resend, pending)
        self._set_state("offline")
        for pending in self._pending.values():
            pending.done.set()
        self._send_signal.close()
        self._connected.set()

    async def _resend(self, pending: _Pending) -> None:
        try:
            await self._send(pending.frame)
        except Disconnected:
            pending.done.set()


# LocalProtocolError: trio-websocket answers a ping that arrives while it closes with a
# pong wsproto refuses to send; the connection is ending either way
CONNECTION_ERRORS = (OSError, ConnectionClosed, HandshakeError, trio.BrokenResourceError,
                     LocalProtocolError)


def url_opener(url: str, max_frame_bytes: int = 64 * 1024 * 1024,
               headers: list[tuple[bytes, bytes]] | None = None) -> Opener:
    """Opens a WebSocket to ``url``. Each connection's tasks run in a nursery of their
    own: a host shutting down answers the handshake with 503, which trio-websocket
    raises in the connection's reader task; in the client's nursery that would end
    the client, here it is one failed attempt (raised from the opener) to retry."""
    async def hold(task_status: trio.TaskStatus[WebSocketConnection]) -> None:
        started = False
        try:
            async with trio.open_nursery() as own:
                ws = await _connect(_ReaderWatch(own), url, max_frame_bytes, headers)
                started = True
                task_status.started(ws)
        except BaseExceptionGroup as group:
            failure = _connection_failure(group)
            if failure is None:
                raise
            if not started:
                raise failure from None
        except CONNECTION_ERRORS:
            if not started:
                raise
        # once handed over, a failure shows as ConnectionClosed to the client's reader

    async def opener(nursery: trio.Nursery) -> WebSocketConnection:
        ws: WebSocketConnection = await nursery.start(hold)
        return ws
    return opener


class _ReaderWatch:
    """The nursery trio-websocket starts a connection's reader task in, noting when
    that task ends: if the host closes the TCP connection mid-handshake (a host
    exiting), the reader ends without waking ``connect``, which would wait for ever."""

    def __init__(self, nursery: trio.Nursery) -> None:
        self.nursery = nursery
        self.reader_done = trio.Event()

    def start_soon(self, fn: Callable[..., Awaitable[Any]], *args: Any,
                   name: object = None) -> None:
        async def run() -> None:
            try:
                await fn(*args)
            finally:
                self.reader_done.set()
        self.nursery.start_soon(run, name=name)


async def _connect(watch: _ReaderWatch, url: str, max_frame_bytes: int,
                   headers: list[tuple[bytes, bytes]] | None) -> WebSocketConnection:
    connection: WebSocketConnection | None = None
    async with trio.open_nursery() as race:
        async def connect() -> None:
            nonlocal connection
            connection = await trio_websocket.connect_websocket_url(
                watch, url, message_queue_size=64,  # type: ignore[arg-type]  # start_soon is all it uses
                max_message_size=max_frame_bytes, extra_headers=headers)
            race.cancel_scope.cancel()

        async def reader_ended() -> None:
            await watch.reader_done.wait()
            race.cancel_scope.cancel()

        race.start_soon(connect)
        race.start_soon(reader_ended)
    if connection is None:
        raise OSError(f"{url}: the connection closed during the WebSocket handshake")
    return connection


def _connection_failure(group: BaseExceptionGroup) -> BaseException | None:
    """The connection error a group holds, if it holds nothing else."""
    leaves: list[BaseException] = []

    def walk(exc: BaseException) -> None:
        if isinstance(exc, BaseExceptionGroup):
            for inner in exc.exceptions:
                walk(inner)
        else:
            leaves.append(exc)
    walk(group)
    known = [e for e in leaves if isinstance(e, CONNECTION_ERRORS)]
    others = [e for e in leaves if not isinstance(e, (*CONNECTION_ERRORS, trio.Cancelled))]
    return known[0] if known and not others else None


def _only_pong_refused(group: BaseExceptionGroup) -> bool:
    """The group holds nothing but wsproto refusing a pong on a closing connection
    (raised in trio-websocket's reader task, never by the caller's code)."""
    refused, rest = group.split(LocalProtocolError)
    return refused is not None and rest is None


@asynccontextmanager
async def open_client(opener: Opener, *, name: str = "client", token: str | None = None,
                      encoding: str = "json", reconnect: bool = True,
                      open_session: bool = True,
                      timeout: float | None = None) -> AsyncIterator[Client]:
    client: Client | None = None
    try:
        async with trio.open_nursery() as nursery:
            client = Client(opener, nursery, name=name, token=token, encoding=encoding,
                            reconnect=reconnect, timeout=timeout)
            await client._open(open_session)
            nursery.start_soon(client._reader)
            try:
                yield client
            finally:
                await client.aclose()
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        if client is not None and client.closed and _only_pong_refused(group):
            return  # trio-websocket answered a ping while the client closed: nothing lost
        if len(group.exceptions) == 1:  # show the one error, not trio's wrapper
            raise group.exceptions[0] from None
        raise


def connect(url: str, *, name: str = "client", token: str | None = None,
            encoding: str = "json", reconnect: bool = True,
            open_session: bool = True, timeout: float | None = DEFAULT_TIMEOUT) -> Any:
    """``async with connect("ws://127.0.0.1:8765/") as c:`` — a client with a session.

    ``timeout`` is how long each call waits for its reply by default (None: for ever);
    a call can pass its own. The test harness's clients default to no limit, since
    mock-clock tests may wait on virtual time."""
    return open_client(url_opener(url), name=name, token=token, encoding=encoding,
                       reconnect=reconnect, open_session=open_session, timeout=timeout)
