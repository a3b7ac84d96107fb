"""The cheapest durable server: the floor under a durable round trip.

A bare echo on the ``websockets`` library's trio server, as bench/echo.py's,
except that each message is first appended to a journal in SQLite (WAL,
``synchronous = NORMAL``, as the host's store) and answered only once the
transaction holding it has committed. Messages read in the same turn of the
scheduler, or while a commit is under way, share one (group commit), as the
host's requests do. Nothing else: no envelope, no session, no world, no
outbound log, no checkpoint. What it costs over the plain echo is what
durability itself costs in Python on this machine: a server that does more
per durable action than append it and answer it stays below it.

    python bench/durable_echo.py [loop|thread|thread-wait|none] [DB] [--fanout]

``loop`` commits in the event loop; ``thread`` on a writer thread of its own,
the loop going on meanwhile and learning of the commit's end by
``run_sync_soon``; ``thread-wait`` the same, but the loop first waits for the
commit up to 2 ms without Python's lock, on the loop's CPU, as the host's
default (``[store] journal_commits = "thread"``) does; ``none`` journals nothing (with
``--fanout``: what the fan-out costs alone). Prints its port on the first
line of stdout; run by bench/floor.py and bench/process.py. The journal goes to
``DB`` (default: a new temporary folder).

A ``host.ping`` is answered at once, as the host answers a read. With
``--fanout`` a message naming a ``process_id`` (bench/process.py's
``process.turn``) also goes, once committed, to every other connection that
has sent one naming the same process: the floor under a durable turn that
five agents see.
"""

from __future__ import annotations

import _thread
import argparse
import queue
import sqlite3
import tempfile
import threading
from functools import partial
from pathlib import Path
from typing import Any

import trio

from state.saver import COMMIT_WAIT_S
from state.writer import Follower


class Journal:
    """Group commit: ``append`` returns once a commit holds what it was given."""

    def __init__(self, path: Path, threaded: bool, wait_s: float) -> None:
        self.conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.conn.execute("PRAGMA journal_mode = WAL")
        self.conn.execute("PRAGMA synchronous = NORMAL")
        self.conn.execute("CREATE TABLE journal (id INTEGER PRIMARY KEY, data BLOB)")
        self.threaded = threaded
        self.wait_s = wait_s
        self.queued: list[bytes] = []
        self.done = trio.Event()  # set by the commit that holds what is queued now
        self.flying = False
        self._token: trio.lowlevel.TrioToken | None = None
        self._follower: Follower
        self._jobs: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._state_lock = threading.Lock()
        self._wake = trio.Event()

    def _commit(self, rows: list[bytes]) -> None:
        self.conn.execute("INSERT INTO journal (data) VALUES "
                          + ", ".join(["(?)"] * len(rows)), rows)

    async def append(self, data: bytes) -> None:
        self.queued.append(data)
        done = self.done
        self._wake.set()
        await done.wait()

    async def run(self) -> None:
        """The committer: woken by ``append``, it runs once the handlers that were ready
        with it have run, so what they queued shares its commit."""
        while True:
            await self._wake.wait()
            self._wake = trio.Event()
            self._launch()

    def _launch(self) -> None:
        """Commit what is queued: here and now, or on the thread (waiting for it up to
        ``wait_s``; a later finish is picked up by ``run_sync_soon``)."""
        while self.queued and not self.flying:
            rows, self.queued = self.queued, []
            done, self.done = self.done, trio.Event()
            if not self.threaded:
                self._commit(rows)
                done.set()
                continue
            if self._token is None:
                self._token = trio.lowlevel.current_trio_token()
                thread = threading.Thread(target=self._work, daemon=True)
                thread.start()
                assert thread.native_id is not None
                self._follower = Follower(thread.native_id)
            self.flying = True
            waiter, state = _thread.allocate_lock(), {"finished": False, "late": False}
            waiter.acquire()
            if self.wait_s:  # on the loop's CPU, as the host's store thread for a waited commit
                self._follower.follow()
            self._jobs.put((rows, done, waiter, state))
            if not (self.wait_s and waiter.acquire(timeout=self.wait_s)):
                with self._state_lock:
                    state["late"] = not state["finished"]
                if state["late"]:
                    return
            self.flying = False
            done.set()

    def _work(self) -> None:
        """The writer thread: commit each batch, and wake the loop if it stopped waiting."""
        token = self._token
        assert token is not None
        while True:
            rows, done, waiter, state = self._jobs.get()
            self._commit(rows)
            with self._state_lock:
                state["finished"] = True
                late = state["late"]
            waiter.release()
            if late:
                token.run_sync_soon(self._landed, done)

    def _landed(self, done: trio.Event) -> None:
        self.flying = False
        done.set()
        self._launch()


PING = b'"action":"host.ping"'
PROCESS = b'"process_id":"'


def _process_of(data: bytes) -> bytes | None:
    at = data.find(PROCESS)
    if at < 0:
        return None
    at += len(PROCESS)
    return data[at:data.index(b'"', at)]


async def main(mode: str, db: Path, fanout: bool) -> None:
    from websockets.exceptions import ConnectionClosed
    from websockets.trio.server import serve

    journal = Journal(db, mode != "loop", COMMIT_WAIT_S if mode == "thread-wait" else 0.0)
    groups: dict[bytes, list[Any]] = {}  # process id -> the connections that named it
    nojournal = mode == "none"

    async def handler(ws: Any) -> None:
        joined: set[bytes] = set()
        try:
            while True:
                message = await ws.recv()
                data = message.encode() if isinstance(message, str) else message
                if PING in data:  # a read: answered at once, as the host answers it
                    await ws.send(message)
                    continue
                if not nojournal:
                    await journal.append(data)
                await ws.send(message)
                if fanout and (process := _process_of(data)) is not None:
                    group = groups.setdefault(process, [])
                    if process not in joined:
                        joined.add(process)
                        group.append(ws)
                    for other in group:
                        if other is not ws:
                            await other.send(message)
        except ConnectionClosed:  # a client went away
            pass
        finally:
            for process in joined:
                groups[process].remove(ws)

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(journal.run)
        await nursery.start(partial(serve, handler, listeners=listeners, compression=None,
                                    ping_interval=None, max_size=64 << 20, max_queue=8))
        print(listeners[0].socket.getsockname()[1], flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("commits", nargs="?", choices=("loop", "thread", "thread-wait", "none"),
                        default="loop")
    parser.add_argument("db", nargs="?", type=Path, help="the journal (default: a new "
                        "temporary folder's)")
    parser.add_argument("--fanout", action="store_true", help="a message naming a "
                        "process_id also goes to every other connection that named it")
    args = parser.parse_args()
    trio.run(main, args.commits,
             args.db or Path(tempfile.mkdtemp(prefix="worldhost-bench-")) / "echo.db",
             args.fanout)
