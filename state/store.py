"""The SQLite store: one file in WAL mode, one connection, one writer.

Tables: ``meta`` (format version, generation, world id, checkpoint position),
``slices`` (one row per slice: version, and the value of small slices),
``records`` (one row per record of keyed slices), ``journal`` (actions
applied since the last checkpoint), ``session_runtime`` (what the host
keeps per session beside the world: seq and remembered replies), and the
outbound log: ``outbound_data`` (each signal this store's writer sent, once
however many sessions it went to) and ``outbound`` (each session's ``seq`` ->
that signal), committed with the journal entry that produced them.

Python's bundled SQLite (3.40 here) has the WAL-reset bug that needs two
connections writing or checkpointing at once, so the store never opens a
second connection while it is open. All writes are explicit transactions.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import os
import shutil
import sqlite3
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import sqlite_utils

from state.codec import canonical, encode_cbor, load_stored

log = logging.getLogger("worldhost.store")

FORMAT_VERSION = 2  # 2: journal rows carry replay memos and the sessions' next seq


_ROWS_PER_INSERT = 200  # 9 values a row, well under SQLite's limit on bound values


@functools.lru_cache(maxsize=_ROWS_PER_INSERT)
def _insert_rows(count: int) -> str:
    return ("INSERT INTO journal (id, action, params, at, session, request_id, memo, seqs, out) "
            "VALUES " + ", ".join(["(?, ?, ?, ?, ?, ?, ?, ?, ?)"] * count))


@functools.lru_cache(maxsize=_ROWS_PER_INSERT)
def _insert_outbound_data(count: int) -> str:
    return ("INSERT OR IGNORE INTO outbound_data (pos, at, signal, data) VALUES "
            + ", ".join(["(?, ?, ?, ?)"] * count))


@functools.lru_cache(maxsize=_ROWS_PER_INSERT)
def _insert_outbound(count: int) -> str:
    return ("INSERT OR IGNORE INTO outbound (session, seq, pos, re) VALUES "
            + ", ".join(["(?, ?, ?, ?)"] * count))


@functools.lru_cache(maxsize=16)
def _upsert_records(count: int) -> str:
    return ("INSERT INTO records (slice, key, value) VALUES "
            + ", ".join(["(?, ?, ?)"] * count)
            + " ON CONFLICT (slice, key) DO UPDATE SET value = excluded.value")


def _chunks(items: list[Any]) -> list[list[Any]]:
    """Statements of many rows each: the writer thread then takes Python's lock back once
    per statement rather than once per row. Most chunks are full, so few SQL texts."""
    return [items[i:i + _ROWS_PER_INSERT] for i in range(0, len(items), _ROWS_PER_INSERT)]


class StoreError(Exception):
    """The store cannot be used."""


class StoreUnreadable(StoreError):
    """The file is not a readable worldhost store (corrupt, truncated, garbage)."""


class StoreTooNew(StoreError):
    """The file was written by a newer store format; it is left untouched."""


class StoreFailed(StoreError):
    """The store can no longer keep what the host acknowledges: the host must stop."""


class StoreFull(StoreFailed):
    """The disk (or the file size limit) is full: nothing more can be written."""


class StoreLost(StoreFailed):
    """The file the host opened is no longer the file at its path (deleted, replaced):
    whatever is written to it now is gone at the next start."""


def is_busy(exc: BaseException) -> bool:
    """Another connection holds the file's write lock (SQLITE_BUSY)."""
    return (isinstance(exc, sqlite3.OperationalError)
            and (getattr(exc, "sqlite_errorcode", 0) or 0) & 0xFF == sqlite3.SQLITE_BUSY)


def is_full(exc: BaseException) -> bool:
    """A write failed for want of space (SQLite's SQLITE_FULL, or ENOSPC/EFBIG)."""
    if isinstance(exc, sqlite3.Error):
        return (getattr(exc, "sqlite_errorcode", 0) or 0) & 0xFF == sqlite3.SQLITE_FULL
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)


def full_error(path: str, exc: BaseException) -> StoreFull:
    return StoreFull(f"the disk is full: cannot write the store {os.path.abspath(path)} ({exc})")


