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

import trio

from host.messages import Signal as Signal
from host.topics import Interest
from state.codec import encode_cbor, encode_json

# The highest ``last_seq`` a client may present: the largest integer every JSON
# client reads exactly. A seq never gets near SQLite's 2**63 from here.
MAX_SEQ = 2**53 - 1
# A stored next seq above this cannot have been reached by counting signals from
# MAX_SEQ: the row is damaged (or was written by a host without the bound).
SEQ_LIMIT = 2**62


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
    encoding: str

    def deliver(self, frame: Signal) -> bool: ...

    def displace(self) -> None: ...

    def close_soon(self, code: int, reason: str) -> None: ...


def signal_size(sig: Signal, encoding: str) -> int:
    """The bytes a signal holds, as the transport encodes it: its data (encoded once,
    into the cache the transport sends from) and its ``re``. Non-ASCII text counts
    four bytes a character, so the count never falls short of what is held."""
    cache = sig.encoded
    if cache is None:
        cache = sig.encoded = {}
    if encoding == "cbor":
        data = cache.get("cbor")
        if data is None:
            data = cache["cbor"] = encode_cbor(sig.data)
        size = len(data)
    else:
        text = cache.get("json")
        if text is None:
            text = cache["json"] = encode_json(sig.data).decode("utf-8")
        size = len(text) if text.isascii() else 4 * len(text)
    return size + (_id_size(sig.re) if sig.has_re else 0)


def _id_size(request_id: Any) -> int:
    if isinstance(request_id, str):
        return len(request_id) if request_id.isascii() else 4 * len(request_id)
    return 8 if request_id is None else len(str(request_id))


@dataclass(eq=False)  # a session is itself: compared and hashed by identity
class Session:
    """A session's live delivery state: seq, replay buffer, remembered replies.

    Both the buffer and the remembered replies are bounded in count and in bytes
    (as encoded), so what a disconnected session pins is bounded too.
    """

    id: str
    name: str
    role: str
    machine: StateMachine = field(default_factory=lambda: StateMachine(State.OPEN))
    next_seq: int = 1
    buffer: deque[Signal] = field(default_factory=deque)
    buffer_size: int = 1000
    buffer_bytes_limit: int = 4 * 1024 * 1024
    buffer_bytes: int = 0
    sizes: deque[int] = field(default_factory=deque)  # of each signal in the buffer
    # id key -> [signal, data, durable, size in bytes (None until measured)]
    replies: OrderedDict[Any, list[Any]] = field(default_factory=OrderedDict)
    replies_size: int = 1000
    replies_bytes_limit: int = 1024 * 1024
    replies_bytes: int = 0
    outbox: Outbox | None = None
    created_at: float = 0.0
    last_active: float = 0.0
    actions_applied: int = 0
    signals_sent: int = 0
    version: int = 1  # moves on with every change of its runtime state (stores save by it)
    record: dict[str, Any] = field(default_factory=dict)  # its journaled record, as last synced
    # next_seq is exactly what was sent: false for a session loaded from the store
    # (signals sent after its last save are not counted) until it is resumed
    seq_exact: bool = True
    world: str | None = None  # the world it has joined (None: none)
    # what it subscribed to (None: never subscribed, so it gets every signal); kept
    # in its journaled record and indexed by the table (``Interest``)
    topics: frozenset[str] | None = None
    # replies to its own requests, by the saver (one per world) that holds them until
    # a commit: its next request waits for those held elsewhere (see host/router.py)
    holds: dict[Any, int] = field(default_factory=dict)
    released: trio.Event | None = None  # set when a hold ends, for whoever waits

    def hold(self, holder: Any) -> None:
        self.holds[holder] = self.holds.get(holder, 0) + 1

    def unhold(self, holder: Any) -> None:
        left = self.holds[holder] - 1
        if left:
            self.holds[holder] = left
        else:
            del self.holds[holder]
        if self.released is not None:
            self.released.set()
            self.released = None

    def held_elsewhere(self, holder: Any) -> bool:
        """Whether replies to this session wait for a commit of another holder."""
        return any(h is not holder for h in self.holds)

    async def wait_released(self) -> None:
        if self.released is None:
            self.released = trio.Event()
        await self.released.wait()

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
        self.version += 1
        encoding: str = sig.encoding or getattr(self.outbox, "encoding", None) or "json"
        size = signal_size(sig, encoding)
        self.buffer.append(sig)
        self.sizes.append(size)
        self.buffer_bytes += size
        while self.buffer and (len(self.buffer) > self.buffer_size
                               or self.buffer_bytes > self.buffer_bytes_limit):
            self.buffer.popleft()
            self.buffer_bytes -= self.sizes.popleft()
        if sig.has_re and sig.re is not None:
            entry = self.replies.get(_id_key(sig.re))
            if entry is not None and entry[3] is None and entry[1] is sig.data:
                entry[3] = size  # a remembered reply is measured as it goes out
                self.replies_bytes += size
                self._trim_replies()
        if self.outbox is not None and not self.outbox.deliver(sig):
            self.outbox = None  # the connection dropped it; the session stays resumable

    def overview(self) -> dict[str, Any]:
        """Its journaled record (the one source of truth for its state) with live figures."""
        record = self.record
        state = record.get("state", State.CLOSED.value)
        return {"id": self.id, "name": self.name, "role": self.role,
                "connected": state == State.OPEN.value, "state": state,
                "created_at": record.get("created_at"),
                "disconnected_at": record.get("disconnected_at"), "world": self.world,
                "last_active": self.last_active, "actions_applied": self.actions_applied,
                "signals_sent": self.signals_sent, "held_bytes": self.held_bytes}

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
        key = _id_key(request_id)
        old = self.replies.pop(key, None)
        if old is not None and old[3] is not None:
            self.replies_bytes -= old[3]
        self.replies[key] = [signal, data, durable, None]
        self._trim_replies()
        self.version += 1

    def _trim_replies(self) -> None:
        """Forget the oldest replies past the count or the bytes; the newest reply of
        a world-changing action stays even alone over the bytes (it is not an echo,
        and forgetting it would let a resent id apply twice)."""
        while self.replies and (len(self.replies) > self.replies_size
                                or self.replies_bytes > self.replies_bytes_limit):
            if len(self.replies) == 1 and self.replies_size >= 1:
                only = next(iter(self.replies.values()))
                if only[2]:
                    return
            _, entry = self.replies.popitem(last=False)
            if entry[3] is not None:
                self.replies_bytes -= entry[3]

    def measure_replies(self) -> None:
        """Measure replies remembered without being sent (replayed from the journal)."""
        for key, entry in self.replies.items():
            if entry[3] is None:
                size = len(encode_json(entry[1])) + _id_size(key[1])
                entry[3] = size
                self.replies_bytes += size
        self._trim_replies()

    @property
    def held_bytes(self) -> int:
        """What this session holds for a client: replay buffer and remembered replies."""
        return self.buffer_bytes + self.replies_bytes

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
            "replies": [[k[0], k[1], e[0], e[1]] for k, e in self.replies.items() if e[2]],
        }

    def restore_runtime(self, saved: dict[str, Any]) -> None:
        """Take back what a store saved, merged with what the session already holds
        (the server's store and each world's keep a copy, of different ages): the
        larger of each figure, the replies it lacks. Raises ValueError if it is not
        what runtime() writes (the caller repairs the session rather than failing)."""
        next_seq = saved.get("next_seq", 1)
        if type(next_seq) is not int or not 1 <= next_seq <= SEQ_LIMIT:
            raise ValueError(f"next_seq {next_seq!r} is out of range")
        self.next_seq = max(self.next_seq, next_seq)
        self.last_active = max(self.last_active, float(saved.get("last_active", 0.0)))
        self.actions_applied = max(self.actions_applied, int(saved.get("actions_applied", 0)))
        self.signals_sent = max(self.signals_sent, int(saved.get("signals_sent", 0)))
        for kind, key, sig, data in saved.get("replies", []):
            self.replies.setdefault((kind, key), [sig, data, True, None])
        self.measure_replies()


