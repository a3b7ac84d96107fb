"""What a plugin declares about an action, the errors a handler raises, and its context."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import IntEnum
from typing import TYPE_CHECKING, Any

from state.slices import KeyedSlice, ValueSlice

if TYPE_CHECKING:
    from host.sessions import Session


class Role(IntEnum):
    """Who may run an action; each role may do everything the ones below it may."""

    viewer = 1
    player = 2
    admin = 3

    @classmethod
    def parse(cls, name: str) -> Role:
        return cls[name]


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


@dataclass
class Emit:
    """A signal a handler asked to send: to the requester, everyone, or one session."""

    signal: str
    data: dict[str, Any]
    to: str | None = None  # session id; None with broadcast=False means the reply
    broadcast: bool = False
    exclude: str | None = None  # a session a broadcast skips (the requester, say)


@dataclass
class Context:
    """What a handler sees: the world's slices, the action's time, a seeded random
    generator, the session that asked (None for internal actions) and emit."""

    world: Any
    now: float
    session: Session | None
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

    def broadcast(self, signal: str, data: dict[str, Any], *, others: bool = False) -> None:
        """Send to every session (``others=True``: all but the requester, who gets the reply)."""
        exclude = self.session.id if others and self.session is not None else None
        self.emitted.append(Emit(signal, data, broadcast=True, exclude=exclude))

    def send(self, session_id: str, signal: str, data: dict[str, Any]) -> None:
        self.emitted.append(Emit(signal, data, to=session_id))
