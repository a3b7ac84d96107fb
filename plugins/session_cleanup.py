"""Session housekeeping: a cap on sessions, idle timeouts, expiry sweeps, and the
admin's view of who is connected.

The sweep runs as a background task that submits ``sessions.sweep`` with the ids
it found, so expiry is journaled and replays the same.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import msgspec
import trio

from host.actions import Action, ActionError, Conflict, Context, NotFound, Role
from host.api import HostAPI
from host.lobby import end_session
from host.plugins import hookimpl

scope = "server"  # sessions belong to the server, not to one world
RECENT = 15


class Settings(msgspec.Struct, forbid_unknown_fields=True):
    max_sessions: int = 100
    session_timeout_s: float = 3600.0
    sweep_interval_s: float = 300.0


class Expired(msgspec.Struct, forbid_unknown_fields=True):
    session_id: str
    reason: str


class SweepParams(msgspec.Struct, forbid_unknown_fields=True):
    expired: list[Expired]


class KickParams(msgspec.Struct, forbid_unknown_fields=True):
    session_id: str


def _end_one(ctx: Context, session_id: str, reason: str) -> dict[str, Any]:
    record = ctx.keyed("sessions")[session_id]
    end_session(ctx, session_id, reason)
    data = {"session_id": session_id, "name": record["name"], "reason": reason}
    ctx.broadcast("session.expired", data, topic="sessions")
    return data


def sweep(ctx: Context, p: SweepParams) -> dict[str, Any]:
    ended = [_end_one(ctx, e.session_id, e.reason) for e in p.expired
             if e.session_id in ctx.keyed("sessions")]
    return {"ended": ended}


def kick(ctx: Context, p: KickParams) -> dict[str, Any]:
    if p.session_id not in ctx.keyed("sessions"):
        raise NotFound(f"no session {p.session_id!r}")
    if ctx.session is not None and ctx.session.id == p.session_id:
        raise Conflict("a session cannot kick itself; use session.close")
    return _end_one(ctx, p.session_id, "kicked")


def stats(ctx: Context, p: None) -> dict[str, Any]:
    sessions = ctx.host.sessions()
    connected = sum(1 for s in sessions if s["connected"])
    return {"active": connected, "disconnected": len(sessions) - connected,
            "total": len(sessions),
            "sessions": sorted(sessions, key=lambda s: s["last_active"], reverse=True)}


def recent(host: HostAPI, limit: int = RECENT, with_ids: bool = False) -> list[dict[str, Any]]:
    """The most recently active sessions: name, role, last activity, connected."""
    keys = ("name", "role", "last_active", "connected") + (("id",) if with_ids else ())
    ordered = sorted(host.sessions(), key=lambda s: s["last_active"], reverse=True)[:limit]
    return [{k: s[k] for k in keys} for s in ordered]


def list_(ctx: Context, p: None) -> dict[str, Any]:
    admin = ctx.session is not None and ctx.session.role == "admin"
    return {"sessions": recent(ctx.host, with_ids=admin)}


def due(host: HostAPI, settings: Settings) -> list[dict[str, str]]:
    """Sessions idle past the timeout, or disconnected past the resume window."""
    now = host.now()
    ttl = host.config.sessions.resume_ttl_s
    out = []
    for s in host.sessions():
        if now - s["last_active"] > settings.session_timeout_s:
            out.append({"session_id": s["id"], "reason": "timeout"})
        elif not s["connected"] and s["disconnected_at"] is not None \
                and now - s["disconnected_at"] > ttl:
            out.append({"session_id": s["id"], "reason": "expired"})
    return out


async def sweeper(host: HostAPI) -> None:
    settings: Settings = host.settings("session_cleanup") or Settings()
    while True:
        await trio.sleep(settings.sweep_interval_s)
        expired = due(host, settings)
        if expired:
            try:
                await host.submit("sessions.sweep", {"expired": expired})
            except ActionError:
                pass


@hookimpl
def register_actions() -> list[Action]:
    return [
        Action("sessions.sweep", sweep, SweepParams, Role.admin, internal=True,
               reply="sessions.swept"),
        Action("sessions.kick", kick, KickParams, Role.admin, reply="sessions.kicked"),
        Action("sessions.stats", stats, None, Role.admin, changes_world=False,
               reply="sessions.stats"),
        Action("sessions.list", list_, None, Role.viewer, changes_world=False,
               reply="sessions.list"),
    ]


@hookimpl
def session_limit(host: HostAPI) -> ActionError | None:
    settings: Settings = host.settings("session_cleanup") or Settings()
    if len(host.read("sessions")) >= settings.max_sessions:
        return Conflict(f"server full: {settings.max_sessions} sessions are open")
    return None


@hookimpl
def background_tasks(host: HostAPI) -> list[Callable[[], Any]]:
    return [lambda: sweeper(host)]
