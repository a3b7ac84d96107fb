"""Offline tools on a store file: ``inspect``, ``export`` and ``import``.

They load the store the way the host does (same load, migration and journal
replay) and never quarantine: a store they cannot read is reported, not moved.
``inspect`` and ``export`` only read: they open the file read-only (``mode=ro``),
without the host's lock, and read it in one transaction, so they work on a store
a running host is writing (WAL readers see the last commit) and see one
consistent cut of it. ``import`` writes, so it takes the lock and refuses a file
a running host holds.
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import trio

from host import config as config_mod
from host.actions import ActionError
from host.server import Server, StartupError
from host.world import World
from host.worlds import server_db_path
from state.codec import decode_cbor, decode_json, encode_cbor, encode_json
from state.store import FORMAT_VERSION, Store, StoreError

FORMAT = "worldhost-world"
HOST_OWNED = ("host", "sessions")


class OfflineError(Exception):
    """The tool cannot do what was asked; the message says why."""


def run(args: argparse.Namespace) -> int:
    if args.command != "import" and not Path(args.db).exists():
        raise OfflineError(f"{args.db}: no such file")
    return {"inspect": inspect, "export": export, "import": import_}[args.command](args)


def _server(db: str, config_path: str | None = None) -> Server:
    cfg = config_mod.load(config_path) if config_path else config_mod.Config()
    return Server(cfg, db=db)


@contextmanager
def _reading(db: str, scope: str = "world") -> Iterator[World]:
    """The world (or, with scope "server", the server's own store) at ``db`` loaded
    as ``World.open`` loads it, but read-only and without the lock: the connection
    is ``mode=ro`` and holds one read transaction for the whole use, so every read
    sees the same commit even while a running server appends to the journal."""
    server = _server(db)
    registry = server.registry
    host = World("main", "main", db, scope=scope, config=server.config, registry=registry,
                 sessions=server.sessions, gate=server.gate, clock=server.clock,
                 threads=False)
    # a store from before worlds keeps the sessions too: read them as they are
    host.specs = {**host.specs, "sessions": registry.slices["sessions"]}
    host.actions = dict(registry.actions)
    uri = "file:" + urllib.parse.quote(str(Path(db).resolve())) + "?mode=ro"
    try:
        conn = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False)
    except sqlite3.Error as exc:
        raise OfflineError(f"{db}: {exc}") from None
    try:
        conn.execute(f"PRAGMA busy_timeout = {host.config.store.busy_timeout_ms}")
        conn.execute("BEGIN")  # deferred: the snapshot is taken at the first read, kept to the end
        store = Store(conn, db)
        _check_readable(store)
        if scope == "world" and store.conn.execute(
                "SELECT 1 FROM slices WHERE name = 'worlds'").fetchone() is not None:
            # the server's own store (DB.server.db): read it as the server does
            host = World("server", "server", db, scope="server", config=server.config,
                         registry=registry, sessions=server.sessions, gate=server.gate,
                         clock=server.clock, threads=False)
        host.read_only = True
        host.store = store
        # World.open without the lock, the quick_check and the format upgrade (writes)
        host._load(store.load())
        yield host
    except sqlite3.Error as exc:
        raise OfflineError(f"{db}: {exc}") from None
    except (StoreError, StartupError) as exc:
        raise OfflineError(str(exc)) from None
    finally:
        if host.saver is not None:
            host.saver.close()
        host.store = None
        conn.close()  # ends the read transaction; nothing was written


def _check_readable(store: Store) -> None:
    """What ``Store.open`` checks, without writing: a store of ours, in a format this
    version reads without upgrading it."""
    tables = {row[0] for row in store.conn.execute(
        "SELECT name FROM sqlite_master WHERE type = 'table'")}
    if "meta" not in tables:
        raise OfflineError(f"{store.path}: not a worldhost store (no meta table)")
    version = store.meta("format_version")
    if isinstance(version, int) and version < FORMAT_VERSION:
        raise OfflineError(f"{store.path} is store format {version}: start worldhost on it "
                           f"once (or run worldhost import) to upgrade it to format "
                           f"{FORMAT_VERSION}, then read it")
    store._check_format()  # the remaining checks only read when the format is current


def inspect(args: argparse.Namespace) -> int:
    print(json.dumps(trio.run(_inspect, args.db), indent=2))
    return 0


async def _inspect(db: str) -> dict[str, Any]:
    sessions = _sessions_of(db)
    with _reading(db) as host:  # in trio.run: replaying the journal reads trio's clock
        store = host.store
        assert store is not None
        rows = store.conn.execute(
            "SELECT s.name, s.version, s.keyed, length(s.value), count(r.key), "
            "coalesce(sum(length(r.value)), 0) FROM slices s "
            "LEFT JOIN records r ON r.slice = s.name GROUP BY s.name ORDER BY s.name")
        slices = [{"name": name, "version": version, "keyed": bool(keyed),
                   "records": count if keyed else None,
                   "bytes": (record_bytes if keyed else value_bytes) or 0}
                  for name, version, keyed, value_bytes, count, record_bytes in rows]
        return {
            "file": db,
            "format_version": store.meta("format_version"),
            "reads_format": FORMAT_VERSION,
            "generation": store.meta("generation"),
            "world_id": host.slices["host"].data()["world_id"]
            if "host" in host.slices.slices else None,  # (None: the server's own store)
            "journal_length": store.journal_length(),
            "replayed": host.replayed,
            "slices": slices,
            "sessions": sessions if sessions is not None else _session_list(host),
        }


def _session_list(world: World) -> list[dict[str, Any]]:
    records = world.slices["sessions"].data() if "sessions" in world.slices.slices else {}
    return [{"id": s["id"], "name": s["name"], "role": s["role"], "state": s["state"]}
            for s in records.values()]


def _sessions_of(db: str) -> list[dict[str, Any]] | None:
    """The sessions, from the server's own store beside ``db`` (None if it has none yet:
    a store from before worlds keeps them itself)."""
    path = server_db_path(config_mod.Config(), db)
    if path == db or not Path(path).exists():
        return None
    with _reading(path, scope="server") as server:
        return _session_list(server)


def export(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if out.suffix not in (".json", ".cbor"):
        raise OfflineError("--out must end in .json or .cbor")
    async def main() -> dict[str, Any]:
        with _reading(args.db) as host:
            return world_document(host)

    document = trio.run(main)
    out.write_bytes(encode_json(document) if out.suffix == ".json" else encode_cbor(document))
    print(f"wrote {out} ({out.stat().st_size} bytes, generation {document['generation']})")
    return 0


def world_document(world: World) -> dict[str, Any]:
    """The whole world, as ``worldhost export`` writes it."""
    if world.scope == "server":
        raise OfflineError(f"{world.path} is the server's own store (sessions and the registry "
                           f"of worlds), not a world: export a world's store (--db, or "
                           f"worlds/ID.db beside it)")
    slices = {name: {"version": s.spec.version, "keyed": s.spec.keyed, "data": s.data()}
              for name, s in world.slices.slices.items() if name not in HOST_OWNED}
    return {"format": FORMAT, "version": 1, "world_id": world.slices["host"].data()["world_id"],
            "generation": world.generation, "slices": slices}


def _read(path: Path) -> Any:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise OfflineError(f"cannot read {path}: {exc.strerror}") from None
    try:
        return decode_cbor(data, max_depth=10_000) if path.suffix == ".cbor" else decode_json(data)
    except ValueError as exc:
        raise OfflineError(f"{path}: {exc}") from None


def import_(args: argparse.Namespace) -> int:
    document = _read(Path(args.file))

    async def main() -> dict[str, Any]:
        host = _server(args.db, args.config)
        async with trio.open_nursery() as nursery:
            try:
                await nursery.start(_serve_offline, host)
            except (StoreError, StartupError) as exc:
                raise OfflineError(str(exc)) from None
            try:
                return await apply_document(host, document)
            except ActionError as exc:
                raise OfflineError(f"{exc.code}: {exc.message}"
                                   + (f" ({exc.details})" if exc.details else "")) from None
            finally:
                host.stop()

    result = trio.run(main)
    print(json.dumps(result))
    return 0


async def _serve_offline(host: Server, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    await host.run(listen=False, run_plugins=False, task_status=task_status)


async def apply_document(host: Server, document: Any,
                         world_id: str | None = None) -> dict[str, Any]:
    """Apply an export to a world (the default one) through the live import actions
    (all or nothing each)."""
    submit = host.world(world_id).dispatcher.submit
    if isinstance(document, dict) and document.get("format") == FORMAT:
        slices = document.get("slices")
        if not isinstance(slices, dict):
            raise OfflineError("the export has no slices")
        result: dict[str, Any] = {}
        rest = dict(slices)
        hooks = host.world(world_id).hooks
        while (step := hooks.world_import(slices=rest)) is not None:
            if not set(step.covers) & set(rest):
                raise OfflineError(f"the import step {step.action} covers none of the slices "
                                   f"left ({', '.join(sorted(rest))})")
            result[step.action.partition(".")[0]] = await submit(step.action, step.params)
            rest = {n: v for n, v in rest.items() if n not in step.covers}
        if rest:
            result["slices"] = await submit("world.replace_slices", {"slices": rest})
        return result
    if isinstance(document, dict) and "state_data" in document:
        return await submit("simulation.import_state", {"state_data": document["state_data"]})
    if isinstance(document, dict) and {"graph", "agents", "packages", "metadata"} <= set(document):
        return await submit("simulation.import_state", {"state_data": document})
    if isinstance(document, dict) and "map_data" in document:
        return await submit("map.import", {"map_data": document["map_data"]})
    if isinstance(document, dict) and document and set(document) <= {"nodes", "edges"}:
        return await submit("map.import", {"map_data": document})  # a bare map_data
    raise OfflineError(
        "the file is none of: a worldhost export ({\"format\": \"worldhost-world\", ...}), "
        "a state_data ({graph, agents, packages, metadata}, bare or as {\"state_data\": ...}), "
        "a map_data ({nodes, edges}, bare or as {\"map_data\": ...})")