@dataclass
class JournalEntry:
    """One applied world-changing action, as journaled."""

    id: int
    action: str
    params: bytes  # canonical CBOR
    at: float
    session: str | None
    request_id: bytes | None  # CBOR of the id, None when the request had none
    memo: bytes | None = None  # CBOR of what the handler kept to replay faster (Context.memo)


@dataclass
class SliceChange:
    """What changed in one slice since the last checkpoint, already encoded."""

    version: int
    keyed: bool
    value: bytes | None = None  # value slices
    upserts: dict[str, bytes] = field(default_factory=dict)
    deletes: list[str] = field(default_factory=list)
    replaced: bool = False  # keyed: drop every stored record first


@dataclass
class OutboundRows:
    """Signals as sent, for the outbound log: each payload once (``data``: pos, at,
    signal name, CBOR of its data) and each session's seq of it (``seqs``: session,
    seq, pos, CBOR of ``[re]`` for a reply, else None)."""

    data: list[tuple[int, float, str, bytes]] = field(default_factory=list)
    seqs: list[tuple[str, int, int, bytes | None]] = field(default_factory=list)
    taken: list[Any] = field(default_factory=list)  # what the writer gives back if not written

    def __bool__(self) -> bool:
        return bool(self.seqs)


@dataclass
class LogTrim:
    """What a checkpoint drops from the outbound log: payloads sent before ``before``
    (wall-clock seconds), and per session every seq below its floor."""

    before: float
    floors: dict[str, int] = field(default_factory=dict)


# one logged signal read back: (session, seq, at, signal name, CBOR data, CBOR [re] | None)
LoggedSignal = tuple[str, int, float, str, bytes, "bytes | None"]


@dataclass
class Loaded:
    """Everything read back from a store at startup."""

    generation: int
    world_id: str | None
    checkpoint_id: int
    slices: dict[str, tuple[int, bool, Any]]  # name -> (version, keyed, value blob | {key: blob})
    journal: list[JournalEntry]
    runtime: dict[str, tuple[int, bytes | None]]  # session id -> (next_seq, saved runtime)
    clean_shutdown: bool
    outbound: list[LoggedSignal] = field(default_factory=list)  # by session, then seq
    next_pos: int = 1  # the outbound log's next payload position


