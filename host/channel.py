"""What a transport connection reads from and writes to, whatever the protocol.

A channel turns bytes into messages (a JSON text, or CBOR bytes) and frames back
into bytes. The connection above it (host/transport.py) does everything else the
same way for every protocol: limits, decoding, the outbox, sessions.
"""

from __future__ import annotations

import os
from typing import Protocol

import trio

from host.actions import ActionError


class ChannelClosed(Exception):
    """The peer went away (or the channel gave up on it)."""


class Refused(Exception):
    """What was read cannot be taken and the connection must close with ``code``.

    With ``answer`` the client is first told why in an ``error`` signal (a
    protocol without close codes has no other way to say it); without, the
    connection closes at once.
    """

    def __init__(self, code: int, reason: str, answer: ActionError | None = None) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason
        self.answer = answer


class _Skipped(str):
    """A frame that asks nothing: a blank line, a piece of a fragmented message, a
    ping or pong. A channel hands one up for each so that a flood of them counts
    toward the flood rule (read on, they cost the host as much as requests)."""

    __slots__ = ()


SKIPPED = _Skipped()


class Unreadable(Exception):
    """One message could not be read (not UTF-8, say); it is answered with
    ``error`` and the connection carries on."""

    def __init__(self, error: ActionError) -> None:
        super().__init__(str(error))
        self.error = error


class Channel(Protocol):
    pings: bool  # whether the connection should ping (and expect pongs)

    @property
    def closed(self) -> bool:
        """Closed by either side: no close may be sent any more."""
        ...

    async def receive(self) -> str | bytes:
        """The next message; raises ChannelClosed, Refused or Unreadable."""
        ...

    async def send(self, frame: str | bytes) -> None:
        """Send one frame; raises ChannelClosed."""
        ...

    async def send_many(self, frames: list[str | bytes]) -> None:
        """Send frames in order, in as few writes as the protocol allows (a client
        watching a busy world gets several signals a turn: one system call, not
        one each); raises ChannelClosed."""
        ...

    @property
    def writable_now(self) -> bool:
        """Whether ``send_now`` may be called: no write is under way or waiting."""
        ...

    @property
    def pending(self) -> bool:
        """Another message was read with the one ``receive`` last returned, and waits:
        the client sent them back to back."""
        ...

    def send_now(self, frames: list[str | bytes]) -> None:
        """``send_many`` here and now, without waiting or yielding (only when
        ``writable_now``): what the socket does not take at once is kept, in order,
        for the next ``send_many`` (``backlog``)."""
        ...

    @property
    def backlog(self) -> bool:
        """Bytes ``send_now`` kept wait for a ``send_many`` (of nothing, if need be)."""
        ...

    async def ping(self) -> None:
        """Returns once the peer answered; raises ChannelClosed."""
        ...

    async def close(self, code: int, reason: str) -> None:
        """Tell the peer why (as the protocol can) and close."""
        ...


async def send_within(stream: trio.abc.SendStream, data: bytes, timeout_s: float) -> None:
    """Write ``data`` within ``timeout_s``; ChannelClosed if the peer is gone or too
    slow (then part of it may have gone out, and nothing can follow it)."""
    with trio.move_on_after(timeout_s):
        try:
            await stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            raise ChannelClosed from None
        return
    raise ChannelClosed


class Outgoing:
    """What a channel writes to a plain TCP socket from the turn that made it
    (``write_now``), and what the socket did not take (``rest``), which goes first
    with the channel's next write by a task.

    Every write through a trio stream yields to the scheduler once done (trio's
    rule for each I/O call), so a reply written that way costs a pass of the
    scheduler, and a signal released outside its connection's tasks (by a journal
    commit, a broadcast) also wakes that connection's sender task. A small write
    to a socket with room is taken by the kernel at once: written here, it costs
    neither. A TLS or in-memory stream has no such socket: its writes wait for a
    task (``ready`` is false).
    """

    def __init__(self, stream: trio.abc.Stream) -> None:
        self._socket = stream.socket if isinstance(stream, trio.SocketStream) else None
        self.rest = b""

    @property
    def ready(self) -> bool:
        """A write now may start: a plain socket, and nothing kept from the last."""
        return self._socket is not None and not self.rest

    def write_now(self, data: bytes) -> None:
        """Write what the socket's buffer takes now, without waiting or yielding; keep
        the rest (all of it if the socket is closed or broken: the task that writes
        it finds out)."""
        assert self._socket is not None, "only when ready"
        fd = self._socket.fileno()
        try:
            sent = os.write(fd, data) if fd >= 0 else 0
        except OSError:  # full (BlockingIOError), or the peer is gone
            sent = 0
        self.rest = data[sent:]

    def take_rest(self) -> bytes:
        """What the socket did not take, for a task to write before anything else."""
        rest, self.rest = self.rest, b""
        return rest


class Incoming:
    """Reads a plain TCP socket as trio's ``SocketStream.receive_some`` does (one
    pass of the scheduler a read, none more when the read had to wait), without
    the stream's and socket's wrapper layers: on a small message they cost as much
    as the read itself. A TLS or in-memory stream is read through the stream."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self._stream = stream
        self._socket = stream.socket if isinstance(stream, trio.SocketStream) else None

    async def receive(self, max_bytes: int) -> bytes | bytearray:
        """What the peer sent next (b"" once it is done); raises BrokenResourceError
        and ClosedResourceError as the stream does."""
        sock = self._socket
        if sock is None:
            return await self._stream.receive_some(max_bytes)
        await trio.lowlevel.checkpoint_if_cancelled()
        waited = False
        while True:
            fd = sock.fileno()
            if fd < 0:
                raise trio.ClosedResourceError("the socket was closed")
            try:
                data = os.read(fd, max_bytes)
            except BlockingIOError:
                await trio.lowlevel.wait_readable(sock)  # (a checkpoint)
                waited = True
                continue
            except OSError as exc:  # reset by the peer
                raise trio.BrokenResourceError(str(exc)) from exc
            if not waited:
                await trio.lowlevel.cancel_shielded_checkpoint()
            return data


class TaskWrites:
    """For a channel whose writes always wait for a task (no ``send_now``)."""

    writable_now = False
    backlog = False
    pending = False  # (these channels hand over one message at a time)

    def send_now(self, frames: list[str | bytes]) -> None:
        raise AssertionError("not writable_now")
