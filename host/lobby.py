"""The server's own plugin: what every server has before and around its worlds.

``host.ping`` and ``host.describe``; the ``session.*`` and ``world.*`` actions,
served by the session gate (``host/gate.py``); and the ``sessions`` and
``worlds`` slices with the internal ``sessions.*`` and ``worlds.*`` actions
through which the gate changes them, so that sessions and the registry of worlds
are journaled and replayed like everything else, in the server's own store.
"""

from __future__ import annotations

import re
from typing import Annotated, Any

import msgspec

from host.actions import Action, Context, Invalid, NotFound, Role
from host.hookspecs import hookimpl
from host.topics import Topic
from state.codec import encode_json
from state.slices import SliceSpec

scope = "server"

PRIVATE_FIELDS = ("token_hash", "previous_hash", "credential", "address")  # of a session record
DEFAULT_WORLD = "main"  # the world of a fresh server, and of a store from before worlds
WORLD_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")


RESERVED_WORLD_IDS = frozenset({"server"})  # the id the server's own plugins see


def check_world_id(world_id: Any, path: str = "params.world_id") -> str:
    """A world id becomes a file name: 1 to 64 letters, digits, ``-`` and ``_``."""
    if not isinstance(world_id, str) or WORLD_ID.fullmatch(world_id) is None:
        raise Invalid("a world id is 1 to 64 letters, digits, '-' and '_'",
                      details={"path": path, "message": "bad world id"})
    if world_id in RESERVED_WORLD_IDS:
        raise Invalid(f"world id {world_id!r} is reserved",
                      details={"path": path, "message": "reserved world id"})
    return world_id


class OpenParams(msgspec.Struct, forbid_unknown_fields=True):
    name: str
    token: str | None = None


class ResumeParams(msgspec.Struct, forbid_unknown_fields=True):
    session_id: str
    resume_token: str
    last_seq: int = 0


class CreateParams(msgspec.Struct, forbid_unknown_fields=True):
    session_id: str
    name: str
    role: str
    token_hash: str
    credential: str | None = None  # fingerprint of the token that granted the role
    address: str | None = None  # where it was opened from (per-address limit)
    world: str | None = DEFAULT_WORLD  # the world it is in from the start


class AttachParams(msgspec.Struct, forbid_unknown_fields=True):
    session_id: str
    token_hash: str
    # the token the client proved it holds, still good until it presents the new one
    # (None: no other; and what journals from before the grace replay as)
    previous_hash: str | None = None


class SessionIdParams(msgspec.Struct, forbid_unknown_fields=True):
    session_id: str
    reason: str = "closed"


class WorldParams(msgspec.Struct, forbid_unknown_fields=True):
    world_id: Annotated[str, msgspec.Meta(max_length=256)]


class CreateWorldParams(msgspec.Struct, forbid_unknown_fields=True):
    world_id: Annotated[str, msgspec.Meta(max_length=256)]
    name: Annotated[str, msgspec.Meta(max_length=256)] | None = None


class JoinParams(msgspec.Struct, forbid_unknown_fields=True):
    session_id: str
    world_id: str | None


class SubscribeParams(msgspec.Struct, forbid_unknown_fields=True):
    session_id: str
    topics: list[str] | None  # None: never subscribed (gets everything)


# bounded here only against abuse of the frame; the limits are [sessions] max_topics
# and max_topic_length, checked by the gate with errors naming them
class TopicsParams(msgspec.Struct, forbid_unknown_fields=True):
    topics: Annotated[list[Any], msgspec.Meta(max_length=10_000)]


class RegisterParams(msgspec.Struct, forbid_unknown_fields=True):
    world_id: str
    name: str
    path: str


class WorldStateParams(msgspec.Struct, forbid_unknown_fields=True):
    world_id: str
    loaded: bool | None = None
    running: list[str] | None = None
    last_active: float | None = None


class ArchiveParams(msgspec.Struct, forbid_unknown_fields=True):
    world_id: str
    archived_to: str


def ping(ctx: Context, params: dict[str, Any]) -> dict[str, Any]:
    limit = ctx.host.config.host.limits.max_ping_bytes
    if len(encode_json(params)) > limit:  # an echo is not a way to park data in the host
        raise Invalid(f"host.ping echoes at most max_ping_bytes ({limit} bytes) of params",
                      details={"path": "params", "message": "too large"})
    return params


ActionName = Annotated[str, msgspec.Meta(max_length=128)]  # as the envelope bounds it


