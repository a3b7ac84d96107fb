"""Sessions: the connection/session state machine and each session's delivery state.

The state machine is independent of the transport. What must survive a
restart (id, name, role, resume-token hash, state, times) lives in the
``sessions`` slice and changes only through actions; what changes with every
signal (``seq``, the replay buffer, remembered replies) lives here and is
saved beside the world by the saver. With the outbound log on, each signal is
numbered as its commit is written and logged in it (``OutboundLog``), so the
replay buffer can be filled again from the stores after a restart.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Protocol

import trio

from host.messages import Signal as Signal
from host.topics import Interest
from state.codec import encode_array, encode_cbor, encode_json, encode_scalar, load_stored
from state.store import LoggedSignal, LogTrim, OutboundRows

# The highest ``last_seq`` a client may present: the largest integer every JSON
# client reads exactly. A seq never gets near SQLite's 2**63 from here.
MAX_SEQ = 2**53 - 1
# A stored next seq above this cannot have been reached by counting signals from
# MAX_SEQ: the row is damaged (or was written by a host without the bound).
SEQ_LIMIT = 2**62
# Signals a session holds back for an earlier one still being committed by another
# writer; past this many, that commit is taken for lost and the rest go on.
MAX_PARKED = 256


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
    # id key -> [signal, data, durable, size in bytes (None until measured), its item
    # of the saved runtime (None until a checkpoint first writes it)]
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
    # the last seq handed to the connection (and the replay buffer): signals numbered
    # by one writer's commit can be released after a later one's, and wait here
    sent_seq: int = 0
    parked: dict[int, Signal] = field(default_factory=dict)
    unlogged: list[Signal] = field(default_factory=list)  # sent without a commit: see OutboundLog

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

    def number(self, sig: Signal) -> None:
        """Give a signal this session's next seq (as its commit is written, with the
        outbound log on; else as it is delivered)."""
        sig.seq = self.next_seq
        self.next_seq += 1
        self.signals_sent += 1
        self.version += 1

    def unnumber(self, sig: Signal) -> None:
        """Give back the last seq taken (its commit failed before anything was sent)."""
        assert sig.seq == self.next_seq - 1
        sig.seq = None
        self.next_seq -= 1
        self.signals_sent -= 1

    def skip_to(self, next_seq: int) -> None:
        """Continue numbering at ``next_seq`` at least (what a store or the client says
        was sent before a restart): seqs are never used twice."""
        if next_seq > self.next_seq:
            self.next_seq = next_seq
            self.sent_seq = max(self.sent_seq, next_seq - 1)
            self.version += 1

    def deliver(self, sig: Signal) -> None:
        """Keep the signal for replay and hand it to the connection, in seq order:
        numbered now if its commit did not number it."""
        if sig.seq is None:
            self.number(sig)
        seq: int = sig.seq  # type: ignore[assignment]  # numbered just above
        if seq > self.sent_seq + 1:
            self.parked[seq] = sig  # an earlier one's commit is still under way
            if len(self.parked) <= MAX_PARKED:
                return
            # that commit will not end (its world stopped on a store failure): go on
            # without what it held, which a resume then reports as missed
            self.sent_seq = min(self.parked) - 1
            sig = self.parked.pop(self.sent_seq + 1)
        self._send(sig)
        while self.parked and (nxt := self.parked.pop(self.sent_seq + 1, None)) is not None:
            self._send(nxt)

    def _send(self, sig: Signal) -> None:
        assert sig.seq is not None
        self.sent_seq = max(self.sent_seq, sig.seq)
        encoding: str = sig.encoding or getattr(self.outbox, "encoding", None) or "json"
        size = signal_size(sig, encoding)
        self.buffer.append(sig)
        self.sizes.append(size)
        self.buffer_bytes += size
        self._trim_buffer()
        if sig.has_re and sig.re is not None:
            entry = self.replies.get(_id_key(sig.re))
            if entry is not None and entry[3] is None and entry[1] is sig.data:
                entry[3] = size  # a remembered reply is measured as it goes out
                self.replies_bytes += size
                self._trim_replies()
        if self.outbox is not None and not self.outbox.deliver(sig):
            self.outbox = None  # the connection dropped it; the session stays resumable

    def _trim_buffer(self) -> None:
        while self.buffer and (len(self.buffer) > self.buffer_size
                               or self.buffer_bytes > self.buffer_bytes_limit):
            self.buffer.popleft()
            self.buffer_bytes -= self.sizes.popleft()

    def restore_log(self, logged: list[LoggedSignal]) -> None:
        """Take back signals a store logged for this session (ordered by seq), beside
        those already held (another store's), keeping each seq once; the replay
        buffer's bounds apply as to signals sent. Taken newest first, and only as many
        as the bounds keep: a log holds more than a buffer (``outbound_log_size``
        against ``replay_buffer``), and each is decoded and measured to be kept."""
        held: dict[int, Signal | LoggedSignal] = {
            s.seq: s for s in self.buffer if s.seq is not None}
        for row in logged:
            held.setdefault(row[1], row)
        kept: list[tuple[Signal, int]] = []
        total = 0
        for seq in sorted(held, reverse=True):
            if len(kept) == self.buffer_size:
                break
            sig = held[seq]
            if not isinstance(sig, Signal):
                _, _, _, name, data, re = sig
                reply = load_stored(re) if re is not None else None
                sig = Signal(name, load_stored(data), reply[0] if reply else None,
                             reply is not None, seq, encoded={"cbor": data})
            size = signal_size(sig, "json")
            if total + size > self.buffer_bytes_limit:
                break
            kept.append((sig, size))
            total += size
        self.buffer.clear()
        self.sizes.clear()
        for sig, size in reversed(kept):
            self.buffer.append(sig)
            self.sizes.append(size)
        self.buffer_bytes = total
        if held:
            self.skip_to(max(held) + 1)

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
        """Signals after last_seq still held, and whether that is every one sent after
        it (held without a gap: after a restart the buffer is the stores' logs)."""
        held = [s for s in self.buffer if s.seq is not None and s.seq > last_seq]
        first_needed = last_seq + 1
        complete = first_needed > self.sent_seq or (
            bool(held) and held[0].seq == first_needed and held[-1].seq == self.sent_seq
            and len(held) == self.sent_seq - last_seq)
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
        self.replies[key] = [signal, data, durable, None, None]
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

    def runtime_blob(self) -> bytes:
        """What the saver keeps of this session beside the world, as CBOR: its
        counters and its remembered replies to world-changing actions, each
        ``[id kind, id, signal, data]``. Each reply is encoded once: a checkpoint
        saves every session that acted, and its replies (a thousand, by default)
        are mostly those it saved the time before."""
        items = []
        for (kind, key), entry in self.replies.items():
            if entry[2]:
                if entry[4] is None:
                    entry[4] = encode_cbor([kind, key, entry[0], entry[1]])
                items.append(entry[4])
        head = encode_cbor({"next_seq": self.next_seq, "last_active": self.last_active,
                            "actions_applied": self.actions_applied,
                            "signals_sent": self.signals_sent, "replies": []})
        return head[:-1] + encode_array(items)  # the empty list is its last byte

    def restore_runtime(self, saved: dict[str, Any]) -> None:
        """Take back what a store saved, merged with what the session already holds
        (the server's store and each world's keep a copy, of different ages): the
        larger of each figure, the replies it lacks. Raises ValueError if it is not
        what runtime_blob() writes (the caller repairs the session rather than failing)."""
        next_seq = saved.get("next_seq", 1)
        if type(next_seq) is not int or not 1 <= next_seq <= SEQ_LIMIT:
            raise ValueError(f"next_seq {next_seq!r} is out of range")
        self.skip_to(next_seq)
        self.last_active = max(self.last_active, float(saved.get("last_active", 0.0)))
        self.actions_applied = max(self.actions_applied, int(saved.get("actions_applied", 0)))
        self.signals_sent = max(self.signals_sent, int(saved.get("signals_sent", 0)))
        for kind, key, sig, data in saved.get("replies", []):
            self.replies.setdefault((kind, key), [sig, data, True, None, None])
        self.measure_replies()


def _id_key(request_id: Any) -> tuple[str, Any]:
    # "7" and 7 are different ids; keep them apart.
    return (type(request_id).__name__, request_id)


# replies that hand a client its resume token: a store (or its backup) must not be
# enough to take over a session, so the log keeps them without it (a replay after
# a restart, of a reply the client already had, then carries none)
_CARRY_TOKENS = frozenset({"session.opened", "session.resumed"})


class OutboundLog:
    """The outbound log of one store's writer: numbers the signals of a commit and
    encodes them as the rows that ride it; a payload sent to many sessions (a
    broadcast) is one row, each session's seq of it a small one. Signals sent
    without a commit (replies to reads) wait on their session and ride the next
    commit that signals it, whichever store's, or a checkpoint of a store that
    speaks for it (``members``): a session's log then has no gap but, after a kill
    -9, at its end. A checkpoint trims it to ``keep`` signals per session and
    ``age_s`` seconds."""

    def __init__(self, keep: int, age_s: float, next_pos: int = 1,
                 members: Callable[[], Iterable[Session]] = tuple) -> None:
        self.keep = keep
        self.age_s = age_s
        self.next_pos = next_pos
        self.members = members
        self.touched: dict[str, Session] = {}  # sessions logged since the last trim
        self.waiting: dict[str, Session] = {}  # released unlogged signals to, since a write

    def reserve(self, count: int) -> int:
        first = self.next_pos
        self.next_pos += count
        return first

    def rows(self, outputs: list[tuple[Any, Any]]) -> OutboundRows:
        """Number signals to sessions and encode them as log rows, after what waited
        on their sessions unlogged (taken: ``restore`` gives it back if the commit
        fails)."""
        rows = OutboundRows()
        for session, _ in outputs:
            if session.unlogged:
                rows.taken.append((session, session.unlogged))
                self._encode(rows, [(session, sig) for sig in session.unlogged])
                session.unlogged = []
        for session, sig in outputs:
            session.number(sig)
        self._encode(rows, outputs)
        return rows

    def restore(self, rows: OutboundRows) -> None:
        for session, unlogged in rows.taken:
            session.unlogged = unlogged + session.unlogged
            self.waiting[session.id] = session

    def released(self, outputs: list[tuple[Any, Any]]) -> None:
        """Signals that went out without a commit: they wait on their sessions."""
        for session, sig in outputs:
            if sig.seq is not None:  # (None: never delivered)
                session.unlogged.append(sig)
                self.waiting[session.id] = session
                if len(session.unlogged) > self.keep:
                    del session.unlogged[:-self.keep]

    def pending(self, released_here: bool = False) -> OutboundRows:
        """What waits unlogged: for a checkpoint, on the sessions this store speaks
        for; with ``released_here``, on those it released signals to unlogged (the
        saver's small write, which then costs them, not every session)."""
        rows = OutboundRows()
        sessions: Iterable[Session]
        if released_here:
            sessions, self.waiting = list(self.waiting.values()), {}
        else:
            sessions = self.members()
        for session in sessions:
            if session.unlogged:
                rows.taken.append((session, session.unlogged))
                self._encode(rows, [(session, sig) for sig in session.unlogged])
                session.unlogged = []
        return rows

    def _encode(self, rows: OutboundRows, outputs: list[tuple[Any, Any]]) -> None:
        at = time.time()
        positions: dict[tuple[int, str], int] = {}  # (id of data, name) -> its row
        for session, sig in outputs:
            self.touched[session.id] = session
            key = (id(sig.data), sig.signal)
            pos = positions.get(key)
            if pos is None:
                if sig.signal in _CARRY_TOKENS:  # logged without it: the store keeps none
                    data = encode_cbor({k: v for k, v in sig.data.items()
                                        if k != "resume_token"})
                else:
                    cache = sig.encoded
                    if cache is None:
                        cache = sig.encoded = {}
                    data = cache.get("cbor")
                    if data is None:  # encoded once, for the log and for CBOR connections
                        data = cache["cbor"] = encode_cbor(sig.data)
                pos = positions[key] = self.reserve(1)
                rows.data.append((pos, at, sig.signal, data))
            re = b"\x81" + encode_scalar(sig.re) if sig.has_re else None  # [re]
            rows.seqs.append((session.id, sig.seq, pos, re))

    def trim(self) -> LogTrim:
        """For a checkpoint: per session logged here since the last one, or spoken for
        here, the lowest seq to keep; and the oldest time."""
        for session in self.members():
            self.touched.setdefault(session.id, session)
        floors = {sid: s.next_seq - self.keep for sid, s in self.touched.items()
                  if s.next_seq > self.keep}
        self.touched = {}
        return LogTrim(time.time() - self.age_s, floors)


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
