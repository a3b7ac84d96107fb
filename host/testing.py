"""A pytest plugin for testing worldhost plugins, shipped through ``pytest11``.

The ``worldhost`` fixture starts hosts in-process, with the plugins you name,
on a temporary SQLite store, and connects clients over in-memory streams (or a
real port). ``crash()`` makes a host vanish as under kill -9 and ``restart()``
brings it back on the same store, so resume paths can be tested in-process.
It works with pytest-trio's mock clock: under a mock clock the store runs in
the event loop, so virtual time cannot race ahead of SQLite work. A plugin's
background task that raises fails the test (``BackgroundTaskFailed``), unless
the test takes the failure with ``h.task_failures()``.

    async def test_counter(worldhost):
        h = await worldhost.start(my_plugin)
        async with h.client("ada") as ada:
            assert (await ada.call("counter.add", n=2))["total"] == 2
        await h.crash()
        await h.restart()
"""

from __future__ import annotations

import itertools
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import trio
import trio.testing
import trio_websocket

from host import config as config_mod
from host.api import TaskFailure
from host.client import Client, Opener, open_client, url_opener
from host.connect import tcp_opener
from host.server import Server as Host
from state.codec import clone


class BackgroundTaskFailed(Exception):
    """A plugin's background task raised while the test ran. The host logs and
    restarts such a task; the harness fails the test instead, as a trio nursery
    would, with the task's own exception as the cause."""


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``over`` laid on top, table by table (nested tables merge too).
    Tables are copied, never shared with the arguments."""
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict):
            below = out.get(key)
            out[key] = deep_merge(below if isinstance(below, dict) else {}, value)
        else:
            out[key] = value
    return out


class HostHarness:
    """One host under test: start, connect, crash, restart, stop."""

    def __init__(self, nursery: trio.Nursery, db: Path, config: config_mod.Config,
                 plugins: list[Any], entry_points: bool, listen: bool) -> None:
        self._nursery = nursery
        self.db = db
        self.config = config
        self.plugins = plugins
        self.entry_points = entry_points
        self.listen = listen
        self.host: Host = None  # type: ignore[assignment]
        self._done: trio.Event | None = None
        self._failures: list[TaskFailure] = []

    @property
    def url(self) -> str:
        assert self.host.port is not None, "start with listen=True for a real port"
        return f"ws://127.0.0.1:{self.host.port}/"

    @property
    def tcp_port(self) -> int:
        """The line-delimited JSON TCP port (start with listen=True and
        ``{"transports": {"tcp": {"enabled": True}}}``)."""
        assert self.host.tcp_port is not None, \
            "start with listen=True and [transports.tcp] enabled"
        return self.host.tcp_port

    @property
    def tcp_url(self) -> str:
        return f"tcp://127.0.0.1:{self.tcp_port}"

    def tcp_client(self, name: str = "tester", *, token: str | None = None,
                   reconnect: bool = True, open_session: bool = True) -> Any:
        """``async with h.tcp_client("ada") as ada:`` — the same client, over TCP lines
        (it follows restarts, as ``client`` does)."""
        self.check()

        async def opener(nursery: trio.Nursery) -> Any:
            if self.host.tcp_port is None:  # restarting: refused, as a real socket would be
                raise ConnectionRefusedError("the host is not listening yet")
            return await tcp_opener(self.tcp_url)(nursery)
        return open_client(opener, name=name, token=token, reconnect=reconnect,
                           open_session=open_session)

    def task_failures(self) -> list[TaskFailure]:
        """Take the background-task failures recorded so far: a test that expects a
        task to fail takes them, and the harness no longer fails the test for them."""
        taken = list(self._failures)
        self._failures.clear()  # in place: the host's listener appends to this list
        return taken

    def check(self) -> None:
        """Raise BackgroundTaskFailed if a background task raised and the test did
        not take the failure (every harness call and the fixture's end check)."""
        if not self._failures:
            return
        first = self._failures[0]
        more = f" (and {len(self._failures) - 1} more failures)" if len(self._failures) > 1 else ""
        self._failures.clear()
        raise BackgroundTaskFailed(
            f"background task {first.task} of plugin {first.plugin!r} raised "
            f"{type(first.error).__name__}: {first.error}{more}") from first.error

    async def start(self) -> HostHarness:
        self.check()
        mock = isinstance(trio.lowlevel.current_clock(), trio.testing.MockClock)
        self.host = Host(self.config, self.plugins, entry_points=self.entry_points,
                         db=str(self.db), threads=not mock)
        self.host.task_listeners.append(self._failures.append)
        done = self._done = trio.Event()
        host = self.host

        async def run(task_status: trio.TaskStatus[Host] = trio.TASK_STATUS_IGNORED) -> None:
            try:
                await host.run(listen=self.listen, task_status=task_status)
            finally:
                done.set()

        await self._nursery.start(run)
        return self

    async def stop(self) -> None:
        """A clean shutdown, as SIGTERM does."""
        if self._done is not None and not self._done.is_set():
            self.host.stop()
            await self._done.wait()
        self.check()

    async def crash(self) -> None:
        """Vanish as under kill -9: only what was committed survives."""
        if self._done is not None and not self._done.is_set():
            self.host.crash()
            await self._done.wait()
        self.check()

    async def restart(self) -> HostHarness:
        """Start again on the same store (after stop() or crash())."""
        await self.stop()
        return await self.start()

    def opener(self) -> Opener:
        """Opens a WebSocket to whichever host is current (so clients follow restarts)."""
        if self.listen:
            return lambda nursery: url_opener(self.url)(nursery)

        async def opener(nursery: trio.Nursery) -> trio_websocket.WebSocketConnection:
            client_end, server_end = trio.testing.memory_stream_pair()
            self.host.accept_stream(server_end)
            return await trio_websocket.wrap_client_stream(
                nursery, client_end,  # type: ignore[arg-type]  # any trio stream works
                "worldhost.test", "/", message_queue_size=64,
                max_message_size=64 * 1024 * 1024)
        return opener

    def client(self, name: str = "tester", *, token: str | None = None, encoding: str = "json",
               reconnect: bool = True, open_session: bool = True) -> Any:
        """``async with h.client("ada") as ada:`` — a client with an open session."""
        self.check()
        return open_client(self.opener(), name=name, token=token, encoding=encoding,
                           reconnect=reconnect, open_session=open_session)

    def world(self, world_id: str | None = None) -> dict[str, Any]:
        """The committed world (the default one, or the named loaded one), slice by
        slice: a copy, so a test that changes it (say, drops a field before
        comparing) cannot corrupt the running server."""
        self.check()
        return clone(self.host.world(world_id).slices.snapshot())

    def sessions(self) -> dict[str, Any]:
        """The server's session records (every world's), a copy."""
        self.check()
        return clone(self.host.lobby.slices["sessions"].data())

    def encoded_world(self, world_id: str | None = None) -> bytes:
        """Canonical CBOR of a world: byte-equal for equal worlds."""
        self.check()
        return self.host.world(world_id).slices.encode()


class Harness:
    """The ``worldhost`` fixture: starts hosts and cleans them up."""

    def __init__(self, nursery: trio.Nursery, tmp_path: Path) -> None:
        self._nursery = nursery
        self._tmp = tmp_path
        self._count = itertools.count(1)
        self.hosts: list[HostHarness] = []

    async def start(self, *plugins: Any, config: dict[str, Any] | None = None,
                    builtins: bool = True, listen: bool = False, entry_points: bool = False,
                    db: Path | None = None) -> HostHarness:
        """Start a host with ``plugins`` (modules or objects) besides those the config
        names. ``config`` is a dict of tables as in plugins.toml, merged key by key
        over the harness's own (``port = 0``); ``builtins=False`` leaves the built-in
        plugins out (only the core and yours)."""
        config = config or {}
        raw: dict[str, Any] = {"host": {"port": 0}, "transports": {"tcp": {"port": 0}}}
        if not builtins:  # a built-in the config names stays in
            raw["plugins"] = {name: {"enabled": False} for name in config_mod.BUILTIN_PLUGINS
                              if name not in config.get("plugins", {})}
        raw = deep_merge(raw, config)
        extra = []
        for plugin in plugins:  # a module with a settings table loads as the config's would
            table = None
            if isinstance(plugin, ModuleType) and sys.modules.get(plugin.__name__) is plugin:
                table = raw.get("plugins", {}).get(plugin.__name__)
            if isinstance(table, dict) and "module" not in table:
                table["module"] = plugin.__name__
            else:
                extra.append(plugin)
        cfg = config_mod.from_dict(raw, "<test config>")
        # a directory each: a server keeps its own store and its worlds beside the db
        path = db or self._tmp / f"host-{next(self._count)}" / "world.db"
        path.parent.mkdir(parents=True, exist_ok=True)
        harness = HostHarness(self._nursery, path, cfg, extra, entry_points, listen)
        self.hosts.append(harness)
        return await harness.start()

    async def aclose(self) -> None:
        """Stop every host; then fail if a background task raised (first failure first)."""
        failed: BaseException | None = None
        for h in self.hosts:
            try:
                await h.stop()
            except BackgroundTaskFailed as exc:
                failed = failed or exc
        if failed is not None:
            raise failed


@asynccontextmanager
async def open_harness(tmp_path: Path) -> AsyncIterator[Harness]:
    """The ``worldhost`` fixture as a context manager, for hypothesis tests (whose
    examples each run on their own) and for scripts."""
    failed: BackgroundTaskFailed | None = None
    async with trio.open_nursery() as nursery:
        harness = Harness(nursery, tmp_path)
        try:
            yield harness
        finally:
            try:
                await harness.aclose()
            except BackgroundTaskFailed as exc:
                failed = exc  # raised bare, not in the nursery's ExceptionGroup
            nursery.cancel_scope.cancel()
    if failed is not None:
        raise failed


@pytest.fixture
async def worldhost(nursery: trio.Nursery, tmp_path: Path) -> AsyncIterator[Harness]:
    """Start worldhost hosts in-process; each is stopped cleanly at the end of the test."""
    harness = Harness(nursery, tmp_path)
    yield harness
    await harness.aclose()


@asynccontextmanager
async def raw_connection(h: HostHarness) -> AsyncIterator[trio_websocket.WebSocketConnection]:
    """A bare WebSocket to the host (no client logic), for protocol-level tests."""
    async with trio.open_nursery() as nursery:
        ws = await h.opener()(nursery)
        try:
            yield ws
        finally:
            await ws.aclose()
            nursery.cancel_scope.cancel()


__all__ = ["BackgroundTaskFailed", "Client", "Harness", "HostHarness", "open_harness", "raw_connection", "worldhost"]
