"""What a plugin declares about an action, the errors a handler raises, and its context."""

from __future__ import annotations

import operator
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Annotated, Any, Protocol

import msgspec

from host.messages import Emit as Emit
from state.slices import KeyedSlice, ValueSlice



class SessionView(Protocol):
    """The session that asked, as a handler sees it (a ``host.sessions.Session``)."""

    @property
    def id(self) -> str: ...

    @property
    def name(self) -> str: ...

    @property
    def role(self) -> str: ...


class Role(IntEnum):
    """Who may run an action; each role may do everything the ones below it may."""

    viewer = 1
    player = 2
    admin = 3

    @classmethod
    def parse(cls, name: str) -> Role:
        return _ROLES[name]  # (KeyError for a name that is no role, as cls[name])


_ROLES = {role.name: role for role in Role}  # looked up for every request: not Enum's []

Handler = Callable[["Context", Any], "dict[str, Any] | None"]


@dataclass(frozen=True)
class Action:
    """One action a plugin serves.

    ``params`` is a msgspec Struct type (checked before the handler runs) or
    None for actions without params. ``changes_world`` actions are journaled
    and answered only once durable; read-only ones may not write slices.
    ``internal`` actions are submitted by the host or background tasks only.
    """

    name: str
    handler: Handler | Callable[..., Any]  # gateway actions take (gateway, request, params)
    params: Any = None  # a msgspec Struct type (or any type msgspec.convert takes)
    role: Role = Role.player
    changes_world: bool = True
    reply: str | None = None
    internal: bool = False
    gateway: bool = False  # host-only: handler(gateway, request, params) -> Outcome
    description: str = ""

    @property
    def reply_signal(self) -> str:
        return self.reply or self.name


