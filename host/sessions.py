"""Sessions: the connection/session state machine and each session's delivery state.

The state machine is independent of the transport. What must survive a
restart (id, name, role, resume-token hash, state, times) lives in the
``sessions`` slice and changes only through actions; what changes with every
signal (``seq``, the replay buffer, remembered replies) lives here and is
saved beside the world by the saver.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Protocol


class State(str, Enum):
    NONE = "none"
    OPEN = "open"
    DISCONNECTED = "disconnected"
    CLOSED = "closed"


class TransitionError(RuntimeError):
    """A session was asked to move where its state machine does not allow."""


_ALLOWED: dict[State, set[State]] = {
    State.NONE: {State.OPEN},
    State.OPEN: {State.DISCONNECTED, State.CLOSED},
    State.DISCONNECTED: {State.OPEN, State.CLOSED},
    State.CLOSED: set(),
}


class StateMachine:
    """no session -> open <-> disconnected-resumable -> closed; nothing else."""

    def __init__(self, state: State = State.NONE) -> None:
        self.state = state

    def can(self, target: State) -> bool:
        return target in _ALLOWED[self.state]

    def move(self, target: State) -> None:
        if not self.can(target):
            raise TransitionError(f"session cannot go from {self.state.value} to {target.value}")
        self.state = target


def new_token() -> str:
    return secrets.token_urlsafe(32)


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


def hash_matches(token: str, expected_hash: str) -> bool:
    """Constant-time comparison of a presented token with a stored hash."""
    return hmac.compare_digest(token_hash(token), expected_hash)


class Outbox(Protocol):
    """Where a connected session's signals go (the transport's connection)."""

    session: Session | None

    def deliver(self, frame: Signal) -> bool: ...

    def displace(self) -> None: ...

    def close_soon(self, code: int, reason: str) -> None: ...


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


@dataclass
class Session:
    """A session's live delivery state: seq, replay buffer, remembered replies."""

    id: str
    name: str
    role: str
    machine: StateMachine = field(default_factory=lambda: StateMachine(State.OPEN))
    next_seq: int = 1
    buffer: deque[Signal] = field(default_factory=deque)
    buffer_size: int = 1000
    replies: OrderedDict[Any, tuple[str, dict[str, Any], bool]] = field(
        default_factory=OrderedDict)
    replies_size: int = 1000
    outbox: Outbox | None = None
    created_at: float = 0.0
    last_active: float = 0.0
    actions_applied: int = 0
    signals_sent: int = 0
    dirty: bool = True  # runtime state changed since it was last saved

    @property
    def state(self) -> State:
        return self.machine.state

    @property
    def connected(self) -> bool:
        return self.outbox is not None

    def deliver(self, sig: Signal) -> None:
        """Number the signal, keep it for replay, and hand it to the connection."""
        sig.seq = self.next_seq
        self.next_seq += 1
        self.signals_sent += 1
        self.dirty = True
        self.buffer.append(sig)
        while len(self.buffer) > self.buffer_size:
            self.buffer.popleft()
        if self.outbox is not None and not self.outbox.deliver(sig):
            self.outbox = None  # the connection dropped it; the session stays resumable

    def missed(self, last_seq: int) -> tuple[list[Signal], bool]:
        """Signals after last_seq still held, and whether that is all of them."""
        held = [s for s in self.buffer if s.seq is not None and s.seq > last_seq]
        first_needed = last_seq + 1
        complete = first_needed >= self.next_seq or (bool(held) and held[0].seq == first_needed)
        return held, complete

    def remember(self, request_id: Any, signal: str, data: dict[str, Any],
                 durable: bool = False) -> None:
        """Keep a reply for a repeated id; ``durable`` ones (of world-changing actions)
        are also saved, so a request resent after a crash is not applied twice."""
        if request_id is None:
            return
        self.replies[_id_key(request_id)] = (signal, data, durable)
        self.replies.move_to_end(_id_key(request_id))
        while len(self.replies) > self.replies_size:
            self.replies.popitem(last=False)
        self.dirty = True

    def recall(self, request_id: Any) -> tuple[str, dict[str, Any]] | None:
        if request_id is None:
            return None
        found = self.replies.get(_id_key(request_id))
        return None if found is None else (found[0], found[1])

    def runtime(self) -> dict[str, Any]:
        """What the saver keeps of this session beside the world."""
        return {
            "next_seq": self.next_seq,
            "last_active": self.last_active,
            "actions_applied": self.actions_applied,
            "signals_sent": self.signals_sent,
            "replies": [[k[0], k[1], s, d] for k, (s, d, durable) in self.replies.items()
                        if durable],
        }

    def restore_runtime(self, saved: dict[str, Any]) -> None:
        self.next_seq = max(self.next_seq, int(saved.get("next_seq", 1)))
        self.last_active = float(saved.get("last_active", self.last_active))
        self.actions_applied = int(saved.get("actions_applied", 0))
        self.signals_sent = int(saved.get("signals_sent", 0))
        for kind, key, sig, data in saved.get("replies", []):
            self.replies[(kind, key)] = (sig, data, True)


def _id_key(request_id: Any) -> tuple[str, Any]:
    # "7" and 7 are different ids; keep them apart.
    return (type(request_id).__name__, request_id)


class SessionTable:
    """The live sessions, kept in step with the ``sessions`` slice."""

    def __init__(self, buffer_size: int = 1000, replies_size: int = 1000) -> None:
        self.by_id: dict[str, Session] = {}
        self.buffer_size = buffer_size
        self.replies_size = replies_size
        self.ended: list[str] = []

    def get(self, session_id: str | None) -> Session | None:
        return None if session_id is None else self.by_id.get(session_id)

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self.by_id.values())

    def __len__(self) -> int:
        return len(self.by_id)

    def sync(self, records: dict[str, dict[str, Any]]) -> None:
        """Create sessions the slice has and the table lacks, drop the reverse."""
        for sid, rec in records.items():
            s = self.by_id.get(sid)
            if s is None:
                s = Session(sid, rec["name"], rec["role"], StateMachine(State(rec["state"])),
                            buffer_size=self.buffer_size, replies_size=self.replies_size,
                            created_at=rec.get("created_at", 0.0),
                            last_active=rec.get("created_at", 0.0))
                self.by_id[sid] = s
            else:
                s.role = rec["role"]
                state = State(rec["state"])
                if s.state != state:
                    s.machine.move(state)
        for sid in [sid for sid in self.by_id if sid not in records]:
            self.drop(sid)

    def drop(self, session_id: str) -> Session | None:
        s = self.by_id.pop(session_id, None)
        if s is not None:
            if s.machine.can(State.CLOSED):
                s.machine.move(State.CLOSED)
            s.outbox = None
            self.ended.append(session_id)
        return s

    def take_ended(self) -> list[str]:
        ended, self.ended = self.ended, []
        return ended