# Added to format 2 in place (an older host ignores the tables): the outbound log.
OUTBOUND_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbound_data (pos INTEGER PRIMARY KEY, at REAL NOT NULL,
    signal TEXT NOT NULL, data BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS outbound (session TEXT NOT NULL, seq INTEGER NOT NULL,
    pos INTEGER NOT NULL, re BLOB, PRIMARY KEY (session, seq)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS outbound_by_pos ON outbound (pos);
"""

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS slices (name TEXT PRIMARY KEY, version INTEGER NOT NULL,
    keyed INTEGER NOT NULL, value BLOB) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS records (slice TEXT NOT NULL, key TEXT NOT NULL, value BLOB NOT NULL,
    PRIMARY KEY (slice, key)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS journal (id INTEGER PRIMARY KEY, action TEXT NOT NULL,
    params BLOB NOT NULL, at REAL NOT NULL, session TEXT, request_id BLOB, memo BLOB,
    seqs BLOB, out BLOB);
CREATE TABLE IF NOT EXISTS session_runtime (id TEXT PRIMARY KEY, next_seq INTEGER NOT NULL,
    value BLOB) WITHOUT ROWID;
""" + OUTBOUND_SCHEMA


def quarantine(path: str | os.PathLike[str]) -> Path:
    """Move a store and its -wal/-shm files aside as NAME.corrupt-TIMESTAMP; never delete."""
    base = Path(path)
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    target = base.with_name(f"{base.name}.corrupt-{stamp}")
    n = 1
    while target.exists():
        n += 1
        target = base.with_name(f"{base.name}.corrupt-{stamp}-{n}")
    for suffix in ("", "-wal", "-shm"):
        src = Path(str(base) + suffix)
        if src.exists():
            src.rename(Path(str(target) + suffix))
    return target


WAL_SIZE_LIMIT = 8 << 20

_SHM_HEADER = struct.Struct("<3I2B H 2I 8s 8s 8s")  # SQLite's WalIndexHdr, native order
_WAL_VERSION = 3007000


@dataclass
class WalIndex:
    """The header of a WAL's index (the -shm file): how many frames were committed,
    with which salt, and how many of them are already copied into the database."""

    committed: int
    salt: bytes
    backfilled: int
    raw: bytes  # the whole index file, to keep beside a damaged WAL

    @classmethod
    def read(cls, path: str, keep: list[int] | None = None) -> WalIndex | None:
        """The index as the file holds it now. Once SQLite has the store open, pass
        ``keep``: the descriptor read through goes there, to be closed only after
        SQLite's connection (closing any descriptor of the index file would drop the
        POSIX locks SQLite holds on it, by which other connections tell it is in use)."""
        try:
            fd = os.open(path + "-shm", os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return None  # a clean close removes it (and the WAL)
        try:
            raw = b"".join(iter(lambda: os.read(fd, 1 << 16), b""))
        finally:
            if keep is None:
                os.close(fd)
            else:
                keep.append(fd)
        size = _SHM_HEADER.size
        if len(raw) < 2 * size + 4 or raw[:size] != raw[size:2 * size]:
            return None
        version, _, _, is_init, _, _, committed, _, _, salt, _ = _SHM_HEADER.unpack(raw[:size])
        if version != _WAL_VERSION or not is_init:
            return None
        backfilled = struct.unpack("<I", raw[2 * size:2 * size + 4])[0]  # WalCkptInfo.nBackfill
        return cls(committed, salt, backfilled, raw)


@dataclass
class WalDamage:
    """What a store's WAL should have held (by its index) and SQLite could not read."""

    committed_frames: int  # frames the index said were committed
    readable_frames: int  # how many of them SQLite read back, or found in the database file
    reason: str
    copy: str | None = None  # where the WAL (and its index) were copied to

    def report(self) -> dict[str, Any]:
        return {"wal_damaged": self.reason, "wal_frames_lost":
                self.committed_frames - self.readable_frames, "wal_copy": self.copy}


def check_wal(path: str, before: WalIndex | None, wal_existed: bool,
              keep: list[int]) -> WalDamage | None:
    """Once SQLite has opened a store (and rebuilt the WAL's index from the WAL, which
    it does when no other connection has it open) and before anything is written:
    did it read every frame the index left behind by the last host said was committed?

    SQLite reads a WAL up to its first bad frame, drops the rest in silence, and
    writes over it with the next commit; so a truncated, garbled or deleted WAL would
    cost acknowledged actions without a word. When it does, the WAL and the old
    index are copied aside first (never deleted), and the damage is reported.
    """
    if before is None or before.committed <= before.backfilled:
        return None  # nothing in the WAL that the database file does not hold
    after = WalIndex.read(path, keep)  # (``keep``: see WalIndex.read)
    read = after.committed if after is not None and after.salt == before.salt else 0
    readable = max(read, before.backfilled)
    if readable >= before.committed:
        return None
    reason = ("the WAL file is missing" if not wal_existed
              else "the WAL is truncated or damaged")
    damage = WalDamage(before.committed, readable, reason)
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    copy = Path(f"{path}-wal.damaged-{stamp}")
    n = 1
    while copy.exists() or Path(f"{copy}-shm").exists():
        n += 1
        copy = Path(f"{path}-wal.damaged-{stamp}-{n}")
    try:
        if wal_existed and os.path.exists(path + "-wal"):
            shutil.copyfile(path + "-wal", copy)
        Path(f"{copy}-shm").write_bytes(before.raw)
    except OSError as exc:
        if is_full(exc):
            raise full_error(str(copy), exc) from None
        raise
    damage.copy = str(copy)
    return damage


def _close(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)


@contextlib.contextmanager
def _full_said(path: str) -> Iterator[None]:
    """A full disk under a write, said in one line naming the file."""
    try:
        yield
    except sqlite3.Error as exc:
        if is_full(exc):
            raise full_error(path, exc) from None
        raise


class Store:
    """The one connection to one store file. Not safe for concurrent use: the
    saver calls it from one task at a time (on its writer thread)."""

    def __init__(self, conn: sqlite3.Connection, path: str) -> None:
        self.conn = conn
        self.db = sqlite_utils.Database(conn)
        self.path = path
        self.marked_clean = True  # meta says clean_shutdown = 1 (or may; set it to be sure)
        self.wal_damage: WalDamage | None = None  # what check_wal found before opening
        self.lost: str | None = None  # why the open file is no longer the store at path
        self._watched: list[tuple[str, int, int, int]] = []  # (path, fd, st_dev, st_ino)
        self._held: list[int] = []  # descriptors to close only after the connection
        self.busy_timeout_ms = 5000
        self.has_outbound = True  # the outbound log's tables (an old store read offline: no)

    @classmethod
    def open(cls, path: str | os.PathLike[str], synchronous: str = "NORMAL",
             busy_timeout_ms: int = 5000) -> Store:
        """Open (creating if missing) and check a store.

        Raises StoreUnreadable for anything that is not a healthy store of
        ours, StoreTooNew for a newer format, StoreFull when the disk is full.
        """
        path = str(path)
        index, wal_existed = None, False
        if path != ":memory:":
            try:
                Path(path).parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                if is_full(exc):
                    raise full_error(path, exc) from None
                raise
            if os.path.exists(path) and os.path.getsize(path) == 0:
                raise StoreUnreadable(f"{path} is an empty (zero-byte) file")
            # what the last host's WAL index says, before SQLite rebuilds it
            index = WalIndex.read(path)
            wal_existed = os.path.exists(path + "-wal")
        try:
            conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        except sqlite3.Error as exc:
            raise StoreUnreadable(f"{path}: {exc}") from None
        held: list[int] = []
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if path != ":memory:" and mode.lower() != "wal":
                raise StoreUnreadable(f"{path}: could not switch to WAL mode ({mode})")
            conn.execute(f"PRAGMA synchronous = {synchronous}")
            # a commit never copies the WAL back into the file (that waits on the disk,
            # and commits may run in the event loop): each checkpoint does, on its thread
            conn.execute("PRAGMA wal_autocheckpoint = 0")
            conn.execute(f"PRAGMA journal_size_limit = {WAL_SIZE_LIMIT}")  # the WAL, once reset
            check_rows = conn.execute("PRAGMA quick_check").fetchall()
            if check_rows != [("ok",)]:
                raise StoreUnreadable(f"{path}: quick_check failed: {check_rows[0][0]}")
            store = cls(conn, path)
            store._held = held
            store.busy_timeout_ms = int(busy_timeout_ms)
            store.wal_damage = check_wal(path, index, wal_existed, held)
            store._check_format()
            if path != ":memory:":
                store._watch(path, path + "-wal")
            return store
        except sqlite3.Error as exc:
            conn.close()
            _close(held)
            if is_full(exc):
                raise full_error(path, exc) from None
            raise StoreUnreadable(f"{path}: {exc}") from None
        except StoreError:
            conn.close()
            _close(held)
            raise

    def _watch(self, *paths: str) -> None:
        for path in paths:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            st = os.fstat(fd)
            self._watched.append((path, fd, st.st_dev, st.st_ino))

    def check_identity(self, by_path: bool = False) -> None:
        """Raise StoreLost if the store's files were deleted or replaced under the host.

        After every commit, before anything waiting on it is released: one ``fstat``
        of the database and of the WAL this connection writes (a link count of 0: the
        file was deleted, or another moved over it; a replaced WAL counts too, SQLite
        keeps writing the one it opened, which nothing reads after a restart).
        ``by_path`` (each checkpoint) also compares the file at each path, which
        catches a file replaced while another name (a hard link) still holds it."""
        if self.lost is None:
            for path, fd, dev, ino in self._watched:
                if os.fstat(fd).st_nlink == 0:
                    self.lost = f"{path} was deleted, or another file moved over it"
                    break
                if by_path:
                    try:
                        st = os.stat(path)
                    except FileNotFoundError:
                        self.lost = f"{path} was deleted"
                        break
                    if (st.st_dev, st.st_ino) != (dev, ino):
                        self.lost = f"{path} was replaced by another file"
                        break
            else:
                return
            log.critical("STORE LOST: %s while the host had it open; nothing written from "
                         "now on would survive a restart, so nothing more is acknowledged "
                         "and the host stops", self.lost)
        raise StoreLost(f"the store is lost: {self.lost}")

    def _unwatch(self) -> None:
        """After the connection closed (closing another descriptor of the database file
        or its index first would drop SQLite's POSIX locks on it)."""
        _close([fd for _, fd, _, _ in self._watched] + self._held)
        self._watched, self._held = [], []

    def patient(self, patient: bool) -> None:
        """Wait for a busy file (``busy_timeout_ms``) or fail at once: a commit in the
        event loop must never wait, the writer thread may."""
        self.conn.execute(f"PRAGMA busy_timeout = {self.busy_timeout_ms if patient else 0}")

    def _check_format(self) -> None:
        tables = set(self.db.table_names())
        if not tables:
            self.conn.execute("BEGIN IMMEDIATE")
            for statement in SCHEMA.split(";"):
                if statement.strip():
                    self.conn.execute(statement)
            self.conn.executemany("INSERT INTO meta (key, value) VALUES (?, ?)",
                                  [("format_version", FORMAT_VERSION), ("generation", 0),
                                   ("checkpoint_id", 0), ("clean_shutdown", 1)])
            self.conn.execute("COMMIT")
            return
        if "meta" not in tables:
            raise StoreUnreadable(f"{self.path}: not a worldhost store (no meta table)")
        row = self.conn.execute("SELECT value FROM meta WHERE key = 'format_version'").fetchone()
        if row is None or not isinstance(row[0], int):
            raise StoreUnreadable(f"{self.path}: not a worldhost store (no format version)")
        if row[0] > FORMAT_VERSION:
            raise StoreTooNew(
                f"{self.path} was written by store format {row[0]}; this worldhost reads "
                f"format {FORMAT_VERSION} and older: upgrade worldhost to open it")
        missing = {"meta", "slices", "records", "journal", "session_runtime"} - tables
        if missing:
            raise StoreUnreadable(f"{self.path}: missing tables {sorted(missing)}")
        if row[0] < 2:  # format 1 kept seqs in session_runtime only, and had no memos
            self.conn.execute("BEGIN IMMEDIATE")
            self.conn.execute("ALTER TABLE journal ADD COLUMN memo BLOB")
            self.conn.execute("ALTER TABLE journal ADD COLUMN seqs BLOB")
            self.conn.execute("UPDATE meta SET value = 2 WHERE key = 'format_version'")
            self.conn.execute("COMMIT")
        if "outbound" not in tables or "outbound_data" not in tables:
            if self.conn.in_transaction:  # an offline tool's read (mode=ro): none to read
                self.has_outbound = False
                return
            self.conn.execute("BEGIN IMMEDIATE")
            for statement in OUTBOUND_SCHEMA.split(";"):
                if statement.strip():
                    self.conn.execute(statement)
            columns = {r[1] for r in self.conn.execute("PRAGMA table_info(journal)")}
            if "out" not in columns:
                self.conn.execute("ALTER TABLE journal ADD COLUMN out BLOB")
            self.conn.execute("COMMIT")

    # reading -------------------------------------------------------------
    def meta(self, key: str, default: Any = None) -> Any:
        row = self.conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return default if row is None else row[0]

    def load(self) -> Loaded:
        """Read the last checkpoint, the journal after it, and session runtime."""
        try:
            slices: dict[str, tuple[int, bool, Any]] = {}
            for name, version, keyed, value in self.conn.execute(
                    "SELECT name, version, keyed, value FROM slices"):
                slices[name] = (version, bool(keyed), {} if keyed else value)
            for name, key, value in self.conn.execute("SELECT slice, key, value FROM records"):
                if name in slices and slices[name][1]:
                    slices[name][2][key] = value
            checkpoint_id = int(self.meta("checkpoint_id", 0))
            runtime = {sid: (seq, value) for sid, seq, value in self.conn.execute(
                "SELECT id, next_seq, value FROM session_runtime")}
            journal = []
            for *fields, seqs in self.conn.execute(
                    "SELECT id, action, params, at, session, request_id, memo, seqs FROM journal "
                    "WHERE id > ? ORDER BY id", (checkpoint_id,)):
                journal.append(JournalEntry(*fields))
                for sid, seq in (load_stored(seqs) if seqs else {}).items():
                    old_seq, value = runtime.get(sid, (0, None))
                    runtime[sid] = (max(old_seq, seq), value)
            outbound = self.outbound_rows()
            last_pos = max([0] + [pos for rows in self._journaled_outbound()
                                  for pos, *_ in rows.data])
            if self.has_outbound:
                last_pos = max(last_pos, self.conn.execute(
                    "SELECT max(pos) FROM outbound_data").fetchone()[0] or 0)
            return Loaded(
                outbound=outbound, next_pos=last_pos + 1,
                generation=int(self.meta("generation", 0)),
                world_id=self.meta("world_id"),
                checkpoint_id=checkpoint_id,
                slices=slices,
                journal=journal,
                runtime=runtime,
                clean_shutdown=bool(self.meta("clean_shutdown", 1)),
            )
        except sqlite3.Error as exc:
            if is_full(exc):
                raise full_error(self.path, exc) from None
            raise StoreUnreadable(f"{self.path}: {exc}") from None
        except (ValueError, TypeError) as exc:
            raise StoreUnreadable(f"{self.path}: {exc}") from None

    def _journaled_outbound(self, upto: int | None = None) -> list[OutboundRows]:
        """The outbound rows that rode journal commits (all, or up to entry ``upto``)."""
        if not self.has_outbound:
            return []
        query = "SELECT out FROM journal WHERE out IS NOT NULL"
        args: tuple[Any, ...] = ()
        if upto is not None:
            query, args = query + " AND id <= ?", (upto,)
        return [OutboundRows(*load_stored(blob)) for (blob,) in self.conn.execute(query, args)]

    def outbound_rows(self) -> list[LoggedSignal]:
        """Every signal the outbound log holds (its tables and the journal), by
        session and seq."""
        if not self.has_outbound:
            return []
        found = {(sid, seq): (sid, seq, at, signal, data, re) for sid, seq, at, signal, data, re
                 in self.conn.execute(
                     "SELECT o.session, o.seq, d.at, d.signal, d.data, o.re FROM outbound o "
                     "JOIN outbound_data d ON d.pos = o.pos")}
        for rows in self._journaled_outbound():
            data = {pos: (at, signal, blob) for pos, at, signal, blob in rows.data}
            for sid, seq, pos, re in rows.seqs:
                found.setdefault((sid, seq), (sid, seq, *data[pos], re))
        return [found[key] for key in sorted(found)]

    def outbound_export(self) -> OutboundRows:
        """The whole outbound log, as rows another store can adopt."""
        rows = OutboundRows(
            self.conn.execute("SELECT pos, at, signal, data FROM outbound_data").fetchall(),
            self.conn.execute("SELECT session, seq, pos, re FROM outbound").fetchall())
        for more in self._journaled_outbound():
            rows.data += more.data
            rows.seqs += more.seqs
        return rows

    @contextlib.contextmanager
    def _writing(self) -> Iterator[sqlite3.Connection]:
        """One write transaction (rolled back on any failure; a full disk said so in
        one line), then the check that the file is still this store's."""
        c = self.conn
        with _full_said(self.path):
            c.execute("BEGIN IMMEDIATE")
            try:
                yield c
                c.execute("COMMIT")
            except BaseException:
                if c.in_transaction:  # a busy BEGIN never began
                    c.execute("ROLLBACK")
                raise
        self.check_identity()

    def drop_slices(self, names: list[str]) -> None:
        """Delete slices (rows and records) this store no longer keeps, at once."""
        with self._writing() as c:
            for name in names:
                c.execute("DELETE FROM slices WHERE name = ?", (name,))
                c.execute("DELETE FROM records WHERE slice = ?", (name,))

    def journal_length(self) -> int:
        return self.conn.execute("SELECT count(*) FROM journal").fetchone()[0]

    # writing -------------------------------------------------------------
    def append(self, entries: list[JournalEntry], seqs: dict[str, int],
               outbound: OutboundRows | None = None) -> None:
        """Commit journal entries, the next seq of the sessions they signal, and the
        signals they send (the outbound log), at once.

        The seqs and the outbound rows ride on the batch's last row (a checkpoint
        moves the rows to the log's tables), so a batch is usually one INSERT
        statement and its own transaction: one page of the WAL, and the writer
        thread gives up and takes back Python's lock once per commit instead of
        once per statement. Outbound rows without entries get a transaction.
        """
        rows: list[tuple[Any, ...]] = [
            (e.id, e.action, e.params, e.at, e.session, e.request_id, e.memo, None, None)
            for e in entries]
        if rows and (seqs or outbound):
            rows[-1] = (*rows[-1][:-2], canonical(seqs) if seqs else None,
                        encode_cbor([outbound.data, outbound.seqs]) if outbound else None)
            outbound = None
        if self.lost is not None:
            self.check_identity()
        if not self.marked_clean and len(rows) <= _ROWS_PER_INSERT and not outbound:
            with _full_said(self.path):  # one statement: its own transaction
                self.conn.execute(_insert_rows(len(rows)), [v for row in rows for v in row])
            self.check_identity()
            return
        with self._writing() as c:
            for chunk in _chunks(rows):
                c.execute(_insert_rows(len(chunk)), [v for row in chunk for v in row])
            if outbound:
                self._insert_outbound(outbound)
            if self.marked_clean and rows:  # the journal holds what no checkpoint does
                c.execute("UPDATE meta SET value = 0 WHERE key = 'clean_shutdown'")
                self.marked_clean = False

    def _insert_outbound(self, outbound: OutboundRows) -> None:
        c = self.conn
        for chunk in _chunks(outbound.data):
            c.execute(_insert_outbound_data(len(chunk)), [v for row in chunk for v in row])
        for chunk in _chunks(outbound.seqs):
            c.execute(_insert_outbound(len(chunk)), [v for row in chunk for v in row])

    def adopt_outbound(self, outbound: OutboundRows) -> None:
        """Take another store's outbound log (a world's, as it unloads), in one commit;
        a (session, seq) already held is kept."""
        with self._writing():
            self._insert_outbound(outbound)

    def checkpoint(self, changes: dict[str, SliceChange], last_id: int,
                   runtime: dict[str, tuple[int, bytes]], ended_sessions: list[str],
                   meta: dict[str, Any] | None = None, clean: bool = False,
                   trim: LogTrim | None = None, outbound: OutboundRows | None = None) -> int:
        """Write what changed, move the generation on, drop the covered journal; log
        ``outbound`` signals and drop what ``trim`` says of the outbound log; ``meta``
        keys (the world id, what was running) are written with it."""
        self.check_identity(by_path=True)
        with _full_said(self.path):
            generation = self._checkpoint(changes, last_id, runtime, ended_sessions, meta or {},
                                          clean, trim, outbound)
        self.check_identity(by_path=True)
        return generation

    def _checkpoint(self, changes: dict[str, SliceChange], last_id: int,
                    runtime: dict[str, tuple[int, bytes]], ended_sessions: list[str],
                    meta: dict[str, Any], clean: bool, trim: LogTrim | None = None,
                    outbound: OutboundRows | None = None) -> int:
        c = self.conn
        c.execute("BEGIN IMMEDIATE")
        try:
            rode = self._journaled_outbound(last_id)  # the journal it covers goes
            if rode:  # as one set of rows: full statements, not two per commit
                self._insert_outbound(OutboundRows([d for r in rode for d in r.data],
                                                   [s for r in rode for s in r.seqs]))
            for name, ch in changes.items():
                c.execute(
                    "INSERT INTO slices (name, version, keyed, value) VALUES (?, ?, ?, ?) "
                    "ON CONFLICT (name) DO UPDATE SET version = excluded.version, "
                    "keyed = excluded.keyed, value = excluded.value",
                    (name, ch.version, int(ch.keyed), ch.value))
                if ch.replaced or not ch.keyed:
                    c.execute("DELETE FROM records WHERE slice = ?", (name,))
                for keys in _chunks(ch.deletes):
                    c.execute(f"DELETE FROM records WHERE slice = ? AND key IN "
                              f"({', '.join('?' * len(keys))})", [name, *keys])
                for rows in _chunks(list(ch.upserts.items())):
                    c.execute(_upsert_records(len(rows)),
                              [v for key, blob in rows for v in (name, key, blob)])
            if runtime:
                c.executemany(
                    "INSERT INTO session_runtime (id, next_seq, value) VALUES (?, ?, ?) "
                    "ON CONFLICT (id) DO UPDATE SET next_seq = excluded.next_seq, "
                    "value = excluded.value",
                    [(sid, seq, value) for sid, (seq, value) in runtime.items()])
            if ended_sessions:
                c.executemany("DELETE FROM session_runtime WHERE id = ?",
                              [(s,) for s in ended_sessions])
                c.executemany("DELETE FROM outbound WHERE session = ?",
                              [(s,) for s in ended_sessions])
            if outbound:
                self._insert_outbound(outbound)
            if trim is not None:
                self._trim_outbound(trim)
            c.execute("DELETE FROM journal WHERE id <= ?", (last_id,))
            generation = int(self.meta("generation", 0)) + 1
            updates: list[tuple[str, Any]] = [("generation", generation), ("checkpoint_id", last_id),
                       ("clean_shutdown", int(clean))]
            updates += [(k, v) for k, v in meta.items() if v is not None]
            c.executemany(
                "INSERT INTO meta (key, value) VALUES (?, ?) "
                "ON CONFLICT (key) DO UPDATE SET value = excluded.value", updates)
            c.execute("COMMIT")
        except BaseException:
            if c.in_transaction:  # a busy BEGIN never began
                c.execute("ROLLBACK")
            raise
        self.marked_clean = clean
        c.execute("PRAGMA wal_checkpoint(PASSIVE)")
        return generation

    def _trim_outbound(self, trim: LogTrim) -> None:
        """Drop what the bounds let go: per session the seqs below its floor, then
        everything sent before ``trim.before``, then payloads no session refers to
        (positions only grow, so those are the ones below the lowest still used)."""
        c = self.conn
        if trim.floors:
            c.executemany("DELETE FROM outbound WHERE session = ? AND seq < ?",
                          list(trim.floors.items()))
        past_end = (c.execute("SELECT max(pos) FROM outbound_data").fetchone()[0] or 0) + 1
        # positions grow with time: the first young one is near the start (no index on at)
        row = c.execute("SELECT pos FROM outbound_data WHERE at >= ? ORDER BY pos LIMIT 1",
                        (trim.before,)).fetchone()
        first_kept = row[0] if row is not None else None
        c.execute("DELETE FROM outbound WHERE pos < ?",
                  (first_kept if first_kept is not None else past_end,))
        lowest = c.execute("SELECT min(pos) FROM outbound").fetchone()[0]
        c.execute("DELETE FROM outbound_data WHERE pos < ?",
                  (lowest if lowest is not None else past_end,))

    def close(self, truncate: bool = True) -> None:
        """Close the connection; a clean close folds the WAL back into the file (not
        into a file that is no longer the store: SQLite itself then leaves the file
        now at the path, and its WAL, alone)."""
        try:
            if truncate and self.lost is None:
                self.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except sqlite3.Error as exc:  # a full disk: the WAL keeps it, the next start reads it
            log.warning("store %s: the WAL was not folded back into the file: %s", self.path, exc)
        finally:
            self.conn.close()
            self._unwatch()

    def abandon(self) -> None:
        """Drop the connection as a crash would: nothing uncommitted survives."""
        try:
            if self.conn.in_transaction:
                self.conn.execute("ROLLBACK")
        finally:
            self.conn.close()
            self._unwatch()
