"""The server: the process around the worlds. It loads the plugins, builds each
part with the collaborators it uses (the only module that wires parts together),
opens its own store and the worlds, listens, and shuts everything down in order.

    transport --Request--> router --> the server's dispatcher (sessions, worlds)
                                  \\-> a world's dispatcher (everything else)
    dispatcher --Effects--> saver --(commit)--> Session.deliver --> Peer
"""

from __future__ import annotations

import gc
import logging
import socket
import time
from functools import partial
from typing import Any

import trio
import trio_websocket

from host import http, plugins, websockets_channel
from host.actions import ActionError
from host.config import Config
from host.gate import SessionGate
from host.lines import serve_tcp
from host.messages import Effects
from host.router import Router
from host.sessions import SessionTable, State
from host.sync import ClientView
from host.transport import Transport, stream_address
from host.world import StartupError, World, settle_heap
from host.worlds import Worlds

log = logging.getLogger("worldhost")

__all__ = ["Host", "Server", "StartupError"]


class Server:
    """The process: config, plugins, listeners and transport, the session gate and
    table, the router, and the directory of worlds. ``run`` is its whole life."""

    def __init__(self, config: Config, extra_plugins: list[Any] | None = None,
                 entry_points: bool = True, db: str | None = None,
                 threads: bool = True) -> None:
        self.config = config
        self.db_path = db if db is not None else config.host.db
        try:
            self.registry = plugins.load(config, extra_plugins, entry_points)
        except plugins.PluginError as exc:
            raise StartupError(str(exc)) from exc
        sc = config.sessions
        self.sessions = SessionTable(sc.replay_buffer, sc.remembered_replies,
                                     sc.replay_buffer_bytes, sc.remembered_replies_bytes)
        # worker threads (the stores' writers, big decodes): a mock clock wants none,
        # since it counts a task waiting for a thread as idle and jumps ahead
        self.threads = threads
        self._wall0 = time.time()
        self._trio0 = 0.0
        self.gate = SessionGate(config, self.registry, self.sessions, self.clock)
        self.worlds = Worlds(config, self.registry, self.sessions, self.gate, db=self.db_path,
                             clock=self.clock, threads=threads, on_changed=self._changed,
                             resume=self._resume)
        self.gate.worlds = self.worlds
        self.view = ClientView(config, self.registry, self.worlds)
        self.gate.view = self.view
        self.router = Router(self.registry, self.sessions, self.worlds)
        self.transport = Transport(config, submit=self.router, hello=self.view.server_info,
                                   threads=threads)
        self.port: int | None = None
        self.tcp_port: int | None = None  # [transports.tcp], when enabled
        self.listen_host = config.host.bind
        self._nursery: trio.Nursery | None = None
        self._stopping = trio.Event()
        self.stopped = trio.Event()
        self.started = False
        self.crashed = False
        self.task_listeners: list[Any] = []  # each world's plugins' task failures go here

    # time ------------------------------------------------------------------
    def clock(self) -> float:
        """Seconds since the epoch; follows trio's clock, so a mock clock moves it."""
        return self._wall0 + (trio.current_time() - self._trio0)

    # the worlds --------------------------------------------------------------
    @property
    def lobby(self) -> World:
        """The server's own state: sessions and the registry of worlds."""
        return self.worlds.lobby

    def world(self, world_id: str | None = None) -> World:
        """A loaded world: the named one, else the default one."""
        world_id = world_id if world_id is not None else self.worlds.default_id()
        world = self.worlds.loaded.get(world_id) if world_id is not None else None
        if world is None:
            raise LookupError(f"world {world_id!r} is not loaded")
        return world

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    def _changed(self, world: World, effects: Effects, changed: list[str]) -> None:
        if world.scope == "world":
            self.view.after_change(world, effects, changed)

    async def _resume(self, world: World) -> None:
        """Once a world's writer is up and before its plugins start: sessions whose
        stored runtime is damaged end (journaled). For the server's own state, also
        sessions whose credential no longer grants their role, and the sessions that
        were connected are now disconnected."""
        for task_listener in self.task_listeners:
            world.api.task_listeners.append(task_listener)
        gate = self.gate
        records = self.lobby.slices["sessions"].data()
        for sid, problem in world.damaged.items():
            log.error("session %s: stored runtime is damaged (%s); ending the session", sid,
                      problem)
            if sid in records:
                gate.release(gate.end(sid, "repaired"))
            else:
                self.sessions.ended.append(sid)  # an orphan row: the checkpoint drops it
        if world.damaged:
            world.recovered = {**(world.recovered or {}),
                               "sessions_repaired": sorted(world.damaged)}
        if world.scope != "server":
            self.view.remember_summary(world)
            return
        for sid, record in list(records.items()):
            role = gate.current_role(record.get("credential"))
            if role != record["role"]:
                log.warning("session %s (%s): the credential that made it %s %s; ending it",
                            sid, record["name"], record["role"],
                            "is gone" if role is None else f"now grants {role}")
                gate.release(gate.end(sid, "revoked"))
        for s in list(self.sessions):
            if s.state == State.OPEN:
                gate.release(gate.apply_internal("sessions.detach", {"session_id": s.id}))

    # life ----------------------------------------------------------------------
    async def run(self, *, listen: bool = True, run_plugins: bool = True,
                  task_status: trio.TaskStatus[Server] = trio.TASK_STATUS_IGNORED) -> None:
        """Open, serve until stopped, then shut down cleanly (or vanish, if crashed).

        ``run_plugins=False`` (offline tools) skips startup hooks and background tasks.
        """
        self._wall0, self._trio0 = time.time(), trio.current_time()  # the clock's origin
        self.worlds.run_plugins = run_plugins
        lobby = self.lobby
        try:
            await self.worlds.open_lobby()
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                await nursery.start(partial(lobby.run, run_plugins=run_plugins,
                                            resume=self._resume))
                async with trio.open_nursery() as worlds_nursery:
                    await self.worlds.start(worlds_nursery)
                    settle_heap()
                    if listen:
                        await self._listen(nursery)
                    self.started = True
                    task_status.started(self)
                    await self._stopping.wait()
                    if not self.crashed:
                        await self._shutdown()
                    worlds_nursery.cancel_scope.cancel()
                if not self.crashed:
                    lobby.stop()
                    await lobby.stopped.wait()
                nursery.cancel_scope.cancel()
        except ActionError as exc:
            raise StartupError(f"the server could not start: {exc.message}") from exc
        finally:
            gc.unfreeze()  # what this server froze can be collected again
            self._nursery = None
            lobby.release()
            for world in list(self.worlds.loaded.values()):
                world.release()
            self.stopped.set()

    async def _listen(self, nursery: trio.Nursery) -> None:
        cfg = self.config.host
        listeners = await trio.open_tcp_listeners(cfg.port, host=cfg.bind)
        for listener in listeners:
            # Accepted sockets inherit this: a client that stops reading fills its
            # buffers within seconds, so its outbox lag shows and it is dropped.
            listener.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF,
                                       cfg.limits.socket_send_buffer)
        started = await nursery.start(partial(
            trio.serve_listeners, self._serve_stream, listeners, handler_nursery=nursery))
        self.port = started[0].socket.getsockname()[1]
        self.listen_host = cfg.bind
        if self.config.transports.tcp.enabled:
            self.tcp_port = await serve_tcp(nursery, self.transport, self.config)

    def accept_stream(self, stream: trio.abc.Stream) -> None:
        """Serve one connection over any trio stream (in-memory in tests)."""
        if self._nursery is None or self._stopping.is_set():
            raise ConnectionRefusedError("the server is not running")
        self._nursery.start_soon(self._serve_stream, stream)

    async def _serve_stream(self, stream: trio.abc.Stream) -> None:
        """One connection, from TCP or in memory: handshake, then the transport. The
        stream is ours to close, so a connection cut off mid-frame is closed without
        a WebSocket close frame (which the client would read as frame data)."""
        assert self._nursery is not None
        limits = self.config.host.limits
        slot = self.transport.admit(stream_address(stream))
        try:
            if slot is None:
                return  # every connection has a session: no room
            with slot.scope:  # cancelled to close it when room is needed
                request = None
                upgrade: bytes | None = None
                head = None
                # a socket that never completes its handshake is closed like one that
                # never opens a session
                handshake_by = trio.current_time() + self.config.sessions.auth_timeout_s
                with trio.move_on_at(handshake_by):
                    with trio.move_on_after(limits.http_timeout_s):
                        head = await http.read_head(stream, limits.max_http_header_bytes)
                    if not head:  # too slow to send a request's headers, or gone
                        return
                    # HTTP (pages, health, metrics, the HTTP API), and any request over
                    # the header bound: a handshake too, which wsproto would take up to
                    # 16 KiB. Served past the handshake's timeout: an SSE stream lasts.
                    if http.is_websocket(head) and \
                            not http.too_large(head, limits.max_http_header_bytes):
                        if self.config.host.websocket == "websockets":
                            upgrade = head  # its handshake is answered from the head
                        else:
                            http.unread(stream, head)
                            request = await trio_websocket.wrap_server_stream(
                                self._nursery, stream, message_queue_size=8,
                                max_message_size=limits.max_frame_bytes)
                        head = None
                if head:
                    await http.serve(self, stream, head, slot)
                    return
                if request is not None:
                    await self.transport.handle(request, slot)
                elif upgrade is not None:
                    await websockets_channel.serve(self.transport, stream, upgrade,
                                                   slot.address, slot, handshake_by)
        finally:
            if slot is not None:
                self.transport.release(slot)
            await trio.aclose_forcefully(stream)

    def stop(self) -> None:
        """Begin a clean shutdown (as SIGTERM does)."""
        self._stopping.set()

    def crash(self) -> None:
        """Vanish as under kill -9: nothing more is written, nothing more is sent."""
        self.crashed = True
        self.lobby.crash()
        self.worlds.crash_all()
        for conn in list(self.transport.connections):
            conn.abort(1006, "")
        self._stopping.set()
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()

    async def _shutdown(self) -> None:
        """Stop taking actions, finish the queued ones, checkpoint every world and
        the server's own store, close connections with 1001."""
        with trio.move_on_after(4.5) as scope:
            self.lobby.dispatcher.accepting = False
            for world in self.worlds.loaded.values():
                world.dispatcher.accepting = False
            self.worlds.closing = True
            await self.worlds.stop_all()
            self.transport.close_all()
            with trio.move_on_after(0.5):
                while self.transport.connections:
                    await trio.sleep(0.01)
        if scope.cancelled_caught:
            log.error("shutdown took too long; stopping anyway")


Host = Server  # the old name, kept for code written before worlds
