"""The directory of worlds: which exist (the registry, kept in the server's own
store), which are loaded, and when each is loaded and unloaded.

A world is loaded when a session needs it (joins it, opens or resumes into it,
or acts in it after a restart) and at startup when it is the last active one or
may have something to resume: it had a running simulation or process when the
server stopped, or it was loaded when the server crashed. A loaded world with
nobody in it and nothing running is checkpointed and unloaded after
``[worlds] idle_unload_s``. The registry says ``loaded`` durably before a world
serves its first action, which is what makes a crash safe to come back from:
every world that may hold acknowledged work not yet resumed is loaded again.
"""

from __future__ import annotations

import logging
import os
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio

from host.actions import Conflict, NotFound
from host.config import Config
from host.dispatcher import Gate
from host.lobby import DEFAULT_WORLD
from host.messages import Effects
from host.plugins import Registry
from host.sessions import SessionTable
from host.world import StartupError, World
from state.store import StoreError

log = logging.getLogger("worldhost.worlds")


def server_db_path(config: Config, db: str) -> str:
    """The server's own store: ``[worlds] server_db``, else ``DB.server.db`` beside ``--db``."""
    if db == ":memory:":
        return db
    if config.worlds.server_db:
        return config.worlds.server_db
    stem = db[:-3] if db.endswith(".db") else db
    return stem + ".server.db"


def worlds_dir(config: Config, db: str) -> Path:
    """Where worlds other than the first keep their stores: ``[worlds] dir``, else a
    ``worlds`` directory beside ``--db``."""
    return Path(config.worlds.dir) if config.worlds.dir else Path(db).parent / "worlds"