def _id_key(request_id: Any) -> tuple[str, Any]:
    # "7" and 7 are different ids; keep them apart.
    return (type(request_id).__name__, request_id)


class SessionTable:
    """The live sessions, kept in step with the ``sessions`` slice."""

    def __init__(self, buffer_size: int = 1000, replies_size: int = 1000,
                 buffer_bytes: int = 4 * 1024 * 1024, replies_bytes: int = 1024 * 1024) -> None:
        self.by_id: dict[str, Session] = {}
        self.by_world: dict[str, dict[str, Session]] = {}  # world id -> its sessions
        # who wants which topic: per world id, and (key None) among every session
        self.interest: dict[str | None, Interest[Session]] = {None: Interest()}
        self.buffer_size = buffer_size
        self.replies_size = replies_size
        self.buffer_bytes = buffer_bytes
        self.replies_bytes = replies_bytes
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
                            buffer_bytes_limit=self.buffer_bytes,
                            replies_bytes_limit=self.replies_bytes,
                            created_at=rec.get("created_at", 0.0),
                            last_active=rec.get("created_at", 0.0))
                self.by_id[sid] = s
                self.interest[None].add(s)
            else:
                s.role = rec["role"]
                state = State(rec["state"])
                if s.state != state:
                    s.machine.move(state)
            s.record = rec
            self.place(s, rec.get("world"))
            topics = rec.get("topics")
            self.subscribe(s, None if topics is None else frozenset(topics))
        for sid in [sid for sid in self.by_id if sid not in records]:
            self.drop(sid)

    def members(self, world_id: str) -> dict[str, Session]:
        """The sessions joined to a world: a live view, kept in step by the table."""
        return self.by_world.setdefault(world_id, {})

    def interest_in(self, world_id: str | None) -> Interest:
        """Who wants which topic among a world's sessions (None: among every session)."""
        found = self.interest.get(world_id)
        if found is None:
            found = self.interest[world_id] = Interest()
        return found

    def place(self, s: Session, world_id: str | None) -> None:
        """Move a session to the world its record names."""
        if s.world == world_id:
            return
        if s.world is not None:
            self.by_world.get(s.world, {}).pop(s.id, None)
            self.interest_in(s.world).remove(s)
        s.world = world_id
        if world_id is not None:
            self.members(world_id)[s.id] = s
            self.interest_in(world_id).add(s)

    def subscribe(self, s: Session, topics: frozenset[str] | None) -> None:
        """Set what a session subscribed to (as its record says), re-indexing it."""
        if s.topics == topics:
            return
        indexes = [self.interest[None]] + ([self.interest_in(s.world)] if s.world else [])
        for index in indexes:
            index.remove(s)
        s.topics = topics
        for index in indexes:
            index.add(s)

    def drop(self, session_id: str) -> Session | None:
        s = self.by_id.pop(session_id, None)
        if s is not None:
            self.place(s, None)
            self.interest[None].remove(s)
            if s.machine.can(State.CLOSED):
                s.machine.move(State.CLOSED)
            s.outbox = None
            self.ended.append(session_id)
        return s

    def take_ended(self) -> list[str]:
        ended, self.ended = self.ended, []
        return ended
