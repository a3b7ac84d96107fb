"""The values that move between the parts of the server, and the two seams they cross.

A transport turns bytes into ``Request``s and hands them to a ``Submitter`` (the
server's router); the world (or the server) that applies one produces ``Effects``;
released, their ``Signal``s reach a ``Peer`` (a connection of any transport).
Every part imports this module and this module imports nobody, so no part needs
another to name what it receives (hypercorn's ``events.py`` plays this role).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import trio


@dataclass(slots=True)  # replay buffers hold many: no per-instance dict for the GC to walk
class Signal:
    """One signal on its way to a client; ``seq`` is set once it is addressed."""

    signal: str
    data: dict[str, Any]
    re: Any = None
    has_re: bool = False
    seq: int | None = None
    encoding: str | None = None  # forced encoding for a reply; None = connection's
    encoded: dict[str, Any] | None = None  # ``data`` encoded once, shared by a broadcast

    def envelope(self) -> dict[str, Any]:
        out: dict[str, Any] = {"signal": self.signal}
        if self.has_re:
            out["re"] = self.re
        if self.seq is not None:
            out["seq"] = self.seq
        out["data"] = self.data
        return out


@dataclass(slots=True)  # built for every request
class Request:
    """One action to apply, from a connection or from inside the server."""

    action: str
    params: Any
    id: Any = None
    has_id: bool = False
    conn: Any = None  # the Peer it came on (None for internal actions)
    encoding: str | None = None
    error: Any = None  # an ActionError: refused before it got here (bad frame, envelope)
    internal: bool = False
    done: trio.Event | None = None  # set once released (its outputs delivered)
    result: Any = None  # internal: the handler's data; else, with ``done``: the reply Signal
    failure: Any = None  # the ActionError an internal action was refused with
    more: bool = False  # the client's next request was read with it: they may share a commit


@dataclass
class Disconnect:
    """A connection went away; its session (if any) stays, resumable."""

    conn: Any  # a Peer


@dataclass
class Emit:
    """A signal a handler asked to send: to the requester, everyone, or one session."""

    signal: str
    data: dict[str, Any]
    to: str | None = None  # session id; None with broadcast=False means the reply
    broadcast: bool = False
    exclude: str | None = None  # a session a broadcast skips (the requester, say)
    topic: str | None = None  # a broadcast's topic (host/topics.py); None: every session
    participants: tuple[str, ...] = ()  # session ids a topic's broadcast reaches regardless


@dataclass(slots=True)  # built for every action
class Effects:
    """What applying one action produced, held until its journal entry is durable."""

    outputs: list[tuple[Any, Signal]] = field(default_factory=list)  # (Session | Peer, signal)
    entry: Any = None  # its state.store.JournalEntry, if it changed the world
    data: dict[str, Any] = field(default_factory=dict)
    after: list[Callable[[], None]] = field(default_factory=list)  # run once released


class Peer(Protocol):
    """A client connection as the session layer sees it, whatever its transport.

    The session gate and the dispatcher touch a connection only through these;
    the transport owns everything else about it (its socket, framing, counters).
    """

    session: Any  # its host.sessions.Session, or None
    encoding: str
    remote: str
    failed_opens: int

    def deliver(self, sig: Signal) -> bool:
        """Queue a signal to send; False if the connection refused it (closed, too slow)."""
        ...

    def attached(self, session: Any) -> None:
        """A session now speaks through this connection."""
        ...

    def detached(self) -> None:
        """The session was closed; the connection stays, without one."""
        ...

    def displace(self) -> None:
        """The session was resumed on another connection: close this one."""
        ...

    def close_soon(self, code: int, reason: str) -> None:
        """Close once what is already queued has been sent."""
        ...


class Writer(Protocol):
    """One world's (or the server's) dispatcher, as a transport hands it a request."""

    async def put(self, item: Request | Disconnect) -> None: ...


class Submitter(Protocol):
    """Where a transport hands what it read: the server's router."""

    @property
    def accepting(self) -> bool:
        """False once the server is shutting down: new connections are refused."""
        ...

    def ready(self, item: Request) -> Writer | None:
        """The writer that would apply this request as soon as it is put, before
        ``put`` returns (so the caller can send what it produced itself, with no
        hand-off to another task); None if it would wait."""
        ...

    async def put(self, item: Request | Disconnect) -> None:
        """Apply or queue one item, in the order the connection read them."""
        ...
