"""A world: one authoritative world, served. It owns its store, its one writer (the
dispatcher), its saver, its slices and its plugins' background tasks, and nothing
outside itself: the server builds it with what it needs, opens it, runs it, and
unloads it.

The server keeps its own state (the sessions and the registry of worlds) the
same way, in a ``World`` of scope ``"server"`` that no session joins: one
journal, one writer and one saver per store, whatever the store holds.
"""

from __future__ import annotations

import fcntl
import gc
import logging
import os
import time
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import trio

from host.actions import ActionError
from host.api import HostAPI
from host.config import Config
from host.dispatcher import Dispatcher, Gate
from host.messages import Effects
from host.plugins import Registry
from host.sessions import SEQ_LIMIT, OutboundLog, Session, SessionTable
from state.codec import load_stored
from state.saver import Saver
from state.slices import Slices
from state.store import (
    Loaded,
    OutboundRows,
    Store,
    StoreUnreadable,
    full_error,
    is_full,
    quarantine,
)

log = logging.getLogger("worldhost")


class StartupError(Exception):
    """The server (or a world) cannot start; the message says why, in one line."""


def settle_heap() -> None:
    """Take a world just loaded or imported out of the cyclic collector's sight.

    Records are plain acyclic data freed by reference counting, but a full
    collection still walks every one of them: tens of ms on a big world, a
    stall of the whole loop. Freezing costs one collection now.
    """
    gc.collect()
    gc.freeze()


