"""The store's own thread: SQLite work runs off the event loop, one call at a time.

A long-lived thread fed by a queue, rather than ``trio.to_thread`` per call:
the journal commits once per batch of actions, and the hand-off is most of
the cost of a small commit, so it is kept to a queue put and one wake-up.

A call the loop waits for (a journal commit, see ``state.saver``) runs on the
CPU the loop runs on: the loop lets go of that CPU to wait, so the thread takes
it at once, and the loop comes back to caches the commit warmed rather than
ones another thread cooled. Measured on two cores (docs/performance.md), the
loop's CPU a durable round trip fell by up to a tenth, and the host answered
about 8% more of them. Any other call (a checkpoint, which the loop does not wait for)
may run anywhere, in parallel with the loop.
"""

from __future__ import annotations

import ctypes
import logging
import os
import queue
import threading
from collections.abc import Callable
from typing import Any

import outcome
import trio

log = logging.getLogger("worldhost.store")

Job = tuple[Callable[..., Any], tuple[Any, ...], Callable[[outcome.Outcome[Any]], None]]


def _cpu_reader() -> Callable[[], int] | None:
    """The C library's ``sched_getcpu`` (the CPU the calling thread runs on), where
    threads can be pinned; None elsewhere."""
    if not hasattr(os, "sched_setaffinity"):
        return None
    try:
        reader: Callable[[], int] = ctypes.CDLL(None).sched_getcpu
    except (OSError, AttributeError):
        return None
    return reader


_current_cpu = _cpu_reader()


class Follower:
    """Keeps one thread (``native_id``) on the CPU of whichever thread calls
    ``follow``, and lets it go again with ``release``. Each costs a system call
    only when the CPU changes; where threads cannot be pinned both do nothing."""

    def __init__(self, native_id: int) -> None:
        self.native_id = native_id
        self.cpu: int | None = None  # the one it is kept on; None: any of ``allowed``
        self._cpu_now = _current_cpu  # None: pinning is not possible here (or failed)
        self.allowed = os.sched_getaffinity(0) if self._cpu_now is not None else set()

    @property
    def enabled(self) -> bool:
        return self._cpu_now is not None

    def follow(self) -> None:
        if self._cpu_now is not None:
            cpu = self._cpu_now()
            if cpu != self.cpu and cpu >= 0:
                self._pin({cpu}, cpu)

    def release(self) -> None:
        if self.cpu is not None:
            self._pin(self.allowed, None)

    def _pin(self, cpus: set[int], cpu: int | None) -> None:
        try:
            os.sched_setaffinity(self.native_id, cpus)
        except OSError as exc:  # a cpuset changed under us, a sandbox: run anywhere
            log.info("not keeping the store's thread beside the loop: %s", exc)
            self._cpu_now = None
            self.cpu = None
        else:
            self.cpu = cpu


class WriterThread:
    def __init__(self, name: str = "worldhost-store") -> None:
        self._jobs: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self._name = name
        self._thread: threading.Thread | None = None
        self._follower: Follower | None = None

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)`` in the thread; its result, or its exception raised here.

        Not cancellable once queued, as ``trio.to_thread.run_sync``: the store's
        connection must not be closed under a call still running.
        """
        token = trio.lowlevel.current_trio_token()
        task = trio.lowlevel.current_task()

        def done(result: outcome.Outcome[Any]) -> None:
            token.run_sync_soon(trio.lowlevel.reschedule, task, result)

        self.submit(done, fn, *args)
        return await trio.lowlevel.wait_task_rescheduled(lambda _: trio.lowlevel.Abort.FAILED)

    def submit(self, done: Callable[[outcome.Outcome[Any]], None], fn: Callable[..., Any],
               *args: Any, beside: bool = False) -> None:
        """Queue ``fn(*args)``; ``done`` gets its outcome, on the thread (it must hand
        anything for the loop over itself, e.g. with ``run_sync_soon``). ``beside``:
        the caller waits for it, off Python's lock, so it runs on the caller's CPU."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name=self._name, daemon=True)
            self._thread.start()
            assert self._thread.native_id is not None
            self._follower = Follower(self._thread.native_id)
        assert self._follower is not None
        if beside:
            self._follower.follow()
        else:
            self._follower.release()
        self._jobs.put((fn, args, done))

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            fn, args, done = job
            done(outcome.capture(fn, *args))

    def stop(self) -> None:
        """Let the thread end once the calls queued before this are done."""
        if self._thread is not None:
            self._jobs.put(None)
            self._thread = None
            self._follower = None
