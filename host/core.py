"""The core plugin: actions every host has, and the host's own slices.

``host.ping``, ``host.describe``, ``world.snapshot`` and the ``session.*`` actions
clients call;
the internal ``sessions.*`` actions through which the gateway changes the
persisted session records, so that sessions are journaled and replayed like
everything else.
"""

from __future__ import annotations

import secrets
from typing import Annotated, Any

import msgspec

from host.actions import Action, Context, Invalid, NotFound, Role
from host.plugins import hookimpl
from state.codec import encode_json
from state.slices import SliceSpec

PRIVATE_FIELDS = ("token_hash", "credential", "address")  # of a session record


class SnapshotParams(msgspec.Struct, forbid_unknown_fields=True):
    slices: list[str] | None = None


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


class AttachParams(msgspec.Struct, forbid_unknown_fields=True):
    session_id: str
    token_hash: str


class SessionIdParams(msgspec.Struct, forbid_unknown_fields=True):
    session_id: str
    reason: str = "closed"


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


def snapshot(ctx: Context, params: SnapshotParams) -> dict[str, Any]:
    names = params.slices
    if names is not None:
        unknown = [n for n in names if n not in ctx.world.slices]
        if unknown:
            raise NotFound(f"no slice named {unknown[0]!r}",
                           details={"path": "params.slices", "unknown": unknown})
    slices = ctx.world.snapshot(names)
    if "sessions" in slices:  # resume-token hashes, credentials and addresses stay in the host
        slices["sessions"] = {sid: {k: v for k, v in record.items() if k not in PRIVATE_FIELDS}
                              for sid, record in slices["sessions"].items()}
    return {"generation": ctx.host.generation, "slices": slices}


def _sessions(ctx: Context):  # type: ignore[no-untyped-def]
    return ctx.keyed("sessions")


def create(ctx: Context, p: CreateParams) -> dict[str, Any]:
    if p.session_id in _sessions(ctx):
        raise Invalid(f"session {p.session_id!r} already exists")
    _sessions(ctx).put(p.session_id, {
        "id": p.session_id, "name": p.name, "role": p.role, "token_hash": p.token_hash,
        "state": "open", "created_at": ctx.now, "disconnected_at": None,
        "credential": p.credential, "address": p.address,
    })
    return {"session_id": p.session_id}


def attach(ctx: Context, p: AttachParams) -> dict[str, Any]:
    record = _sessions(ctx).edit(p.session_id)
    record.update(state="open", token_hash=p.token_hash, disconnected_at=None)
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


class ReplaceSlicesParams(msgspec.Struct, forbid_unknown_fields=True):
    slices: dict[str, dict[str, Any]]


PROTECTED = ("host", "sessions")


def replace_slices(ctx: Context, p: ReplaceSlicesParams) -> dict[str, Any]:
    """Internal (offline import): replace whole slices from an export, checked first."""
    ready = {}
    for name, entry in p.slices.items():
        where = f"params.slices.{name}"
        if name in PROTECTED or name not in ctx.world.slices:
            raise Invalid(f"slice {name!r} cannot be imported here",
                          details={"path": where, "message": "unknown or protected slice"})
        spec = ctx.world[name].spec
        version, keyed, data = entry.get("version"), entry.get("keyed"), entry.get("data")
        if not isinstance(version, int) or version > spec.version:
            raise Invalid(f"slice {name!r} is version {version}; this host has {spec.version}",
                          details={"path": f"{where}.version", "message": "unsupported version"})
        if keyed is not spec.keyed or (keyed and not isinstance(data, dict)):
            raise Invalid(f"slice {name!r} has the wrong shape",
                          details={"path": f"{where}.data", "message": "wrong shape"})
        if version < spec.version:
            if spec.migrate is None:
                raise Invalid(f"slice {name!r} version {version} cannot be migrated",
                              details={"path": f"{where}.version", "message": "no migration"})
            data = spec.migrate(version, data)
        ready[name] = spec.fill_defaults(data)
    for name, data in ready.items():
        s = ctx.world[name]
        if s.spec.keyed:
            s.replace_all(data)
        else:
            s.set(data)
    return {"replaced": sorted(ready)}


def _world_meta() -> dict[str, Any]:
    return {"world_id": secrets.token_hex(8), "seed": secrets.token_hex(16)}


@hookimpl
def register_actions() -> list[Action]:
    return [
        Action("host.ping", ping, dict[str, Any], Role.viewer, changes_world=False, reply="host.pong",
               description="Echo params as data."),
        Action("host.describe", describe, DescribeParams, Role.viewer, changes_world=False,
               reply="host.described",
               description="Each action's params (JSON Schema), role and whether it "
                           "changes the world."),
        Action("world.snapshot", snapshot, SnapshotParams, Role.viewer, changes_world=False,
               description="The merged world, or the named slices."),
        Action("session.open", open_session, OpenParams, Role.viewer, reply="session.opened",
               gateway=True, description="Open a session; see the protocol."),
        Action("session.resume", resume_session, ResumeParams, Role.viewer,
               reply="session.resumed", gateway=True),
        Action("session.close", close_session, None, Role.viewer, reply="session.closed",
               gateway=True),
        Action("sessions.create", create, CreateParams, Role.admin, internal=True),
        Action("sessions.attach", attach, AttachParams, Role.admin, internal=True),
        Action("sessions.detach", detach, SessionIdParams, Role.admin, internal=True),
        Action("sessions.end", end, SessionIdParams, Role.admin, internal=True),
        Action("world.replace_slices", replace_slices, ReplaceSlicesParams, Role.admin,
               internal=True, reply="world.slices_replaced"),
    ]


@hookimpl
def register_slices() -> list[SliceSpec]:
    return [
        SliceSpec("sessions", dict, version=1, keyed=True,
                  defaults={"disconnected_at": None, "created_at": 0.0, "credential": None,
                            "address": None}),
        SliceSpec("host", _world_meta, version=1),
    ]
