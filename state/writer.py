"""The store's own thread: SQLite work runs off the event loop, one call at a time.

A long-lived thread fed by a queue, rather than ``trio.to_thread`` per call:
the journal commits once per batch of actions, and the hand-off is most of
the cost of a small commit, so it is kept to a queue put and one wake-up.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Any

import outcome
import trio

Job = tuple[Callable[..., Any], tuple[Any, ...], Callable[[outcome.Outcome[Any]], None]]


class WriterThread:
    def __init__(self, name: str = "worldhost-store") -> None:
        self._jobs: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self._name = name
        self._thread: threading.Thread | None = None

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
               *args: Any) -> None:
        """Queue ``fn(*args)``; ``done`` gets its outcome, on the thread (it must hand
        anything for the loop over itself, e.g. with ``run_sync_soon``)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name=self._name, daemon=True)
            self._thread.start()
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
