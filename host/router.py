"""The router: which writer applies what a connection sent.

The server's own actions (sessions, the registry of worlds, ``host.ping``) go to
the server's dispatcher; every other action goes to the dispatcher of the world
the session has joined, loading that world first if it is not loaded. It is the
``Submitter`` every transport hands its requests to, and the only part that
knows both the server and its worlds.

A session's signals are numbered as they are released, and each writer releases
its own after its own commit; so before a session's request goes to one writer,
the router waits until no reply to that session's earlier requests is still held
by another. A client's replies then come in the order of its requests, whichever
worlds (or the server) served them. (Broadcasts from others are not waited for:
one world's slow disk never holds a reader of another.)
"""

from __future__ import annotations

from typing import Any

from host.actions import Conflict, Role
from host.dispatcher import Dispatcher
from host.lobby import WORLD_ID
from host.messages import Disconnect, Request
from host.plugins import Registry
from host.sessions import Session, SessionTable
from host.worlds import Worlds

_LOADS_FIRST = frozenset({"world.join", "session.open", "session.resume"})


class Router:
    def __init__(self, registry: Registry, sessions: SessionTable, worlds: Worlds) -> None:
        self.registry = registry
        self.sessions = sessions
        self.worlds = worlds
        self.server_actions = frozenset(registry.actions_in("server"))

    @property
    def _lobby(self) -> Dispatcher:
        return self.worlds.lobby.dispatcher

    @property
    def accepting(self) -> bool:
        return self._lobby.accepting

    def _route(self, item: Request) -> Dispatcher | None:
        """The writer of a request, if known without waiting: None when a world may
        have to be loaded first."""
        action = item.action
        if item.error is None and action in self.server_actions:
            return None if action in _LOADS_FIRST else self._lobby
        conn = item.conn
        session: Session | None = conn.session if conn is not None else None
        if item.error is not None or session is None or action not in self.registry.actions:
            return self._lobby  # the gate answers: unauthenticated, unknown, bad frame
        world = self.worlds.loaded.get(session.world) if session.world is not None else None
        return world.dispatcher if world is not None else None

    def ready(self, item: Request) -> Dispatcher | None:
        """The writer that applies ``item`` as soon as it is put, before the put
        returns; None if it would wait (a world to load, a queue, replies held)."""
        target = self._route(item)
        if target is None or not target.applies_now:
            return None
        session = item.conn.session if item.conn is not None else None
        if session is not None and session.holds and session.held_elsewhere(target.saver):
            return None
        return target

    async def put(self, item: Request | Disconnect) -> None:
        if isinstance(item, Disconnect):
            await self._lobby.put(item)
            return
        target = self._route(item)
        conn = item.conn
        session: Session | None = conn.session if conn is not None else None
        if target is None:
            if item.action in self.server_actions:
                await self._before_server_action(item, session)
                target = self._lobby
            else:
                target = await self._world_of(item, session)  # type: ignore[arg-type]
        if session is not None and session.holds and session.held_elsewhere(target.saver):
            while session.held_elsewhere(target.saver):
                await session.wait_released()
        await target.put(item)

    async def _world_of(self, req: Request, session: Session) -> Dispatcher:
        if session.world is None:
            req.error = Conflict(f"{req.action} acts in a world and this session is in "
                                 f"none: send world.join first")
            return self._lobby
        world = await self.worlds.ensure(session.world)
        if world is None:
            why = self.worlds.failed.get(session.world, "it is archived or gone")
            req.error = Conflict(f"world {session.world!r} cannot be entered: {why}; "
                                 f"send world.join for another")
            return self._lobby
        return world.dispatcher

    async def _before_server_action(self, req: Request, session: Session | None) -> None:
        """Load the world a session is about to enter, so that the (synchronous)
        gate finds it loaded: the one it joins, or the one it opens or resumes into.
        Only for requests the gate could let through, so nobody loads worlds by
        asking for what they may not have."""
        if req.action == "world.join":
            action = self.registry.actions[req.action]
            world_id = req.params.get("world_id") if isinstance(req.params, dict) else None
            if session is None or Role.parse(session.role) < action.role \
                    or not isinstance(world_id, str) or not WORLD_ID.fullmatch(world_id):
                return
            await self.worlds.ensure(world_id)
        elif req.action == "session.open":
            await self.worlds.ensure(self.worlds.default_id())
        else:
            params: Any = req.params
            sid = params.get("session_id") if isinstance(params, dict) else None
            target = self.sessions.get(sid) if isinstance(sid, str) else None
            if target is not None:
                await self.worlds.ensure(target.world)
