"""The saver: group-committed journal and debounced checkpoints, on one writer.

Every output of the dispatcher passes through here in order. Outputs of a
world-changing action are released only after the transaction holding its
journal entry commits; the writer commits everything queued as soon as the
previous commit ends, so durability costs one commit per batch. Checkpoints
write the slices and records changed since the last one, debounced, and drop
the journal they cover. All SQLite work happens one call at a time, on the
store's single connection.

Checkpoints, and WAL checkpoints, wait on the disk, so they run on the store's
writer thread (see ``state.writer``). So do journal commits, by default
(``journal_commits = "thread"``): the moment the dispatcher has applied what is
queued (``commit_now``), the batch goes to the thread, and the loop waits for it
a moment (``COMMIT_WAIT_S``, with ``synchronous`` NORMAL or OFF). A commit in WAL
mode then copies a page or two into the operating system's cache and is done
within that, and a reply goes out in the same turn as its request. A commit
that takes longer (a frozen or busy disk, an fsync) goes on without the loop,
and holds only what waits for it. With ``journal_commits = "loop"`` (NORMAL or
OFF only) commits run in the loop itself, which saves the hand-off but lets a
write the kernel blocks hold every client.

A request its client sent with more right behind it (read together from the
socket) leaves the commit to the next (``commit_soon``): the writer task
commits what waited within ``COMMIT_SOON_S`` if the rest never comes.

A commit in the loop never waits for the file: it fails at once if another
process holds SQLite's write lock, and the writer thread retries it, waiting up
to ``busy_timeout_ms``. Meanwhile outputs that need no commit (replies to reads
and pings) go out at once, unless they go to a session a reply to which waits
for the commit: a client sees the replies to its requests in order.

With the outbound log on, the signals a commit releases are logged before they
go out: numbered (each session's ``seq``) and written with the journal entries,
so a session can be replayed what it missed after any restart. A session's
signals must go out in ``seq`` order, and a reply to a read never waits for a
commit of somebody else's (a busy or frozen disk holds only the writes), so
signals are numbered as late as that allows: in the loop, the commit numbers
them all, nothing running in between; on the writer thread, the commit numbers
those of the sessions whose own actions it holds (their other signals wait for
it anyway), and the others, to a broadcast's audience, are numbered once it is
done and written by a second, small commit before they are released. Signals
released without a commit (replies to reads and pings) are numbered as they go
and logged with the next commit, or by a small write of their own on the writer
thread within ``unlogged_s`` (a busy or frozen disk must not hold a read): after
a kill -9, those sent in that last moment are the only ones the log may lack,
and each is the reply to a request its client has not seen answered (and sends
again). A broadcast of an action that journaled nothing is logged before it
goes, as a journaled action's signals are.
"""

from __future__ import annotations

import _thread
import logging
import math
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import outcome
import trio

from state.codec import canonical
from state.slices import KeyedSlice, Slices, ValueSlice
from state.store import (
    JournalEntry,
    LogTrim,
    OutboundRows,
    SliceChange,
    Store,
    StoreFailed,
    is_busy,
)
from state.writer import WriterThread

log = logging.getLogger("worldhost.saver")

Release = Callable[[], None]
# a journal commit's signal counts per session -> each session's next seq once sent
SeqSource = Callable[[Counter[str]], dict[str, int]]
# for a checkpoint: (session id -> (next_seq, runtime blob), ids of ended sessions)
RuntimeSource = Callable[[], tuple[dict[str, tuple[int, bytes]], list[str]]]


class OutboundLog(Protocol):
    """Numbers a batch's signals to sessions and encodes them as log rows
    (host/sessions.py); says what a checkpoint may trim."""

    def rows(self, outputs: list[tuple[Any, Any]]) -> OutboundRows: ...

    def restore(self, rows: OutboundRows) -> None: ...

    def released(self, outputs: list[tuple[Any, Any]]) -> None: ...

    def pending(self, released_here: bool = False) -> OutboundRows: ...

    def trim(self) -> LogTrim: ...

    def reserve(self, count: int) -> int: ...