class DescribeParams(msgspec.Struct, forbid_unknown_fields=True):
    # bounded: unknown names are echoed back in the not_found details
    actions: Annotated[list[ActionName], msgspec.Meta(max_length=1000)] | None = None


NO_PARAMS_SCHEMA: dict[str, Any] = {"type": "object", "maxProperties": 0}


def params_schema(params: Any) -> dict[str, Any]:
    """The JSON Schema of an action's params type, as msgspec checks them."""
    if params is None:
        return NO_PARAMS_SCHEMA
    try:
        return msgspec.json.schema(params)
    except TypeError:  # a type msgspec converts but cannot describe: say only "an object"
        return {"type": "object"}


def describe(ctx: Context, p: DescribeParams) -> dict[str, Any]:
    """Every action a client may call (or the named ones): params as JSON Schema,
    role, whether it changes the world, its reply signal and owning plugin. Built
    from the declarations the dispatcher checks against, so it cannot drift."""
    declared: dict[str, tuple[str, Action]] = {}
    for plugin, actions in ctx.host.collect("register_actions"):
        for action in actions:
            if not action.internal:
                declared[action.name] = (plugin, action)
    names = sorted(declared) if p.actions is None else p.actions
    unknown = [n for n in names if n not in declared]
    if unknown:
        raise NotFound(f"no action named {unknown[0]!r}",
                       details={"path": "params.actions", "unknown": unknown})
    out = []
    for name in names:
        plugin, action = declared[name]
        out.append({"name": name, "plugin": plugin, "role": action.role.name,
                    "changes_world": action.changes_world, "reply": action.reply_signal,
                    "description": action.description, "params": params_schema(action.params)})
    return {"actions": out}


def _sessions(ctx: Context):  # type: ignore[no-untyped-def]
    return ctx.keyed("sessions")


def create(ctx: Context, p: CreateParams) -> dict[str, Any]:
    if p.session_id in _sessions(ctx):
        raise Invalid(f"session {p.session_id!r} already exists")
    _sessions(ctx).put(p.session_id, {
        "id": p.session_id, "name": p.name, "role": p.role, "token_hash": p.token_hash,
        "state": "open", "created_at": ctx.now, "disconnected_at": None,
        "credential": p.credential, "address": p.address, "world": p.world,
    })
    return {"session_id": p.session_id}


def attach(ctx: Context, p: AttachParams) -> dict[str, Any]:
    record = _sessions(ctx).edit(p.session_id)
    record.update(state="open", token_hash=p.token_hash, previous_hash=p.previous_hash,
                  disconnected_at=None)
    return {"session_id": p.session_id}


def detach(ctx: Context, p: SessionIdParams) -> dict[str, Any]:
    if p.session_id not in _sessions(ctx):
        raise NotFound(f"no session {p.session_id!r}")
    record = _sessions(ctx).edit(p.session_id)
    record.update(state="disconnected", disconnected_at=ctx.now)
    return {"session_id": p.session_id}


def end_session(ctx: Context, session_id: str, reason: str) -> None:
    """End a session for good from inside a handler (kick, expiry, close).

    The host drops it once the action commits: its connection is told
    (``session.ended``) and closed, unless the client closed it itself.
    """
    if session_id not in _sessions(ctx):
        raise NotFound(f"no session {session_id!r}")
    _sessions(ctx).delete(session_id)
    ctx.ended.append((session_id, reason))


def end(ctx: Context, p: SessionIdParams) -> dict[str, Any]:
    end_session(ctx, p.session_id, p.reason)
    return {"session_id": p.session_id, "reason": p.reason}


def open_session(gateway: Any, req: Any, params: OpenParams) -> Any:
    return gateway.open(req, params)


def resume_session(gateway: Any, req: Any, params: ResumeParams) -> Any:
    return gateway.resume(req, params)


def close_session(gateway: Any, req: Any, params: None) -> Any:
    return gateway.close(req)


def join(ctx: Context, p: JoinParams) -> dict[str, Any]:
    _sessions(ctx).edit(p.session_id)["world"] = p.world_id
    return {"session_id": p.session_id, "world_id": p.world_id}


def subscribe(ctx: Context, p: SubscribeParams) -> dict[str, Any]:
    _sessions(ctx).edit(p.session_id)["topics"] = p.topics
    return {"session_id": p.session_id, "topics": p.topics}


def register_world(ctx: Context, p: RegisterParams) -> dict[str, Any]:
    ctx.keyed("worlds").put(p.world_id, {
        "id": p.world_id, "name": p.name, "path": p.path, "created_at": ctx.now,
        "last_active": None, "loaded": False, "running": [], "archived_to": None})
    return {"world_id": p.world_id, "name": p.name}