class Worlds:
    """Every world the server knows, and the loaded ones."""

    def __init__(self, config: Config, registry: Registry, sessions: SessionTable, gate: Gate,
                 *, db: str, clock: Callable[[], float], threads: bool,
                 on_changed: Callable[[World, Effects, list[str]], None],
                 resume: Callable[[World], Any]) -> None:
        self.config = config
        self.registry = registry
        self.sessions = sessions
        self.gate = gate
        self.db = db
        self.clock = clock
        self.threads = threads
        self.on_changed = on_changed
        self.resume = resume
        self.lobby = self._build("server", "server", server_db_path(config, db), scope="server")
        self.loaded: dict[str, World] = {}
        self.quarantined: dict[str, str] = {}  # world id -> where its unreadable store went
        self.failed: dict[str, str] = {}  # world id -> why it could not be loaded
        self._locks: dict[str, trio.Lock] = {}
        self._idle_since: dict[str, float] = {}
        self._nursery: trio.Nursery | None = None
        self.run_plugins = True
        self.closing = False

    def _build(self, world_id: str, name: str, path: str, scope: str = "world") -> World:
        return World(world_id, name, path, scope=scope, config=self.config,
                     registry=self.registry, sessions=self.sessions, gate=self.gate,
                     clock=self.clock, threads=self.threads, on_changed=self.on_changed)

    # the registry -----------------------------------------------------------------
    def records(self) -> dict[str, dict[str, Any]]:
        """Every world the registry holds, archived ones too."""
        return self.lobby.slices["worlds"].data()  # type: ignore[no-any-return]

    def live(self) -> dict[str, dict[str, Any]]:
        return {k: r for k, r in self.records().items() if r.get("archived_to") is None}

    def path_of(self, world_id: str) -> str:
        if self.db == ":memory:":
            return ":memory:"
        if world_id == DEFAULT_WORLD:
            return self.db
        return str(worlds_dir(self.config, self.db) / f"{world_id}.db")

    def last_active(self, world_id: str) -> float:
        """When a session last changed the world: live while it is loaded, else as
        the registry recorded it when it unloaded (or its store at its checkpoints)."""
        recorded = float(self.records().get(world_id, {}).get("last_active") or 0.0)
        world = self.loaded.get(world_id)
        return recorded if world is None else max(recorded, world.active_at())

    def default_id(self) -> str | None:
        """The world a session is in until it joins another: the last active one
        (``main`` on a fresh server); None when every world is archived."""
        live = self.live()
        if not live:
            return None
        return max(live, key=lambda w: (self.last_active(w), w == DEFAULT_WORLD))

    def listing(self, detail: bool = False) -> list[dict[str, Any]]:
        out = []
        for world_id, record in sorted(self.live().items()):
            world = self.loaded.get(world_id)
            item: dict[str, Any] = {
                "world_id": world_id, "name": record["name"],
                "phase": self.phase(world) if world is not None else "unloaded",
                "sessions": len(self.sessions.members(world_id))}
            if detail:
                item.update(loaded=world is not None, created_at=record["created_at"],
                            last_active=self.last_active(world_id) or None,
                            running=world.running() if world is not None else record["running"])
                if world_id in self.quarantined:
                    item["quarantined"] = self.quarantined[world_id]
                if world is None and world_id in self.failed:
                    item["error"] = self.failed[world_id]  # why it could not be loaded
            out.append(item)
        return out

    def phase(self, world: World) -> str:
        """A world's phase, as its plugins' ``server_info`` tell it."""
        phase = "onboarding"
        for extra in reversed(world.hooks.server_info(host=world.api)):
            if extra and "phase" in extra:
                phase = extra["phase"]
        return phase

    def create(self, world_id: str, name: str) -> Effects:
        """Register a new world (its store is made when it first loads)."""
        if world_id in self.live():
            raise Conflict(f"world {world_id!r} already exists")
        old = self.records().get(world_id)
        if old is not None and (world_id in self.loaded or (
                old["path"] != ":memory:" and os.path.exists(old["path"]))):
            raise Conflict(f"world {world_id!r} is still being archived; try again")
        if len(self.live()) >= self.config.worlds.max_worlds:
            raise Conflict(f"this server holds {self.config.worlds.max_worlds} worlds "
                           f"(worlds.max_worlds); archive one first")
        return self.lobby.dispatcher.apply_internal("worlds.register", {"world_id": world_id, "name": name,
                                                  "path": self.path_of(world_id)})

    def archive(self, world_id: str) -> tuple[Effects, str]:
        """Mark a world archived and move its sessions out; it is unloaded and its
        store moved aside just after (and at the next start, if a crash comes first)."""
        record = self.live().get(world_id)
        if record is None:
            raise NotFound(f"no world {world_id!r}")
        stamp = int(self.clock())
        archived_to = f"{record['path']}.archived-{stamp}"
        effects = self.lobby.dispatcher.apply_internal("worlds.archive", {"world_id": world_id,
                                                    "archived_to": archived_to})
        effects.after.append(lambda: self._soon(self._archive, world_id))
        return effects, archived_to

    async def _archive(self, world_id: str) -> None:
        await self.unload(world_id, record=False)
        self._move_aside(self.records()[world_id])

    def _move_aside(self, record: dict[str, Any]) -> None:
        """Move an archived world's store (and its WAL, lock and shm files) aside."""
        source, target = record["path"], record["archived_to"]
        if source == ":memory:" or not target or not os.path.exists(source) \
                or os.path.exists(target):
            return
        for suffix in ("", "-wal", "-shm"):
            if os.path.exists(source + suffix):
                os.replace(source + suffix, target + suffix)
        log.info("world %r archived: its store is now %s", record["id"], target)

    def touched(self, world_id: str) -> None:
        """Someone joined or left: the idle clock starts again."""
        self._idle_since[world_id] = self.clock()

    def require_loaded(self, world_id: str) -> World:
        if world_id not in self.live():
            raise NotFound(f"no world {world_id!r}")
        world = self.loaded.get(world_id)
        if world is None:
            why = self.failed.get(world_id, "it is not loaded; try again")
            raise Conflict(f"world {world_id!r} cannot be entered: {why}")
        return world

    # loading and unloading ------------------------------------------------------------
    def _soon(self, fn: Callable[..., Any], *args: Any) -> None:
        if self._nursery is not None:
            self._nursery.start_soon(fn, *args)

    async def ensure(self, world_id: str | None) -> World | None:
        """The world loaded, loading it if it exists and is not (None if it cannot be)."""
        if world_id is None:
            return None
        world = self.loaded.get(world_id)
        if world is not None or world_id not in self.live() or self.closing:
            return world
        try:
            return await self.load(world_id)
        except Exception as exc:  # a store, a lock, a plugin's startup: this world only
            self.failed[world_id] = str(exc) if isinstance(
                exc, (StartupError, StoreError, OSError, sqlite3.Error)) else \
                f"{type(exc).__name__} while loading it (see the server's log)"
            log.error("world %r could not be loaded", world_id, exc_info=exc)
            return None

    async def load(self, world_id: str) -> World:
        """Open a world, resume it, start its plugins, and say so in the registry
        (durably) before it serves anything."""
        lock = self._locks.setdefault(world_id, trio.Lock())
        async with lock:
            world = self.loaded.get(world_id)
            if world is not None:
                return world
            assert self._nursery is not None
            record = self.live()[world_id]
            world = self._build(world_id, record["name"], record["path"])
            world.open()
            if world.recovered and "quarantined" in world.recovered:
                self.quarantined[world_id] = world.recovered["quarantined"]
            self.failed.pop(world_id, None)
            self._idle_since[world_id] = self.clock()
            try:
                await self.lobby.dispatcher.submit("worlds.state", {"world_id": world_id,
                                                                    "loaded": True})
                await self._nursery.start(self._serve, world)
            except BaseException:
                world.release()
                raise
            self.loaded[world_id] = world
            log.info("world %r loaded (%d journal entries replayed)", world_id, world.replayed)
            return world

    async def _serve(self, world: World, task_status: trio.TaskStatus[World]) -> None:
        try:
            await world.run(run_plugins=self.run_plugins, resume=self.resume,
                            task_status=task_status)
        finally:
            if self.loaded.get(world.id) is world and not world.crashed:
                del self.loaded[world.id]  # (a crashed one stays, for a test to look at)

    async def unload(self, world_id: str, record: bool = True) -> None:
        """Checkpoint a world and close it; the registry keeps what was running."""
        lock = self._locks.setdefault(world_id, trio.Lock())
        async with lock:
            world = self.loaded.get(world_id)
            if world is None:
                return
            running = world.running()
            last_active = self.last_active(world_id) or None
            world.stop()
            await world.stopped.wait()
            self.loaded.pop(world_id, None)
            if world.closing_log:  # before the registry says unloaded: see World.run
                await self.lobby.saver.adopt_outbound(world.closing_log)
            if record:
                await self.lobby.dispatcher.submit("worlds.state", {
                    "world_id": world_id, "loaded": False, "running": running,
                    "last_active": last_active})
            log.info("world %r unloaded", world_id)

    def idle(self) -> list[str]:
        """Loaded worlds nobody is in and nothing runs in, idle past the limit."""
        limit = self.config.worlds.idle_unload_s
        now = self.clock()
        out = []
        for world_id, world in self.loaded.items():
            if self.sessions.members(world_id):
                self._idle_since[world_id] = now
                continue
            since = max(self._idle_since.get(world_id, now), self.last_active(world_id))
            if now - since >= limit and not world.running():
                out.append(world_id)
        return out

    async def unload_idle(self) -> None:
        """The janitor: unload idle worlds, for the server's life."""
        interval = max(0.05, min(5.0, self.config.worlds.idle_unload_s / 4))
        while True:
            await trio.sleep(interval)
            for world_id in self.idle():
                await self.unload(world_id)

    # startup and shutdown ---------------------------------------------------------------
    async def open_lobby(self) -> None:
        """Open the server's own store. On the first start (its store holds no
        registry yet, whatever a crash left of it), adopt a single-world store from
        before worlds (format 2, sessions kept in the world) as world ``main``."""
        lobby = self.lobby
        lobby.open()
        if "worlds" in lobby.stored:
            return
        legacy = self._adopt_open() if self.db != ":memory:" and os.path.exists(self.db) \
            else None
        try:
            self._seed_registry()
            if legacy is not None:
                await self._adopt_finish(legacy)
        finally:
            if legacy is not None:
                legacy.release()

    def _seed_registry(self) -> None:
        worlds = self.lobby.slices["worlds"]
        self.lobby.slices.begin()
        worlds.put(DEFAULT_WORLD, {  # type: ignore[union-attr]
            "id": DEFAULT_WORLD, "name": DEFAULT_WORLD, "path": self.path_of(DEFAULT_WORLD),
            "created_at": self.clock(), "last_active": None, "loaded": False, "running": [],
            "archived_to": None})
        self.lobby.slices.commit()
        worlds.mark_unsaved()

    def _adopt_open(self) -> World | None:
        """Load a store written before worlds, whose ``sessions`` slice now belongs to
        the server: with the server's slices and actions too, replaying its journal.
        It takes the store's locks first, as any world does: a store another server
        holds is refused before anything reads it. None if it is no such store."""
        legacy = self._build(DEFAULT_WORLD, DEFAULT_WORLD, self.db)
        legacy.specs = {**self.registry.slices_in("world"),
                        "sessions": self.registry.slices["sessions"]}
        legacy.actions = dict(self.registry.actions)
        try:
            legacy.open(quarantine_unreadable=False)
        except StoreError:
            return None  # unreadable or too new: the world's own load says so
        if "sessions" not in legacy.stored:
            legacy.release()
            return None
        log.warning("adopting %s, a store from before worlds, as world %r; its sessions "
                    "move to %s", self.db, DEFAULT_WORLD, self.lobby.path)
        return legacy

    async def _adopt_finish(self, legacy: World) -> None:
        """Hand the legacy store's sessions to the server's store (durably first),
        then fold the legacy journal into its checkpoint: the world keeps the rest,
        and drops its copy of the sessions when it next loads."""
        records = legacy.slices["sessions"].data()
        lobby = self.lobby
        lobby.slices.begin()
        lobby.slices["sessions"].replace_all(dict(records))  # type: ignore[union-attr]
        lobby.slices.commit()
        lobby.slices["sessions"].mark_unsaved()
        self.sessions.sync(lobby.slices["sessions"].data())
        await lobby.saver.checkpoint()
        await legacy.saver.checkpoint(clean=True)

    async def start(self, nursery: trio.Nursery) -> None:
        """At startup: archive moves a crash interrupted; load the last active world
        and every world that may have something to resume."""
        self._nursery = nursery
        for record in self.records().values():
            if record.get("archived_to"):
                self._move_aside(record)
        wanted = {w for w, r in self.live().items() if r.get("loaded") or r.get("running")}
        default = self.default_id()
        if default is not None:
            wanted.add(default)
        for world_id in sorted(wanted, key=lambda w: w != default):
            if world_id == default:
                await self.load(world_id)  # as a single-world server did: it must come up
            else:
                await self.ensure(world_id)  # the others start normally without it
        nursery.start_soon(self.unload_idle)

    async def stop_all(self) -> None:
        """SIGTERM: checkpoint and close every loaded world, recording what ran."""
        async with trio.open_nursery() as nursery:
            for world_id in list(self.loaded):
                nursery.start_soon(self.unload, world_id)

    def crash_all(self) -> None:
        for world in list(self.loaded.values()):
            world.crash()
