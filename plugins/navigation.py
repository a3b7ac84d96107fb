"""Navigation: each agent's place in a tree of paths (slice ``navigation``).

Per agent: ``current_path`` and ``stack``, the paths it came from. ``nav.push``
goes to a path and remembers the current one, ``nav.pop`` goes back,
``nav.goto`` replaces the current path, ``nav.reset`` starts over at ``/``.
"""

from __future__ import annotations

from typing import Any

import msgspec

from host.actions import Action, Conflict, Context, Id, Invalid, Role
from host.plugins import hookimpl
from state.slices import SliceSpec

ROOT = "/"


class Settings(msgspec.Struct, forbid_unknown_fields=True):
    max_path_length: int = 1024
    max_depth: int = 64
    max_stack: int = 256
    max_agents: int = 10_000  # agents with a navigation record


class PathParams(msgspec.Struct, forbid_unknown_fields=True):
    agent_id: Id
    path: str  # bounded by max_path_length in normalise


class AgentParams(msgspec.Struct, forbid_unknown_fields=True):
    agent_id: Id


def _invalid(message: str) -> Invalid:
    return Invalid(f"invalid path: {message}", details={"path": "params.path", "message": message})


def normalise(path: str, settings: Settings) -> str:
    """``/a/./b/../c`` -> ``/a/c``; refuses relative paths, escapes above the root,
    control characters, and paths too long or too deep."""
    if len(path) > settings.max_path_length:
        raise _invalid(f"longer than {settings.max_path_length} characters")
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in path):
        raise _invalid("contains control characters")
    if not path.startswith("/"):
        raise _invalid("must be absolute (start with /)")
    parts: list[str] = []
    for part in path.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            if not parts:
                raise _invalid("goes above the root")
            parts.pop()
        else:
            parts.append(part)
    if len(parts) > settings.max_depth:
        raise _invalid(f"deeper than {settings.max_depth} levels")
    return "/" + "/".join(parts)


def _agent_id(agent_id: str) -> str:
    if not agent_id:
        raise Invalid("agent_id must not be empty",
                      details={"path": "params.agent_id", "message": "empty"})
    return agent_id


def _state(ctx: Context, agent_id: str) -> dict[str, Any]:
    record = ctx.keyed("navigation").get(agent_id)
    return record or {"agent_id": agent_id, "current_path": ROOT, "stack": []}


def _changed(ctx: Context, record: dict[str, Any]) -> dict[str, Any]:
    nav = ctx.keyed("navigation")
    if record["agent_id"] not in nav and len(nav.data()) >= ctx.settings.max_agents:
        raise Conflict(f"navigation holds its max_agents ({ctx.settings.max_agents}) agents",
                       details={"budget": "max_agents", "limit": ctx.settings.max_agents})
    nav.put(record["agent_id"], record)
    ctx.broadcast("nav.changed", record, others=True)
    return record


def push(ctx: Context, p: PathParams) -> dict[str, Any]:
    path = normalise(p.path, ctx.settings)
    state = _state(ctx, _agent_id(p.agent_id))
    if len(state["stack"]) >= ctx.settings.max_stack:
        raise Conflict(f"the stack of {p.agent_id!r} is full ({ctx.settings.max_stack} paths)")
    return _changed(ctx, {**state, "stack": [*state["stack"], state["current_path"]],
                          "current_path": path})


def pop(ctx: Context, p: AgentParams) -> dict[str, Any]:
    state = _state(ctx, _agent_id(p.agent_id))
    if not state["stack"]:
        raise Conflict(f"the stack of {p.agent_id!r} is empty")
    return _changed(ctx, {**state, "stack": state["stack"][:-1],
                          "current_path": state["stack"][-1]})


def goto(ctx: Context, p: PathParams) -> dict[str, Any]:
    path = normalise(p.path, ctx.settings)
    state = _state(ctx, _agent_id(p.agent_id))
    return _changed(ctx, {**state, "current_path": path})


def reset(ctx: Context, p: AgentParams) -> dict[str, Any]:
    return _changed(ctx, {"agent_id": _agent_id(p.agent_id), "current_path": ROOT, "stack": []})


def get(ctx: Context, p: AgentParams) -> dict[str, Any]:
    return _state(ctx, _agent_id(p.agent_id))


@hookimpl
def register_actions() -> list[Action]:
    return [
        Action("nav.push", push, PathParams, Role.player, reply="nav.changed"),
        Action("nav.pop", pop, AgentParams, Role.player, reply="nav.changed"),
        Action("nav.goto", goto, PathParams, Role.player, reply="nav.changed"),
        Action("nav.reset", reset, AgentParams, Role.player, reply="nav.changed"),
        Action("nav.get", get, AgentParams, Role.viewer, changes_world=False, reply="nav.state"),
    ]


@hookimpl
def register_slices() -> list[SliceSpec]:
    return [SliceSpec("navigation", dict, version=1, keyed=True,
                      defaults={"current_path": ROOT, "stack": []})]


@hookimpl
def agent_removed(ctx: Context, agent_id: str) -> None:
    nav = ctx.keyed("navigation")
    if agent_id in nav:
        nav.delete(agent_id)