def world_state(ctx: Context, p: WorldStateParams) -> dict[str, Any]:
    record = ctx.keyed("worlds").edit(p.world_id)
    for key in ("loaded", "running", "last_active"):
        value = getattr(p, key)
        if value is not None:
            record[key] = value
    return {"world_id": p.world_id}


def archive_world(ctx: Context, p: ArchiveParams) -> dict[str, Any]:
    ctx.keyed("worlds").edit(p.world_id).update(archived_to=p.archived_to, loaded=False,
                                                 running=[])
    for sid, record in ctx.keyed("sessions").items():
        if record.get("world") == p.world_id:
            _sessions(ctx).edit(sid)["world"] = None
    return {"world_id": p.world_id, "archived_to": p.archived_to}


def _gate(name: str) -> Any:
    """A handler the session gate serves itself (it needs the connection)."""
    def handler(gate: Any, req: Any, params: Any) -> Any:
        return getattr(gate, name)(req, params)
    handler.__name__ = name
    return handler


@hookimpl
def register_actions() -> list[Action]:
    return [
        Action("host.ping", ping, dict[str, Any], Role.viewer, changes_world=False, reply="host.pong",
               description="Echo params as data."),
        Action("host.describe", describe, DescribeParams, Role.viewer, changes_world=False,
               reply="host.described",
               description="Each action's params (JSON Schema), role and whether it "
                           "changes the world."),
        Action("session.open", _gate("open"), OpenParams, Role.viewer, reply="session.opened",
               gateway=True, description="Open a session; see the protocol."),
        Action("session.resume", _gate("resume"), ResumeParams, Role.viewer,
               reply="session.resumed", gateway=True),
        Action("session.close", _gate("close"), None, Role.viewer, reply="session.closed",
               gateway=True),
        Action("world.list", _gate("list_worlds"), None, Role.viewer, reply="world.list",
               gateway=True, changes_world=False,
               description="Every world: id, name, phase, sessions; and the default."),
        Action("world.create", _gate("create_world"), CreateWorldParams, Role.admin,
               reply="world.created", gateway=True, description="Create a world."),
        Action("world.archive", _gate("archive_world"), WorldParams, Role.admin,
               reply="world.archived", gateway=True,
               description="Unload a world and move its store aside (never deleted)."),
        Action("world.join", _gate("join"), WorldParams, Role.viewer, reply="world.joined",
               gateway=True, description="Join a world: world actions apply to it."),
        Action("world.leave", _gate("leave"), None, Role.viewer, reply="world.left",
               gateway=True, description="Leave the joined world."),
        Action("world.subscribe", _gate("subscribe"), TopicsParams, Role.viewer,
               reply="world.subscribed", gateway=True,
               description="Add topics to what this session watches: from then on it gets "
                           "the signals of its topics only (and untopiced ones)."),
        Action("world.unsubscribe", _gate("unsubscribe"), TopicsParams, Role.viewer,
               reply="world.unsubscribed", gateway=True,
               description="Remove topics from what this session watches."),
        Action("sessions.create", create, CreateParams, Role.admin, internal=True),
        Action("sessions.attach", attach, AttachParams, Role.admin, internal=True),
        Action("sessions.detach", detach, SessionIdParams, Role.admin, internal=True),
        Action("sessions.end", end, SessionIdParams, Role.admin, internal=True),
        Action("sessions.join", join, JoinParams, Role.admin, internal=True),
        Action("sessions.subscribe", subscribe, SubscribeParams, Role.admin, internal=True),
        Action("worlds.register", register_world, RegisterParams, Role.admin, internal=True),
        Action("worlds.state", world_state, WorldStateParams, Role.admin, internal=True),
        Action("worlds.archive", archive_world, ArchiveParams, Role.admin, internal=True),
    ]


@hookimpl
def register_topics() -> list[Topic]:
    return [Topic("sessions", description="sessions ending (session.expired)")]


@hookimpl
def register_slices() -> list[SliceSpec]:
    return [
        SliceSpec("sessions", dict, version=1, keyed=True,
                  defaults={"disconnected_at": None, "created_at": 0.0, "credential": None,
                            "address": None, "world": DEFAULT_WORLD, "topics": None,
                            "previous_hash": None}),
        SliceSpec("worlds", dict, version=1, keyed=True,
                  defaults={"last_active": None, "loaded": False, "running": [],
                            "archived_to": None}),
    ]
