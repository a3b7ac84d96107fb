"""The host: loads the world, runs the dispatcher, the saver, the plugins' tasks and
the transport, and shuts them down in order."""

from __future__ import annotations

import fcntl
import gc
import logging
import os
import socket
import time
from collections import Counter
from functools import partial
from pathlib import Path
from typing import Any, cast

import trio
import trio_websocket

from host import __version__, http, plugins
from host.actions import ActionError
from host.api import HostAPI, SessionInfo
from host.config import Config
from host.dispatcher import Dispatcher
from host.gateway import Gateway
from host.lines import serve_tcp
from host.messages import Disconnect, Request
from host.sessions import SEQ_LIMIT, Session, SessionTable, Signal, State
from host.transport import Transport, stream_address
from state.codec import canonical, load_stored
from state.saver import Saver
from state.slices import World
from state.store import Loaded, Store, StoreUnreadable, full_error, is_full, quarantine

SUMMARY_KEYS = frozenset({"phase", "processes"})  # a change of these re-sends sync_state

log = logging.getLogger("worldhost")
PROTOCOL = 1


class StartupError(Exception):
    """The host cannot start; the message says why, in one line."""


class Host:
    """One world, served. ``run`` is the whole life of the host."""

    def __init__(self, config: Config, extra_plugins: list[Any] | None = None,
                 entry_points: bool = True, db: str | None = None,
                 threads: bool = True) -> None:
        self.config = config
        self.db_path = db if db is not None else config.host.db
        try:
            self.registry = plugins.load(config, extra_plugins, entry_points)
        except plugins.PluginError as exc:
            raise StartupError(str(exc)) from exc
        self.sessions = self._session_table()
        self.api = HostAPI(self)
        self.gateway = Gateway(self)
        self.dispatcher = Dispatcher(self)
        self.transport = Transport(config, submit=_Submit(self.dispatcher),
                                   hello=self.server_info, threads=threads)
        self.world = World.fresh(list(self.registry.slices.values()))
        self.store: Store | None = None
        self.saver: Saver = None  # type: ignore[assignment]  # set by open()
        self.recovered: dict[str, Any] | None = None
        self.port: int | None = None
        self.tcp_port: int | None = None  # [transports.tcp], when enabled
        self.listen_host = config.host.host
        self._wall0 = time.time()
        self._trio0 = 0.0
        self._nursery: trio.Nursery | None = None
        self._stopping = trio.Event()
        self.stopped = trio.Event()
        self.crashed = False
        self.replayed = 0
        # worker threads (the store's writer, big decodes): a mock clock wants none, since
        # it counts a task waiting for a thread as idle and jumps ahead
        self.threads = threads
        self.plugin_runtime: dict[str, dict[str, Any]] = {}
        self._lock_handle: Any = None
        self._file_lock: Any = None
        self._last_summary: dict[str, Any] | None = None
        self._summary_reads: set[str] | None = None  # None: not computed yet
        self._damaged: dict[str, str] = {}  # session id -> why its stored runtime is unusable

    def _session_table(self) -> SessionTable:
        sc = self.config.sessions
        return SessionTable(sc.replay_buffer, sc.remembered_replies,
                            sc.replay_buffer_bytes, sc.remembered_replies_bytes)

    # time ------------------------------------------------------------------
    def clock(self) -> float:
        """Seconds since the epoch; follows trio's clock, so a mock clock moves it."""
        return self._wall0 + (trio.current_time() - self._trio0)

    # the world ---------------------------------------------------------------
    @property
    def world_id(self) -> str:
        return self.world["host"].data()["world_id"]

    @property
    def world_seed(self) -> str:
        return self.world["host"].data()["seed"]

    @property
    def generation(self) -> int:
        return self.saver.generation if self.saver is not None else 0

    def _lock(self) -> None:
        """Hold the store's locks while open: one host (or offline tool) per store file,
        however it is named. ``DB.lock`` beside the file's real path (symlinks, ``..``
        and relative paths resolved) orders starts; ``flock`` on the database file
        itself (SQLite's own locks are of another kind and never touch it) refuses a
        second name for the same file, such as a hard link."""
        if self.db_path == ":memory:":
            return
        real = os.path.realpath(self.db_path)
        path = Path(real + ".lock")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            handle = open(path, "a+")  # noqa: SIM115 - held for the host's life
        except OSError as exc:
            if is_full(exc):
                raise full_error(str(path), exc) from None
            raise
        self._lock_handle = _hold(handle, f"{self.db_path} is in use by another worldhost "
                                          f"(it holds {path})")
        self._lock_file()

    def _lock_file(self) -> None:
        """Lock the database file itself, once it exists (a new store: once created)."""
        if self._file_lock is not None or not os.path.exists(self.db_path):
            return
        handle = open(self.db_path, "rb")  # noqa: SIM115 - held for the host's life
        self._file_lock = _hold(handle, f"{self.db_path} is in use by another worldhost "
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

    def open(self, quarantine_unreadable: bool = True) -> None:
        """Open the store (quarantining an unreadable one), load, migrate, replay."""
        self._wall0, self._trio0 = time.time(), trio.current_time()  # the clock's origin
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
                moved = quarantine(self.db_path)
                log.error("store %s is unreadable (%s); moved it to %s and started a fresh "
                          "world", self.db_path, exc, moved)
                self.recovered = {**(self.recovered or {}), "fresh": True,
                                  "quarantined": str(moved)}
                self.sessions = self.dispatcher.sessions = self._session_table()
                self._open_and_load()
        except BaseException:
            self.release()
            raise

    def _open_and_load(self) -> None:
        sc = self.config.store
        self.store = Store.open(self.db_path, sc.synchronous, sc.busy_timeout_ms)
        self._lock_file()  # a store just created
        damage = self.store.wal_damage
        if damage is not None:
            log.error("store %s: %s: its index says %d WAL frames were committed, %d could "
                      "be read; acknowledged actions in the other %d are lost; the WAL and "
                      "its index were copied to %s", self.db_path, damage.reason,
                      damage.committed_frames, damage.readable_frames,
                      damage.committed_frames - damage.readable_frames, damage.copy)
            self.recovered = {**(self.recovered or {}), **damage.report()}
        self._load(self.store.load())

    def _load(self, loaded: Loaded) -> None:
        assert self.store is not None
        specs = self.registry.slices
        world = World()
        try:
            for name, spec in specs.items():
                if name not in loaded.slices:  # new here: the next checkpoint writes it
                    world.add(spec, spec.initial())
                    world[name].mark_unsaved()
                    continue
                version, keyed, raw = loaded.slices[name]
                value = {k: load_stored(v) for k, v in raw.items()} if keyed else load_stored(raw)
                if version > spec.version:
                    raise StartupError(
                        f"slice {name!r} in {self.db_path} is version {version}, newer than "
                        f"version {spec.version} of plugin {self.registry.slice_owner[name]!r}")
                if version < spec.version:
                    if spec.migrate is None:
                        raise StartupError(f"slice {name!r} is version {version} and plugin "
                                           f"{self.registry.slice_owner[name]!r} has no migrate "
                                           f"function to reach version {spec.version}")
                    value = spec.migrate(version, value)
                world.add(spec, spec.fill_defaults(value))
                if version < spec.version:  # migrated: saved again at the new version
                    world[name].mark_unsaved()
        except StartupError:
            raise
        except Exception as exc:
            raise StoreUnreadable(f"cannot decode a stored slice: {exc}") from None
        unknown = set(loaded.slices) - set(specs)
        if unknown:
            log.warning("store holds slices no loaded plugin owns, kept untouched: %s",
                        sorted(unknown))
        self.world = world
        self.world["host"]  # the core slice must exist
        self.sessions.sync(world["sessions"].data())
        restored = set()
        self._damaged = {}
        for sid, (seq, blob) in loaded.runtime.items():
            problem = _seq_problem(seq)
            session = self.sessions.get(sid)
            if problem is None and session is not None:
                try:
                    session.restore_runtime(load_stored(blob) if blob else {})
                except Exception as exc:  # noqa: BLE001 - any damage: repair, do not fail
                    problem = f"unreadable runtime ({type(exc).__name__}: {exc})"
            if problem is not None:
                self._damaged[sid] = problem
            elif session is not None:
                session.next_seq = max(session.next_seq, seq)
                restored.add(sid)
        self.dispatcher.next_id = max(loaded.checkpoint_id,
                                      loaded.journal[-1].id if loaded.journal else 0) + 1
        self.saver = Saver(self.store, self.world, durability=self.config.store.durability,
                           debounce_s=self.config.store.debounce_s,
                           max_delay_s=self.config.store.max_delay_s,
                           seq_source=self._session_seqs,
                           runtime_source=self._session_runtime, world_id=None,
                           last_id=self.dispatcher.next_id - 1, threaded=self.threads,
                           journal_in_loop=self.config.store.journal_commits == "loop"
                           and self.config.store.synchronous in ("OFF", "NORMAL"))
        self.saver.generation = loaded.generation
        self.dispatcher.replaying = True
        try:
            for entry in loaded.journal:
                self.dispatcher.replay(entry)
                self.replayed += 1
        except ActionError as exc:
            raise StartupError(f"replaying the journal failed: {exc.message}") from exc
        finally:
            self.dispatcher.replaying = False
        for sid, (seq, _) in loaded.runtime.items():  # sessions the journal created
            session = self.sessions.get(sid)
            if session is not None and sid not in restored and sid not in self._damaged:
                session.next_seq = max(session.next_seq, seq)
        for session in self.sessions:
            session.seq_exact = False  # signals sent after its last save were not counted
            session.measure_replies()
        self.saver.current.releases.clear()
        self.saver.current.entries.clear()
        self.saver.world_id = self.world_id

    def _session_seqs(self, counts: Counter[str]) -> dict[str, int]:
        """For a journal commit: the next seq of each session it signals, once sent."""
        return {sid: s.next_seq + pending for sid, pending in counts.items()
                if (s := self.sessions.get(sid)) is not None}

    def _session_runtime(self) -> tuple[dict[str, tuple[int, bytes]], list[str]]:
        """For a checkpoint (taken with nothing left to send): the runtime of every
        session changed since the last one, and the sessions that ended."""
        rows: dict[str, tuple[int, bytes]] = {}
        for s in self.sessions:
            if s.dirty:
                runtime = s.runtime()
                rows[s.id] = (runtime["next_seq"], canonical(runtime))
                s.dirty = False
        return rows, self.sessions.take_ended()

    async def _resume_world(self) -> None:
        """After loading: sessions whose stored runtime is damaged, and sessions whose
        credential no longer grants their role, end (journaled); sessions that were
        connected are now disconnected."""
        records = self.world["sessions"].data()
        for sid, problem in self._damaged.items():
            log.error("session %s: stored runtime is damaged (%s); ending the session", sid,
                      problem)
            if sid in records:
                self.dispatcher._finish(None, self.gateway.end(sid, "repaired"))
            else:
                self.sessions.ended.append(sid)  # an orphan row: the checkpoint drops it
        if self._damaged:
            self.recovered = {**(self.recovered or {}), "sessions_repaired": sorted(self._damaged)}
        for sid, record in list(self.world["sessions"].data().items()):
            role = self.gateway.current_role(record.get("credential"))
            if role != record["role"]:
                log.warning("session %s (%s): the credential that made it %s %s; ending it",
                            sid, record["name"], record["role"],
                            "is gone" if role is None else f"now grants {role}")
                self.dispatcher._finish(None, self.gateway.end(sid, "revoked"))
        for s in list(self.sessions):
            if s.state == State.OPEN:
                outcome = self.gateway._internal("sessions.detach", {"session_id": s.id})
                self.dispatcher._finish(None, outcome)
        self.sessions.sync(self.world["sessions"].data())
        await self.saver.checkpoint()

    # what clients are told -----------------------------------------------------
    def _contributions(self) -> dict[str, Any]:
        """Every plugin's ``server_info``, merged. Notes the slices the summary fields
        came from: those read by the plugins contributing to them (and by those
        contributing nothing, who might begin to)."""
        merged: dict[str, Any] = {"phase": "onboarding"}
        reads: set[str] = set()
        for impl in reversed(self.registry.pm.hook.server_info.get_hookimpls()):
            read: set[str] = set()
            self.api.reads = read
            try:
                extra = cast("dict[str, Any] | None", impl.function(host=self.api))
            finally:
                self.api.reads = None
            if not extra or not SUMMARY_KEYS.isdisjoint(extra):
                reads |= read
            merged.update(extra or {})
        self._summary_reads = reads
        return merged

    def server_info(self) -> dict[str, Any]:
        info = {
            "protocol": PROTOCOL,
            "version": __version__,
            "world_id": self.world_id,
            "plugins": list(self.registry.plugin_names),
            "actions": sorted(n for n, a in self.registry.actions.items() if not a.internal),
            "auth": self.config.host.auth,
            "limits": {"max_frame_bytes": self.config.host.limits.max_frame_bytes},
        }
        info.update(self._contributions())
        if self.recovered is not None:
            info["recovered"] = self.recovered
        return info

    def recent_sessions(self, limit: int = 15, with_ids: bool = False) -> list[dict[str, Any]]:
        ordered = sorted(self.sessions, key=lambda s: s.last_active, reverse=True)[:limit]
        records = self.world["sessions"].data()
        out = []
        for s in ordered:
            item = {"name": s.name, "role": s.role, "last_active": s.last_active,
                    "connected": _state(records, s) == State.OPEN.value}
            if with_ids:
                item["id"] = s.id
            out.append(item)
        return out

    def sync_state(self, session: Session) -> dict[str, Any]:
        slices = []
        for name, s in self.world.slices.items():
            data = s.data()
            slices.append({"name": name, "version": s.spec.version, "keyed": s.spec.keyed,
                           "size": len(data) if s.spec.keyed else 1})
        state = {
            "session": {"id": session.id, "name": session.name, "role": session.role},
            "world_id": self.world_id,
            "generation": self.generation,
            "plugins": list(self.registry.plugin_names),
            "slices": slices,
            "sessions": self.recent_sessions(with_ids=session.role == "admin"),
        }
        state.update(self._contributions())
        return state

    def _summary(self) -> dict[str, Any]:
        """What a change of re-sends ``sync_state``: the phase and the process summary
        (the simulation's tick changes every tick; clients follow it by its signals)."""
        contributions = self._contributions()
        return {k: contributions.get(k) for k in SUMMARY_KEYS}

    def sync_if_changed(self, outcome: Any, changed: list[str]) -> None:
        """Send ``sync_state`` again to every session when the phase or process summary
        changed (the parts of it that actions change)."""
        if self._summary_reads is not None and self._summary_reads.isdisjoint(changed):
            return
        summary = self._summary()
        if summary == self._last_summary:
            return
        self._last_summary = summary
        for session in self.sessions:
            outcome.outputs.append((session, Signal("sync_state", self.sync_state(session))))

    def session_info(self, s: Session, resumed: bool = False) -> SessionInfo:
        return SessionInfo(s.id, s.name, s.role, resumed)

    def session_ended(self, session_id: str, reason: str, outcome: Any) -> None:
        """A handler ended a session: drop it now, tell and close its connection on release."""
        session = self.sessions.get(session_id)
        if session is None:
            return
        conn = session.outbox
        self.sessions.drop(session_id)
        if conn is not None:
            conn.session = None
            if reason != "closed":
                outcome.outputs.append((conn, Signal("session.ended", {
                    "session_id": session_id, "reason": reason})))
                outcome.after.append(lambda: conn.close_soon(1000, f"session {reason}"))
        self.registry.pm.hook.session_closed(host=self.api, session=self.session_info(session),
                                             reason=reason)

    def sessions_overview(self) -> list[dict[str, Any]]:
        """Every session with its live figures (runtime data, not part of the world)."""
        records = self.world["sessions"].data()
        out = []
        for s in self.sessions:
            record = records.get(s.id, {})
            state = _state(records, s)
            out.append({"id": s.id, "name": s.name, "role": s.role,
                        "connected": state == State.OPEN.value,
                        "state": state, "created_at": record.get("created_at"),
                        "disconnected_at": record.get("disconnected_at"),
                        "last_active": s.last_active, "actions_applied": s.actions_applied,
                        "signals_sent": s.signals_sent, "held_bytes": s.held_bytes})
        return out

    def check_session_limit(self) -> ActionError | None:
        for _, error in self.registry.collect("session_limit", host=self.api):
            if error is not None:
                return error
        return None

    # life ----------------------------------------------------------------------
    async def run(self, *, listen: bool = True, run_plugins: bool = True,
                  task_status: trio.TaskStatus[Host] = trio.TASK_STATUS_IGNORED) -> None:
        """Open, serve until stopped, then shut down cleanly (or vanish, if crashed).

        ``run_plugins=False`` (offline tools) skips startup hooks and background tasks.
        """
        self.open()
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self.saver.run)
                nursery.start_soon(self.dispatcher.run)
                await self._resume_world()
                self.settle_heap()
                if run_plugins:
                    await _await_all(self.registry.pm.hook.startup(host=self.api))
                    for plugin, tasks in self.registry.collect("background_tasks", host=self.api):
                        for task in tasks:
                            nursery.start_soon(self._supervise, plugin, task)
                self._last_summary = self._summary()
                if listen:
                    await self._listen(nursery)
                task_status.started(self)
                await self._stopping.wait()
                if not self.crashed:
                    await self._shutdown()
                nursery.cancel_scope.cancel()
        finally:
            gc.unfreeze()  # what this host froze can be collected again
            self._nursery = None
            if self.store is not None and not self.crashed:
                self.store.close(truncate=True)
                self.store = None
            self.release()
            self.stopped.set()

    async def _listen(self, nursery: trio.Nursery) -> None:
        cfg = self.config.host
        listeners = await trio.open_tcp_listeners(cfg.port, host=cfg.host)
        for listener in listeners:
            # Accepted sockets inherit this: a client that stops reading fills its
            # buffers within seconds, so its outbox lag shows and it is dropped.
            listener.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF,
                                       cfg.limits.socket_send_buffer)
        started = await nursery.start(partial(
            trio.serve_listeners, self._serve_stream, listeners, handler_nursery=nursery))
        self.port = started[0].socket.getsockname()[1]
        self.listen_host = cfg.host
        if self.config.transports.tcp.enabled:
            self.tcp_port = await serve_tcp(nursery, self.transport, self.config)

    async def _supervise(self, plugin: str, task: Any) -> None:
        while True:
            try:
                await task()
                return
            except Exception as exc:
                log.exception("background task %s of plugin %r failed; restarting in %gs",
                              getattr(task, "__name__", task), plugin, self.api.restart_delay_s)
                self.api.task_failed(plugin, task, exc)
                await trio.sleep(self.api.restart_delay_s)

    def accept_stream(self, stream: trio.abc.Stream) -> None:
        """Serve one connection over any trio stream (in-memory in tests)."""
        if self._nursery is None or self._stopping.is_set():
            raise ConnectionRefusedError("the host is not running")
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
                # a socket that never completes its handshake is closed like one that
                # never opens a session
                with trio.move_on_after(self.config.sessions.auth_timeout_s):
                    head = None
                    with trio.move_on_after(limits.http_timeout_s):
                        head = await http.read_head(stream, limits.max_http_header_bytes)
                    if not head:  # too slow to send a request's headers, or gone
                        return
                    # HTTP (pages, health, metrics), and any request over the header
                    # bound: a handshake too, which wsproto would take up to 16 KiB
                    if not http.is_websocket(head) or \
                            http.too_large(head, limits.max_http_header_bytes):
                        await http.serve(self, stream, head)
                        return
                    http.unread(stream, head)
                    request = await trio_websocket.wrap_server_stream(
                        self._nursery, stream, message_queue_size=8,
                        max_message_size=limits.max_frame_bytes)
                if request is not None:
                    await self.transport.handle(request, slot)
        finally:
            if slot is not None:
                self.transport.release(slot)
            await trio.aclose_forcefully(stream)

    def settle_heap(self) -> None:
        """Take the world just loaded or imported out of the cyclic collector's sight.

        Records are plain acyclic data freed by reference counting, but a full
        collection still walks every one of them: tens of ms on a big world, a
        stall of the whole loop. Freezing costs one collection now.
        """
        gc.collect()
        gc.freeze()

    def stop(self) -> None:
        """Begin a clean shutdown (as SIGTERM does)."""
        self._stopping.set()

    def crash(self) -> None:
        """Vanish as under kill -9: nothing more is written, nothing more is sent."""
        self.crashed = True
        self.dispatcher.accepting = False
        for conn in list(self.transport.connections):
            conn.abort(1006, "")
        self._stopping.set()
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()

    async def _shutdown(self) -> None:
        """Stop taking actions, finish the queued ones, checkpoint, close with 1001."""
        with trio.move_on_after(4.5) as scope:
            self.dispatcher.accepting = False
            while self.dispatcher.receive_channel.statistics().current_buffer_used:
                await trio.sleep(0.01)
            await _await_all(self.registry.pm.hook.shutdown(host=self.api))
            await self.saver.flush()
            self.transport.close_all()
            with trio.move_on_after(0.5):
                while self.transport.connections:
                    await trio.sleep(0.01)
        if scope.cancelled_caught:
            log.error("shutdown took too long; stopping anyway")


class _Submit:
    """The dispatcher as the transport's ``Submitter`` (host/messages.py)."""

    def __init__(self, dispatcher: Dispatcher) -> None:
        self._dispatcher = dispatcher

    @property
    def accepting(self) -> bool:
        return self._dispatcher.accepting

    def applies_now(self, item: Request | Disconnect) -> bool:
        return self._dispatcher.applies_now

    async def put(self, item: Request | Disconnect) -> None:
        await self._dispatcher.put(item)


def _state(records: dict[str, Any], session: Session) -> str:
    """A session's state as the journaled record has it: the one source of truth."""
    record = records.get(session.id)
    return record["state"] if record is not None else State.CLOSED.value


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