class World:
    """One world (or the server's own state), from its store to its plugins' tasks.

    ``open`` loads it (lock, load, migrate, replay); ``run`` serves it until
    ``stop`` (a clean checkpoint) or ``crash`` (nothing more written).
    """

    def __init__(self, world_id: str, name: str, path: str, *, scope: str, config: Config,
                 registry: Registry, sessions: SessionTable, gate: Gate,
                 clock: Callable[[], float], threads: bool,
                 on_changed: Callable[[World, Effects, list[str]], None] | None = None) -> None:
        self.id = world_id
        self.name = name
        self.path = path
        self.scope = scope
        self.config = config
        self.registry = registry
        self.sessions = sessions
        self.clock = clock
        self.threads = threads
        self.specs = registry.slices_in(scope)
        self.actions = registry.actions_in(scope)
        self.hooks = registry.hooks(scope)
        self.audience: dict[str, Session] = (
            sessions.by_id if scope == "server" else sessions.members(world_id))
        self.api = HostAPI(self)
        self.dispatcher = Dispatcher(
            registry=registry, sessions=sessions, audience=self.audience, gate=gate,
            api=self.api, clock=clock, hooks=self.hooks,
            queue_size=config.host.limits.dispatch_queue,
            on_changed=(lambda effects, changed: on_changed(self, effects, changed))
            if on_changed is not None else None,
            settle_heap=settle_heap)
        self.slices = Slices.fresh(list(self.specs.values()))
        self.store: Store | None = None
        self.saver: Saver = None  # type: ignore[assignment]  # set by open()
        self.recovered: dict[str, Any] | None = None
        self.replayed = 0
        self.runtime: dict[str, dict[str, Any]] = {}  # plugins' scratch space, never saved
        self.damaged: dict[str, str] = {}  # session id -> why its stored runtime is unusable
        self.last_active = 0.0  # when a session last changed it (from its store, then live)
        self.loaded_at = 0.0
        self.crashed = False
        self.stopped = trio.Event()
        self._stopping = trio.Event()
        self._nursery: trio.Nursery | None = None
        self._lock_handle: Any = None
        self._file_lock: Any = None
        self._saved_runtime: dict[str, int] = {}  # session id -> version written here
        self.stored: set[str] = set()  # the slices its store held when it was opened
        self.read_only = False  # an offline reader: load, never write
        self.closing_log: OutboundRows | None = None  # its outbound log, once closed cleanly

    # the world's own meta ------------------------------------------------------
    @property
    def seed(self) -> str:
        meta = self.slices.slices.get("host")
        return meta.data()["seed"] if meta is not None else "server"

    @property
    def generation(self) -> int:
        return self.saver.generation if self.saver is not None else 0

    @property
    def nursery(self) -> trio.Nursery | None:
        return self._nursery

    def running(self) -> list[str]:
        """What its plugins say keeps it running with nobody in it."""
        if self.store is None:
            return []
        return sorted({r for r in self.hooks.world_running(host=self.api) if r})

    # locks ---------------------------------------------------------------------
    def _lock(self) -> None:
        """Hold the store's locks while open: one server (or offline tool) per store
        file, however it is named. ``DB.lock`` beside the file's real path (symlinks,
        ``..`` and relative paths resolved) orders starts; ``flock`` on the database
        file itself (SQLite's own locks are of another kind and never touch it)
        refuses a second name for the same file, such as a hard link."""
        if self.path == ":memory:":
            return
        real = os.path.realpath(self.path)
        path = Path(real + ".lock")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            handle = open(path, "a+")  # noqa: SIM115 - held while the world is open
        except OSError as exc:
            if is_full(exc):
                raise full_error(str(path), exc) from None
            raise
        self._lock_handle = _hold(handle, f"{self.path} is in use by another worldhost "
                                          f"(it holds {path})")
        self._lock_file()

    def _lock_file(self) -> None:
        """Lock the database file itself, once it exists (a new store: once created)."""
        if self._file_lock is not None or not os.path.exists(self.path):
            return
        handle = open(self.path, "rb")  # noqa: SIM115 - held while the world is open
        self._file_lock = _hold(handle, f"{self.path} is in use by another worldhost "
                                        f"(under another name: a link to the same file)")

    def _unlock_file(self) -> None:
        if self._file_lock is not None:
            self._file_lock.close()
            self._file_lock = None

    def release(self) -> None:
        """Close the store without writing, and let go of the file locks."""
        if self.saver is not None:
            self.saver.close()
        if self.store is not None:
            self.store.abandon()
            self.store = None
        self._unlock_file()
        if self._lock_handle is not None:
            self._lock_handle.close()
            self._lock_handle = None

    # loading -------------------------------------------------------------------
    def open(self, quarantine_unreadable: bool = True) -> None:
        """Open the store (quarantining an unreadable one), load, migrate, replay."""
        try:
            self._lock()
            try:
                self._open_and_load()
            except StoreUnreadable as exc:
                if self.store is not None:
                    self.store.abandon()
                    self.store = None
                if not quarantine_unreadable:
                    raise
                self._unlock_file()
                moved = quarantine(self.path)
                log.error("store %s is unreadable (%s); moved it to %s and started a fresh "
                          "world", self.path, exc, moved)
                self.recovered = {**(self.recovered or {}), "fresh": True,
                                  "quarantined": str(moved)}
                self._open_and_load()
        except BaseException:
            self.release()
            raise
        self.loaded_at = self.clock()

    def _open_and_load(self) -> None:
        sc = self.config.store
        self.store = Store.open(self.path, sc.synchronous, sc.busy_timeout_ms)
        self._lock_file()  # a store just created
        damage = self.store.wal_damage
        if damage is not None:
            log.error("store %s: %s: its index says %d WAL frames were committed, %d could "
                      "be read; acknowledged actions in the other %d are lost; the WAL and "
                      "its index were copied to %s", self.path, damage.reason,
                      damage.committed_frames, damage.readable_frames,
                      damage.committed_frames - damage.readable_frames, damage.copy)
            self.recovered = {**(self.recovered or {}), **damage.report()}
        # Loading builds a world's records by the ten thousand, all of them kept: the
        # cyclic collector would walk the growing heap again and again meanwhile, for
        # nothing (``settle_heap`` takes them out of its sight once the world is up).
        collecting = gc.isenabled()
        gc.disable()
        try:
            self._load(self.store.load())
        finally:
            if collecting:
                gc.enable()

    def _load(self, loaded: Loaded) -> None:
        assert self.store is not None
        self.slices = self._slices(loaded)
        dispatcher = self.dispatcher
        dispatcher.slices = self.slices
        dispatcher.seed = self.seed
        if "sessions" in self.slices.slices:
            self.sessions.sync(self.slices["sessions"].data())
        # (a world loaded while the server runs meets live sessions: its store's copy
        # of their seq only counts when it is ahead of theirs)
        seq_before = {s.id: s.next_seq for s in self.sessions}
        restored = self._restore_runtime(loaded)
        ss = self.config.sessions
        members = (lambda: list(self.sessions)) if self.scope == "server" \
            else (lambda: list(self.audience.values()))
        outbound = OutboundLog(ss.outbound_log_size, ss.outbound_log_age_s, loaded.next_pos,
                               members) if ss.outbound_log else None
        dispatcher.next_id = max(loaded.checkpoint_id,
                                 loaded.journal[-1].id if loaded.journal else 0) + 1
        self.last_active = float(self.store.meta("last_active", 0.0) or 0.0)
        sc = self.config.store
        self.saver = Saver(self.store, self.slices, durability=sc.durability,
                           debounce_s=sc.debounce_s, max_delay_s=sc.max_delay_s,
                           seq_source=self._session_seqs, runtime_source=self._session_runtime,
                           world_id=None, last_id=dispatcher.next_id - 1, threaded=self.threads,
                           journal_in_loop=sc.journal_commits == "loop"
                           and sc.synchronous in ("OFF", "NORMAL"),
                           commit_wait=sc.synchronous in ("OFF", "NORMAL"),
                           meta_source=self._meta, outbound=outbound,
                           unlogged_s=ss.outbound_log_delay_s)
        dispatcher.saver = self.saver
        self.saver.generation = loaded.generation
        dispatcher.replaying = True
        try:
            actions = self.registry.actions
            for entry in loaded.journal:
                if entry.action in actions and entry.action not in self.actions:
                    continue  # the server's part of a store from before worlds: adopted
                dispatcher.replay(entry)
                self.replayed += 1
                if entry.session is not None:
                    self.last_active = max(self.last_active, entry.at)
        except ActionError as exc:
            raise StartupError(f"replaying the journal of {self.path} failed: "
                               f"{exc.message}") from exc
        finally:
            dispatcher.replaying = False
        for sid, (seq, _) in loaded.runtime.items():  # sessions the journal created
            session = self.sessions.get(sid)
            if session is not None and sid not in restored and sid not in self.damaged:
                session.skip_to(seq)
        if outbound is not None:
            self._restore_log(loaded)  # (after the journal: it may have created sessions)
        for session in self._known(loaded):
            if self.scope == "server" or session.next_seq > seq_before.get(session.id, 0):
                session.seq_exact = False  # signals sent after its last save were not counted
            session.measure_replies()
        self.saver.current.releases.clear()
        self.saver.current.entries.clear()
        self.saver.world_id = self.slices["host"].data()["world_id"] \
            if "host" in self.slices.slices else None

    def _slices(self, loaded: Loaded) -> Slices:
        self.stored = set(loaded.slices)
        slices = Slices()
        owner = self.registry.slice_owner
        try:
            for name, spec in self.specs.items():
                if name not in loaded.slices:  # new here: the next checkpoint writes it
                    slices.add(spec, spec.initial())
                    slices[name].mark_unsaved()
                    continue
                version, keyed, raw = loaded.slices[name]
                value = {k: load_stored(v) for k, v in raw.items()} if keyed else load_stored(raw)
                if version > spec.version:
                    raise StartupError(
                        f"slice {name!r} in {self.path} is version {version}, newer than "
                        f"version {spec.version} of plugin {owner[name]!r}")
                if version < spec.version:
                    if spec.migrate is None:
                        raise StartupError(f"slice {name!r} is version {version} and plugin "
                                           f"{owner[name]!r} has no migrate function to reach "
                                           f"version {spec.version}")
                    value = spec.migrate(version, value)
                slices.add(spec, spec.fill_defaults(value))
                if version < spec.version:  # migrated: saved again at the new version
                    slices[name].mark_unsaved()
        except StartupError:
            raise
        except Exception as exc:
            raise StoreUnreadable(f"cannot decode a stored slice: {exc}") from None
        unknown = set(loaded.slices) - set(self.specs)
        moved = sorted(n for n in unknown if n in self.registry.slices)
        if moved and self.store is not None and not self.read_only:  # now kept elsewhere (sessions: the server's)
            log.info("store %s: dropping its copy of %s, now kept by the server", self.path,
                     moved)
            self.store.drop_slices(moved)
            unknown -= set(moved)
        if unknown:
            log.warning("store %s holds slices no loaded plugin owns, kept untouched: %s",
                        self.path, sorted(unknown))
        return slices

    def _restore_runtime(self, loaded: Loaded) -> set[str]:
        """Take back each session's saved delivery state (seq, remembered replies),
        merged with what another store already gave it; a damaged row ends the session."""
        restored = set()
        self.damaged = {}
        for sid, (seq, blob) in loaded.runtime.items():
            problem = _seq_problem(seq)
            session = self.sessions.get(sid)
            if problem is None and session is not None:
                try:
                    session.restore_runtime(load_stored(blob) if blob else {})
                except Exception as exc:  # noqa: BLE001 - any damage: repair, do not fail
                    problem = f"unreadable runtime ({type(exc).__name__}: {exc})"
            if problem is not None:
                self.damaged[sid] = problem
            elif session is not None:
                session.skip_to(seq)
                restored.add(sid)
                self._saved_runtime[sid] = session.version
        return restored

    def _restore_log(self, loaded: Loaded) -> None:
        """Give each session back the signals this store logged for it, within the
        log's bounds; numbering goes on after the last one logged, kept or not."""
        sc = self.config.sessions
        since = time.time() - sc.outbound_log_age_s
        by_session: dict[str, list[Any]] = {}
        for row in loaded.outbound:  # by session, then seq
            by_session.setdefault(row[0], []).append(row)
        for sid, rows in by_session.items():
            session = self.sessions.get(sid)
            if session is None or sid in self.damaged:
                continue
            session.skip_to(rows[-1][1] + 1)
            session.restore_log([r for r in rows[-sc.outbound_log_size:] if r[2] >= since])

    def _known(self, loaded: Loaded) -> Iterable[Session]:
        if self.scope == "server":
            return list(self.sessions)
        ids = set(loaded.runtime) | {e.session for e in loaded.journal if e.session}
        return [s for sid in ids if (s := self.sessions.get(sid)) is not None]

    # what the saver writes beside the world --------------------------------------
    def _session_seqs(self, counts: Counter[str]) -> dict[str, int]:
        """For a journal commit: the next seq of each session it signals, once sent."""
        return {sid: s.next_seq + pending for sid, pending in counts.items()
                if (s := self.sessions.get(sid)) is not None}

    def _session_runtime(self) -> tuple[dict[str, tuple[int, bytes]], list[str]]:
        """For a checkpoint (taken with nothing left to send): the runtime of every
        session this store speaks for that changed since this store last wrote it
        (every session for the server; a world's members and who acted in it), and
        the sessions that ended."""
        rows: dict[str, tuple[int, bytes]] = {}
        saved = self._saved_runtime
        candidates = self.sessions if self.scope == "server" else \
            [s for sid in set(self.audience) | set(saved) if (s := self.sessions.get(sid))]
        for s in candidates:
            if saved.get(s.id) != s.version:
                rows[s.id] = (s.next_seq, s.runtime_blob())
                saved[s.id] = s.version
        ended = [sid for sid in saved if sid not in self.sessions.by_id]
        for sid in ended:
            del saved[sid]
        if self.scope == "server":
            ended = sorted(set(ended) | set(self.sessions.take_ended()))
        return rows, ended

    def active_at(self) -> float:
        """When a session last changed this world (0: never, as far as it knows)."""
        return max(self.last_active, self.dispatcher.last_request_at)

    def _meta(self) -> dict[str, Any]:
        return {"last_active": self.active_at() or None}

    # life ------------------------------------------------------------------------
    async def run(self, *, run_plugins: bool = True, resume: Callable[[World], Any] | None = None,
                  task_status: trio.TaskStatus[World] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve the (opened) world until stopped, then checkpoint and close it
        (or vanish, if crashed). ``resume`` runs once its writer is up, before its
        plugins start (the server ends damaged and revoked sessions there)."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self.saver.run)
                nursery.start_soon(self.dispatcher.run)
                if resume is not None:
                    await resume(self)
                await self.saver.checkpoint()
                settle_heap()
                if run_plugins:
                    await _await_all(self.hooks.startup(host=self.api))
                    for plugin, tasks in self.registry.collect("background_tasks",
                                                               scope=self.scope, host=self.api):
                        for task in tasks:
                            nursery.start_soon(self._supervise, plugin, task)
                task_status.started(self)
                await self._stopping.wait()
                if not self.crashed:
                    await self._shutdown()
                nursery.cancel_scope.cancel()
        finally:
            self._nursery = None
            if self.store is not None and not self.crashed:
                if self.scope == "world" and self.saver.outbound is not None:
                    # a world unloaded stays unloaded across a restart: its sessions'
                    # signals go to the server's store (see Worlds.unload)
                    self.closing_log = self.store.outbound_export()
                self.store.close(truncate=True)
                self.store = None
            self.release()
            self.stopped.set()

    async def _supervise(self, plugin: str, task: Any) -> None:
        while True:
            try:
                await task()
                return
            except Exception as exc:
                log.exception("background task %s of plugin %r in %s failed; restarting in "
                              "%gs", getattr(task, "__name__", task), plugin, self.label,
                              self.api.restart_delay_s)
                self.api.task_failed(plugin, task, exc)
                await trio.sleep(self.api.restart_delay_s)

    @property
    def label(self) -> str:
        return "the server" if self.scope == "server" else f"world {self.id!r}"

    def stop(self) -> None:
        """Stop taking actions, finish the queued ones, checkpoint, close the store."""
        self.dispatcher.accepting = False
        self._stopping.set()

    def crash(self) -> None:
        """Vanish as under kill -9: nothing more is written."""
        self.crashed = True
        self.dispatcher.accepting = False
        self._stopping.set()
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()

    async def _shutdown(self) -> None:
        with trio.move_on_after(4.5) as scope:
            while self.dispatcher.receive_channel.statistics().current_buffer_used:
                await trio.sleep(0.01)
            await _await_all(self.hooks.shutdown(host=self.api))
            await self.saver.flush()
        if scope.cancelled_caught:
            log.error("%s: shutdown took too long; stopping anyway", self.label)

    async def checkpoint(self) -> None:
        await self.saver.checkpoint()


def _seq_problem(seq: Any) -> str | None:
    """Why a stored next seq cannot be used, or None."""
    if type(seq) is not int or not 0 <= seq <= SEQ_LIMIT:
        return f"next seq {seq!r} is out of range"
    return None


async def _await_all(results: list[Any]) -> None:
    for result in results:
        if result is not None and hasattr(result, "__await__"):
            await result


def _hold(handle: Any, refused: str) -> Any:
    """Take an exclusive lock on an open file for as long as it stays open, or refuse."""
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise StartupError(refused) from None
    return handle