class ActionError(Exception):
    """A request refused with a protocol error code; the world stays unchanged."""

    code = "bad_request"

    def __init__(self, message: str, details: Any = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details
        if code is not None:
            self.code = code


class BadRequest(ActionError):
    code = "bad_request"


class UnknownAction(ActionError):
    code = "unknown_action"


class Unauthenticated(ActionError):
    code = "unauthenticated"


class Forbidden(ActionError):
    code = "forbidden"


class Invalid(ActionError):
    """``validation_error``: details should name the path of the bad field."""

    code = "validation_error"


class Conflict(ActionError):
    code = "conflict"


class NotFound(ActionError):
    code = "not_found"


class RateLimited(ActionError):
    code = "rate_limited"


@dataclass(slots=True)  # built for every action
class Context:
    """What a handler sees: the world's slices, the action's time, a seeded random
    generator, the session that asked (None for internal actions) and emit."""

    world: Any
    now: float
    session: SessionView | None
    settings: Any
    seed: str
    host: Any
    emitted: list[Emit] = field(default_factory=list)
    ended: list[tuple[str, str]] = field(default_factory=list)  # sessions ended: (id, reason)
    memo: dict[str, Any] = field(default_factory=dict)
    """Plain data journaled with the action and handed back when it is replayed, so a
    handler can skip work whose result the world already determines (a route
    search). The handler must change the world the same with or without it."""
    _random: random.Random | None = None

    def slice(self, name: str) -> KeyedSlice | ValueSlice:
        return self.world[name]

    def keyed(self, name: str) -> KeyedSlice:
        s = self.world[name]
        assert isinstance(s, KeyedSlice), f"slice {name!r} is not keyed"
        return s

    def value(self, name: str) -> ValueSlice:
        s = self.world[name]
        assert isinstance(s, ValueSlice), f"slice {name!r} is keyed"
        return s

    @property
    def random(self) -> random.Random:
        """Deterministic per action: replay gives the same numbers."""
        if self._random is None:
            self._random = random.Random(self.seed)
        return self._random

    def broadcast(self, signal: str, data: dict[str, Any], *, others: bool = False,
                  topic: str | None = None, participants: tuple[str, ...] = ()) -> None:
        """Send to every session of the world (``others=True``: all but the requester,
        who gets the reply). With a ``topic`` (one the plugin declared in
        ``register_topics``), only to the sessions that subscribed to it, those that
        never subscribed to anything, and ``participants`` (session ids)."""
        exclude = self.session.id if others and self.session is not None else None
        self.emitted.append(Emit(signal, data, broadcast=True, exclude=exclude, topic=topic,
                                 participants=participants))

    def send(self, session_id: str, signal: str, data: dict[str, Any]) -> None:
        self.emitted.append(Emit(signal, data, to=session_id))


# --- bounds on what a client may store ------------------------------------------------

MAX_ID_LENGTH = 256
"""The longest id (of a node, edge, agent, package, process...) a client may choose."""

Id = Annotated[str, msgspec.Meta(max_length=MAX_ID_LENGTH)]
"""A client-chosen id in a params Struct: a longer one is a ``validation_error``
whose ``details.path`` names the field, refused before the handler runs."""


def bounded(value: Any, path: str, limit: int = MAX_ID_LENGTH) -> Any:
    """Refuse a string longer than ``limit`` characters (for params checked by hand,
    not through a Struct), naming its path; returns the value."""
    if isinstance(value, str) and len(value) > limit:
        raise Invalid(f"{path} is {len(value)} characters; at most {limit}",
                      details={"path": path, "message": f"longer than {limit} characters"})
    return value


def encoded_size(value: Any) -> int:
    """Bytes of ``value`` as JSON: the measure of every size budget."""
    return len(msgspec.json.encode(value))


def resized(old: Any, old_size: int, new: Any) -> int:
    """``encoded_size(new)``, knowing ``old`` and its size, where ``new`` was made
    from ``old`` the way records change (never in place: new containers around
    the old values they keep, lists grown at the end): only what is not shared
    is encoded, so a change costs what it adds, not what the record holds."""
    return old_size + _size_change(old, new)


def _size_change(old: Any, new: Any) -> int:
    if old is new:
        return 0
    if type(old) is dict and type(new) is dict:
        change = kept = 0
        for key, value in new.items():
            if key in old:
                kept += 1
                change += _size_change(old[key], value)
            else:
                change += _item_size(key, value)
        if kept < len(old):
            change -= sum(_item_size(key, value) for key, value in old.items() if key not in new)
        return change + _commas(len(old), len(new))
    if type(old) is list and type(new) is list and len(new) >= len(old) and \
            all(map(operator.is_, old, new)):  # grown at the end
        added = new[len(old):]
        return sum(map(encoded_size, added)) + len(added) + _commas(len(old), len(new))
    return encoded_size(new) - encoded_size(old)


def _item_size(key: Any, value: Any) -> int:
    """``"key":value`` and its comma, as the object holding it is encoded."""
    return encoded_size({key: value}) - 1


def _commas(before: int, after: int) -> int:
    """What the separators between items change by, counting one per item added or
    removed as the callers do: a container of n items has n - 1."""
    return max(0, after - 1) - max(0, before - 1) - (after - before)


class Usage:
    """Counters of one keyed slice as committed (records of each kind, bytes), kept
    for the host's run so that a budget check costs what an action writes rather than
    the slice's size.

    Counted from the records the first time they are needed; after that, a handler
    that changes the slice ``propose``s the counters its change leads to, with its
    reply, and ``applied`` adopts them once that very action has committed. Any
    other change to the slice (an action that proposed nothing, a replayed import)
    makes them be counted again next time.
    """

    def __init__(self, count: Callable[[Mapping[str, Any]], dict[str, int]]) -> None:
        self._count = count
        self._committed: dict[str, int] | None = None
        self._pending: tuple[Any, dict[str, int]] | None = None

    def current(self, records: Mapping[str, Any]) -> dict[str, int]:
        """The committed counters (``records`` are the slice's committed records)."""
        if self._committed is None:
            self._committed = self._count(records)
        return dict(self._committed)

    def propose(self, reply: dict[str, Any], counters: dict[str, int]) -> None:
        self._pending = (reply, counters)

    def applied(self, reply: Any, changed: bool) -> None:
        """From ``action_applied``: ``changed`` says whether the action changed the slice."""
        pending, self._pending = self._pending, None
        if changed:
            self._committed = pending[1] if pending is not None and pending[0] is reply else None
