"""Server-Sent Events: a session's signals as a ``text/event-stream``.

An SSE stream (``GET /v1/events``, served by host/http.py) is a transport
connection like a WebSocket: it attaches to its session as a resume does (the
``Last-Event-ID`` header is ``last_seq``), displacing the session's other
connection, and its outbox, lag and slow-reader rules are the transport's. Only
the channel differs: nothing is read (the client's requests come as
``POST /v1/actions``), each signal goes out as one event (``id:`` its seq,
``event:`` its name, ``data:`` its data as JSON), a ping is a keep-alive comment,
and the last event says why the stream ends, since HTTP has no close code.
Unlike ``session.resume``, attaching does not rotate the resume token: the
client's ``Authorization`` header stays valid for its next requests and streams.
"""

from __future__ import annotations

import json

import trio

from host.channel import ChannelClosed, TaskWrites, send_within
from host.messages import Signal
from host.transport import Connection
from state.codec import encode_json

KEEP_ALIVE = b": keep-alive\n\n"
CRASHED = 1006
_READ = 4096


def event(sig: Signal) -> str:
    """One SSE event: ``id:`` only for a numbered signal (an unnumbered one, such as
    the stream's own ``session.resumed``, leaves the client's last id alone)."""
    cache = sig.encoded if sig.encoded is not None else {}
    text = cache.get("json")
    if text is None:  # JSON escapes CR and LF, so the data is one line
        text = cache["json"] = encode_json(sig.data).decode("utf-8")
    name = sig.signal.replace("\r", " ").replace("\n", " ")
    head = f"id: {sig.seq}\n" if sig.seq is not None else ""
    return f"{head}event: {name}\ndata: {text}\n\n"


class SseChannel(TaskWrites):
    """The write side of one HTTP response, held open. The response's head goes out
    with the first event (after the session is attached, so a refusal can still be
    an HTTP error status)."""

    pings = True  # a keep-alive comment: proxies keep the stream, dead peers show

    def __init__(self, stream: trio.abc.Stream, head: bytes, *, send_timeout_s: float) -> None:
        self.stream = stream
        self.head = head
        self.send_timeout_s = send_timeout_s
        self.closed = False
        self.said_why = False
        self._lock = trio.Lock()  # the sender and the pinger both write

    async def receive(self) -> str:
        """Nothing is read from a stream: wait until the client goes away. Bytes it
        sends meanwhile (a pipelined request) are not served, and dropped."""
        while True:
            try:
                data = await self.stream.receive_some(_READ)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                data = b""
            if not data:
                self.closed = True
                raise ChannelClosed

    async def _write(self, data: bytes) -> None:
        async with self._lock:
            if self.closed:
                raise ChannelClosed
            if self.head:
                data, self.head = self.head + data, b""
            try:
                await send_within(self.stream, data, self.send_timeout_s)
            except ChannelClosed:
                self.closed = True
                raise

    async def send(self, frame: str | bytes) -> None:
        await self.send_many([frame])

    async def send_many(self, frames: list[str | bytes]) -> None:
        await self._write(b"".join(f.encode("utf-8", "surrogatepass") if isinstance(f, str)
                                   else f for f in frames))

    async def ping(self) -> None:
        await self._write(KEEP_ALIVE)

    async def close(self, code: int, reason: str) -> None:
        """Say why in a last, unnumbered event: ``connection.closed`` ``{code, reason}``
        with the WebSocket close codes (1000 when displaced by another connection)."""
        if self.closed:
            return
        if code == CRASHED:  # the host vanished (tests' crash()): nothing more is said
            self.closed = True
            return
        data = json.dumps({"code": code, "reason": reason})
        with trio.move_on_after(1):
            try:
                await self._write(f"event: connection.closed\ndata: {data}\n\n".encode())
                self.said_why = True
            except ChannelClosed:
                pass
        self.closed = True


class SseConnection(Connection):
    """A transport connection whose channel is an SSE stream: always JSON, no
    ``server.info`` greeting (its first event is ``session.resumed``), and a
    resume that keeps the session's token."""

    keeps_token = True

    def greet(self) -> None:
        pass

    def frame(self, sig: Signal) -> str:
        return event(sig)