@dataclass
class Batch:
    entries: list[JournalEntry] = field(default_factory=list)
    releases: list[Release] = field(default_factory=list)
    signal_counts: Counter[str] = field(default_factory=Counter)
    writers: set[str] = field(default_factory=set)  # sessions whose own actions it holds
    replies: set[str] = field(default_factory=set)  # sessions a reply to which it holds
    outputs: list[tuple[Any, Any]] = field(default_factory=list)  # (session, signal) to log
    numbered: list[tuple[Any, Any]] = field(default_factory=list)  # by the commit, before it
    later: list[tuple[Any, Any]] = field(default_factory=list)  # once it is done
    # signals to others (a broadcast) of an action with no journal entry: the log
    # must hold them before they go, as it holds those of a journaled action
    must_log: bool = False
    # its client sent more right behind it: committed by then, if nothing came sooner
    soon: float | None = None

    def __bool__(self) -> bool:
        return bool(self.entries or self.releases)



class Saver:
    """Owns the store while the host runs. ``record`` is called by the dispatcher
    after each action; ``run`` is the writer task."""

    def __init__(self, store: Store, world: Slices, *, durability: str = "journal",
                 debounce_s: float = 1.0, max_delay_s: float = 5.0,
                 seq_source: SeqSource | None = None,
                 runtime_source: RuntimeSource | None = None,
                 world_id: str | None = None, last_id: int = 0, threaded: bool = True,
                 meta_source: Callable[[], dict[str, Any]] | None = None,
                 journal_in_loop: bool = False, outbound: OutboundLog | None = None,
                 unlogged_s: float = 0.05, commit_wait: bool = True) -> None:
        self.store = store
        self.world = world
        self.journaling = durability == "journal"
        self.outbound = outbound if self.journaling else None  # the log needs the journal
        self.unlogged_s = unlogged_s  # how long a reply sent without a commit waits unlogged
        self._unlogged_due: float | None = None
        self.debounce_s = debounce_s
        self.max_delay_s = max_delay_s
        self.seq_source = seq_source or (lambda counts: {})
        self.runtime_source = runtime_source or (lambda: ({}, []))
        self.world_id = world_id
        self.meta_source = meta_source or dict  # more meta keys written with each checkpoint
        self.last_id = last_id
        self.current = Batch()
        self.in_flight = False
        self.first_unsaved: float | None = None
        self.last_change: float | None = None
        self._wake = trio.Event()
        self.generation = 0
        self.commits = 0
        self.checkpoints = 0
        self.commit_seconds = 0.0  # summed, for /metrics
        self.checkpoint_seconds = 0.0
        self.threaded = threaded
        self.journal_in_loop = journal_in_loop or not threaded
        self._writer = WriterThread()
        self._in_flight_replies: set[str] = set()  # ``replies`` of the batch being committed
        # journal commits on the thread, started and finished by whoever runs in the loop
        self._chained = threaded and not self.journal_in_loop
        self.commit_wait_s = COMMIT_WAIT_S if commit_wait else 0.0
        self.commits_waited = 0  # commits the loop waited for and saw done
        self.waited_s = 0.0  # the time the loop spent waiting for commits, in all
        self.thread_commit_s = 0.0  # what the last commit on the thread took the thread
        self._flying: Batch | None = None  # the chain's batch on the thread
        self._flying_since = 0.0
        self._landed: outcome.Outcome[Any] | None = None  # its outcome, set by the thread
        self._quiet = trio.Event()  # set while nothing flies
        self._quiet.set()
        self._failure: BaseException | None = None  # a chained commit failed: the world stops
        self._stopping = False
        self._token: trio.lowlevel.TrioToken | None = None
        if threaded and self.journal_in_loop:
            store.patient(False)  # the loop's commits; the thread's calls are patient
        self._store_lock = trio.Lock()  # one store call at a time, on its one connection
        self.longest_stall_s = 0.0  # the longest time a save held the event loop

    async def _io(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run store work off the event loop (or in it, for tests on a mock clock)."""
        if self.threaded:
            return await self._writer.run(self._patiently, fn, *args)
        return fn(*args)

    def _patiently(self, fn: Callable[..., Any], *args: Any) -> Any:
        """On the writer thread: wait for a busy file, as the loop's commits do not."""
        toggle = self.journal_in_loop
        if toggle:
            self.store.patient(True)
        try:
            return fn(*args)
        except Exception as exc:
            if is_busy(exc):
                raise StoreFailed(
                    f"{self.store.path} stayed locked by another process for more than "
                    f"busy_timeout_ms ({self.store.busy_timeout_ms} ms)") from None
            raise
        finally:
            if toggle:
                self.store.patient(False)

    async def _append(self, entries: list[JournalEntry], seqs: dict[str, int],
                      outbound: OutboundRows | None) -> None:
        """Commit from the writer task. A commit tried in the loop that fails (a busy
        file, a full disk) is tried once more, on the thread (patiently) when there
        is one; a second failure stops the world."""
        if self.journal_in_loop:
            try:
                self.store.append(entries, seqs, outbound)
                return
            except Exception as exc:
                if isinstance(exc, StoreFailed):
                    raise
                if not is_busy(exc):
                    log.warning("journal commit failed (%s); trying it once more", exc)
        await self._io(self.store.append, entries, seqs, outbound)

    def _number(self, batch: Batch, everyone: bool) -> OutboundRows:
        """Number the signals of a batch about to commit and encode them as log rows:
        every one (``everyone``), else only those to the sessions whose own actions
        it holds (what is left is numbered by ``_number``'s second call)."""
        if self.outbound is None:
            return OutboundRows()
        if everyone:
            now, batch.later = batch.outputs, []
        else:
            now = [o for o in batch.outputs if o[0].id in batch.writers]
            batch.later = [o for o in batch.outputs if o[0].id not in batch.writers]
        batch.numbered = now
        return self.outbound.rows(now)

    def _take_batch(self) -> tuple[Batch, OutboundRows, dict[str, int]]:
        """Take what is queued for a commit on the thread (``_launch``, ``_drain``):
        number what the commit itself logs, and count its replies as in flight."""
        batch, self.current = self.current, Batch()
        outbound = self._number(batch, everyone=False)
        seqs = self._seqs(batch)
        self.in_flight = True
        self._in_flight_replies = batch.replies
        return batch, outbound, seqs

    def _seqs(self, batch: Batch) -> dict[str, int]:
        """The next seq of each session the batch signals, journaled with it: without
        the log, counted ahead (a floor after a crash); with it, the log says it."""
        if self.outbound is not None:
            return {}
        return self.seq_source(batch.signal_counts)

    def _unnumber(self, batch: Batch, logged: OutboundRows) -> None:
        """A commit in the loop failed: give the seqs back (nothing ran since they were
        taken), so that the retry numbers them in its own order."""
        if self.outbound is not None:
            self.outbound.restore(logged)
        for session, sig in reversed(batch.numbered):
            session.unnumber(sig)
        batch.numbered = []
        batch.later = []

    def close(self) -> None:
        """The host is done with the store: let its thread go."""
        self._writer.stop()

    # called synchronously by the dispatcher ------------------------------
    def record(self, entry: JournalEntry | None, outputs: list[tuple[Any, Any]]) -> bool:
        """Take one action's journal entry (if it changed the world) and its signals
        to sessions. True: they may go out now (the caller sends them, then tells
        ``sent_unlogged``); False: they wait for the commit in the batch, whose
        release the caller hands to ``then``."""
        if entry is not None:
            self.last_id = entry.id
        journaled = entry is not None and self.journaling
        # Only replies to the requester's own reads may go out before the log holds
        # them: after a kill -9 such a reply is lost with the request it answers
        # (the client sends it again), but a broadcast would be lost to others.
        broadcast = not journaled and self.outbound is not None and \
            any(not sig.has_re for _, sig in outputs)
        if not journaled and not broadcast and not self._waiting(outputs):
            return True
        current = self.current
        if broadcast:
            current.must_log = True
        if outputs:
            if self.outbound is not None:
                current.outputs.extend(outputs)
            counts, replies = current.signal_counts, current.replies
            for session, sig in outputs:  # (Counter.update checks for a Mapping: slow)
                counts[session.id] += 1
                if sig.has_re:
                    replies.add(session.id)
        if journaled and entry is not None:
            current.entries.append(entry)
            if entry.session is not None:
                current.writers.add(entry.session)
        return False

    def then(self, release: Release) -> None:
        """Run ``release`` once what ``record`` last took is committed."""
        self.current.releases.append(release)

    def sent_unlogged(self, outputs: list[tuple[Any, Any]]) -> None:
        """Signals ``record`` let go at once went out (numbered as they went): logged
        with the next commit that signals their session, or the small write within
        ``unlogged_s``."""
        if self.outbound is not None and outputs:
            self.outbound.released(outputs)
            if self._unlogged_due is None:
                self._unlogged_due = trio.current_time() + self.unlogged_s
                self._wake.set()

    def _waiting(self, outputs: list[tuple[Any, Any]]) -> bool:
        """Whether outputs that need no commit must wait: they go to a session a reply to
        which waits for a commit (a client gets its replies in the order of its
        requests). With the journal off, everything waits behind a checkpoint as
        before."""
        if not self.journaling:
            return self.in_flight or bool(self.current)
        pending, flying = self.current.replies, self._in_flight_replies
        if not (pending or flying):
            return False
        return any(s.id in pending or s.id in flying for s, _ in outputs)

    def commit_now(self) -> None:
        """Commit what is queued and release what waited behind it: here and now when
        journal commits run in the loop and the store is free, else on the thread
        (``_launch``); the writer task does it once a checkpoint lets the store go.
        The dispatcher calls this once it has applied what was queued, so one commit
        covers them all (and ``SessionGate.release`` after what it applied)."""
        if self._chained:
            self._launch()
            return
        if not self.current:
            return
        if self._store_lock.locked():
            self._wake.set()  # a checkpoint holds the store: the writer task commits after it
            return
        batch = self.current
        if batch.entries or batch.must_log:
            logged = self._number(batch, everyone=True)
            try:
                self.store.append(batch.entries, self._seqs(batch), logged or None)
            except Exception as exc:  # the writer task tries again, and stops the host if it fails
                if not isinstance(exc, StoreFailed) and not is_busy(exc):
                    log.exception("journal commit failed; retrying from the writer task")
                self._unnumber(batch, logged)
                self._wake.set()
                return
            self.commits += 1
        self.current = Batch()
        self._release(batch)

    def commit_soon(self) -> None:
        """What is queued may wait for the request the dispatcher applies next: the
        writer task commits it within ``COMMIT_SOON_S``, unless a ``commit_now``
        comes first (a burst's last request, another client's)."""
        if self.current.soon is None:
            self.current.soon = trio.current_time() + COMMIT_SOON_S
            self._wake.set()  # to wait until then

    def _soon(self) -> float | None:
        """When the writer task commits what ``commit_soon`` left queued; None while a
        commit flies (its landing launches what is queued) or nothing waits."""
        return None if self._flying is not None else self.current.soon

    @property
    def due_now(self) -> bool:
        """Outputs are queued that ``commit_now`` would commit and release."""
        return bool(self.current)

    # journal commits on the writer thread ------------------------------------------
    # A thread that needs Python's lock gets it only when the loop's thread lets go
    # of it and does not take it straight back, which a busy loop, letting go for
    # every system call, rarely allows: handed to the thread and awaited, a commit
    # of a few hundred µs took 1 to 2 ms with ten busy connections. So the loop
    # hands the batch over and then waits for it, briefly and without the lock
    # (``COMMIT_WAIT_S``): a healthy commit is done within that, and its outputs go
    # out at once, as in the loop. A commit that takes longer (a frozen or busy
    # disk) goes on without the loop: whichever code in the loop first sees it done
    # (``poll``, before each request, or ``run_sync_soon``) releases its outputs and
    # starts the next. The writer task still does checkpoints and the small log
    # writes: it takes the store lock (no commit starts then) and waits for the
    # commit in flight.

    def poll(self) -> None:
        """Finish a commit the thread has done meanwhile, and start the next. (Called
        by the dispatcher and by ``run_sync_soon``: what fails here stops the world
        from the writer task, as a failed commit does.)"""
        if self._landed is not None:
            try:
                if self._land():
                    self._launch()
            except Exception as exc:
                self._fail(exc)

    def _fail(self, exc: BaseException) -> None:
        """Outputs held for a commit stay held; the writer task raises ``exc``."""
        self._failure = exc
        if self._flying is not None:
            self._settle()
        self._wake.set()

    def _launch(self) -> None:
        """Commit what is queued on the thread, unless a commit flies or the store is
        held; release at once what waits with nothing to commit."""
        try:
            while self._flying is None and self._failure is None and not self._stopping:
                if self._store_lock.locked():
                    self._wake.set()  # the writer task commits once it lets the store go
                    return
                batch = self.current
                if not (batch.entries or batch.must_log):
                    if batch:
                        self.current = Batch()
                        self._release(batch)
                    return
                started = time.perf_counter()
                batch, outbound, seqs = self._take_batch()
                self._flying, self._flying_since = batch, started
                self._quiet = trio.Event()
                # a broadcast of an action that journaled nothing has only its second commit
                done = not batch.entries or self._submit(self.store.append, batch.entries,
                                                         seqs, outbound or None)
                self._stalled(started)
                if not (done and self._land()):
                    return
        except Exception as exc:  # as a failed commit: the world stops, nothing half-sent
            self._fail(exc)

    def _land(self) -> bool:
        """Finish the flying batch once its commit is done: a broadcast's audience is
        numbered only now, and logged by a second, small commit before it goes. True
        once released; False while that second commit flies, or if it failed."""
        batch = self._flying
        assert batch is not None
        while True:
            result, self._landed = self._landed, None
            try:
                if result is not None:
                    result.unwrap()
            except BaseException as exc:  # held outputs stay held: the world stops
                self._fail(exc)
                return False
            if not batch.later or self.outbound is None:
                break
            rows = self.outbound.rows(batch.later)
            batch.later = []
            if not self._submit(self.store.append, [], {}, rows):
                return False
        self._settle()
        self.commits += 1
        self.commit_seconds += time.perf_counter() - self._flying_since
        self._release(batch)
        return True

    def _submit(self, fn: Callable[..., Any], *args: Any) -> bool:
        """Run ``fn(*args)`` on the thread; True if it was done within ``COMMIT_WAIT_S``
        (its outcome in ``_landed``), else it lands by ``poll``. The loop does not
        wait at all while commits take the thread long (a slow disk): the last one
        it timed took more than half the wait."""
        if self._token is None:
            self._token = trio.lowlevel.current_trio_token()
        token, waiter, late = self._token, _thread.allocate_lock(), [False]
        waiter.acquire()

        def timed() -> Any:  # on the thread
            started = time.perf_counter()
            try:
                return self._patiently(fn, *args)
            finally:
                self.thread_commit_s = time.perf_counter() - started

        def done(result: outcome.Outcome[Any]) -> None:  # on the thread
            self._landed = result
            waiter.release()
            if late[0]:
                try:
                    token.run_sync_soon(self.poll)
                except trio.RunFinishedError:
                    pass

        wait = self.commit_wait_s
        waits = wait > 0 and 2 * self.thread_commit_s < wait
        self._writer.submit(done, timed, beside=waits)
        if waits:
            started = time.perf_counter()
            got = waiter.acquire(timeout=wait)
            self.waited_s += time.perf_counter() - started
            if got:
                self.commits_waited += 1
                return True
        late[0] = True
        return self._landed is not None  # done between the wait and ``late``

    def _settle(self) -> None:
        self._flying = None
        self.in_flight = False
        self._in_flight_replies = set()
        self._quiet.set()

    async def _settled(self) -> None:
        """With the store lock held: wait for the commit in flight, if any."""
        while self._flying is not None:
            await self._quiet.wait()
        if self._failure is not None:
            raise self._failure

    def changed(self) -> None:
        """The world changed: (re)arm the debounce."""
        now = trio.current_time()
        self.last_change = now
        if self.first_unsaved is None:
            self.first_unsaved = now
            self._wake.set()  # later changes only put the checkpoint off: no need to wake

    # the writer task ------------------------------------------------------
    def checkpoint_due_at(self) -> float:
        if self.first_unsaved is None or self.last_change is None:
            return math.inf
        return min(self.last_change + self.debounce_s, self.first_unsaved + self.max_delay_s)

    async def run(self) -> None:
        try:
            while True:
                unlogged = math.inf if self._unlogged_due is None else self._unlogged_due
                soon = self._soon()
                with trio.move_on_at(min(self.checkpoint_due_at(), unlogged,
                                         math.inf if soon is None else soon)):
                    await self._wake.wait()
                self._wake = trio.Event()
                if self._failure is not None:
                    raise self._failure
                now = trio.current_time()
                soon = self._soon()
                if now >= self.checkpoint_due_at():
                    await self.checkpoint()
                elif soon is not None and now < soon:
                    continue  # the client's next request may come with the commit
                elif self.current and self._chained and self._flying is None:
                    if self._store_lock.locked():  # a checkpoint called from outside
                        async with self._store_lock:
                            pass
                    self._launch()
                elif self.current and not self._chained:
                    async with self._store_lock:
                        await self._drain()
                elif self._unlogged_due is not None and now >= self._unlogged_due:
                    async with self._store_lock:
                        await self._settled()
                        await self._log_unlogged()
        finally:
            self._stopping = True  # the store closes after this: let the thread finish first
            with trio.CancelScope(shield=True):
                while self._flying is not None:
                    await self._quiet.wait()

    async def _log_unlogged(self) -> None:
        """Log the replies sent without a commit (to reads and pings) that no commit
        has carried since: within ``unlogged_s`` of the first, so that a kill -9 can
        take from a session's replay only what it sent in that last moment."""
        self._unlogged_due = None
        if self.outbound is None:
            return
        rows = self.outbound.pending(released_here=True)
        if not rows:
            return
        try:
            await self._io(self.store.append, [], {}, rows)
        except BaseException:
            self.outbound.restore(rows)
            raise

    async def _drain(self) -> None:
        """Commit what is queued, then release what waited behind it (store lock held)."""
        while self.current.entries or self.current.must_log:
            started = time.perf_counter()
            batch, outbound, seqs = self._take_batch()
            self._stalled(started)
            try:
                if batch.entries:
                    await self._append(batch.entries, seqs, outbound or None)
                if batch.later and self.outbound is not None:
                    # a broadcast's audience: numbered now, logged before it goes
                    await self._append([], {}, self.outbound.rows(batch.later))
            finally:
                self.in_flight = False
                self._in_flight_replies = set()
            self.commits += 1
            self.commit_seconds += time.perf_counter() - started
            self._release(batch)
        if self.current:  # outputs that waited behind a commit, with nothing to commit
            batch, self.current = self.current, Batch()
            self._release(batch)

    async def checkpoint(self, clean: bool = False) -> int:
        """Write what changed since the last checkpoint; covers every applied action."""
        async with self._store_lock:
            await self._settled()
            return await self._checkpoint(clean)

    async def _checkpoint(self, clean: bool) -> int:
        await self._drain()  # so every output applied before the cut is already out
        started = time.perf_counter()
        taken, restore = self._take()
        runtime, ended = self.runtime_source()
        trim = self.outbound.trim() if self.outbound is not None else None
        unlogged = self.outbound.pending() if self.outbound is not None else None
        last_id = self.last_id  # the cut: actions applied from here on are not in it
        self.first_unsaved = self.last_change = None
        try:
            self._stalled(started)
            changes = await self._encode(taken)
            self.in_flight = True
            self.generation = await self._io(
                self.store.checkpoint, changes, last_id, runtime, ended,
                {"world_id": self.world_id, **self.meta_source()}, clean, trim, unlogged)
        except BaseException:
            restore()
            if self.outbound is not None and unlogged is not None:
                self.outbound.restore(unlogged)
            raise
        finally:
            self.in_flight = False
        self.checkpoints += 1
        self.checkpoint_seconds += time.perf_counter() - started
        return self.generation

    async def adopt_outbound(self, rows: OutboundRows) -> None:
        """Keep another store's outbound log here (a world's, as it unloads), under
        positions of this store's own."""
        if not rows or self.outbound is None:
            return
        base = self.outbound.reserve(len(rows.data))
        moved = {pos: base + i for i, (pos, *_) in enumerate(rows.data)}
        rows = OutboundRows([(moved[pos], *rest) for pos, *rest in rows.data],  # type: ignore[misc]
                            [(sid, seq, moved[pos], re) for sid, seq, pos, re in rows.seqs])
        async with self._store_lock:
            await self._settled()
            await self._io(self.store.adopt_outbound, rows)

    async def flush(self) -> None:
        """Shutdown: after the commit under way, a final clean checkpoint."""
        await self.checkpoint(clean=True)

    def _stalled(self, started: float) -> None:
        self.longest_stall_s = max(self.longest_stall_s, time.perf_counter() - started)

    def _release(self, batch: Batch) -> None:
        for release in batch.releases:
            release()
        if not (batch.entries or batch.must_log):
            # waited behind a commit without one of its own: numbered now
            self.sent_unlogged(batch.outputs)

    def _take(self) -> tuple[list[Taken], Callable[[], None]]:
        """What changed since the last checkpoint, as references to the committed
        values: records are never changed in place, so they can be encoded later."""
        taken: list[Taken] = []
        marks: list[tuple[KeyedSlice | ValueSlice, set[str], bool]] = []
        for name, s in self.world.slices.items():
            if isinstance(s, ValueSlice):
                if s.dirty:
                    taken.append(Taken(name, s.spec.version, False, value=s.data()))
                    marks.append((s, set(), False))
                    s.dirty = False
                continue
            if not (s.dirty or s.replaced):
                continue
            records = s.data()
            keys = list(records) if s.replaced else s.dirty
            taken.append(Taken(name, s.spec.version, True, replaced=s.replaced,
                               records=[(key, records.get(key, _GONE)) for key in keys]))
            marks.append((s, set(s.dirty), s.replaced))
            s.dirty, s.replaced = set(), False

        def restore() -> None:
            for s, dirty, replaced in marks:
                if isinstance(s, ValueSlice):
                    s.dirty = True
                else:
                    s.dirty |= dirty
                    s.replaced = s.replaced or replaced
            self.first_unsaved = self.first_unsaved or trio.current_time()
            self.last_change = self.last_change or trio.current_time()

        return taken, restore

    async def _encode(self, taken: list[Taken]) -> dict[str, SliceChange]:
        """Encode a checkpoint in slices of the loop's time: a big change (an import)
        does not stall every connection while it is encoded."""
        changes: dict[str, SliceChange] = {}
        started = time.perf_counter()
        for t in taken:
            if not t.keyed:
                changes[t.name] = SliceChange(t.version, False, value=canonical(t.value))
                continue
            ch = changes[t.name] = SliceChange(t.version, True, replaced=t.replaced)
            for key, record in t.records:
                if record is _GONE:
                    ch.deletes.append(key)
                else:
                    ch.upserts[key] = canonical(record)
                if time.perf_counter() - started > ENCODE_SLICE_S:
                    self._stalled(started)
                    await trio.sleep(0)
                    await self._drain()  # actions applied meanwhile need not wait for it
                    started = time.perf_counter()
        self._stalled(started)
        return changes


_GONE = object()
# how long the loop waits for a journal commit on the thread before going on without
# it: far more than a healthy commit in the page cache takes, far less than a client
# would notice in the rest of the loop's work (see "journal commits on the writer thread")
COMMIT_WAIT_S = 0.002
# how long what a client sent back to back waits for the rest of the burst to come
# with it, at most: a burst arrives in one read and is applied within a few passes
COMMIT_SOON_S = 0.001
ENCODE_SLICE_S = 0.002  # the longest the checkpoint's encoding holds the loop at once


@dataclass
class Taken:
    """One slice's part of a checkpoint, not yet encoded."""

    name: str
    version: int
    keyed: bool
    value: Any = None
    replaced: bool = False
    records: list[tuple[str, Any]] = field(default_factory=list)  # (key, record | _GONE)
