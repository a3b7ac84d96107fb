"""What the host offers plugins outside of a handler."""

from __future__ import annotations

import logging
import math
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import msgspec


@dataclass(frozen=True)
class SessionInfo:
    """A session as plugins see it."""

    id: str
    name: str
    role: str
    resumed: bool = False


class AppliedAction(msgspec.Struct, frozen=True):
    """An action that succeeded: what ran, for whom, and what it answered.

    Immutable, as a frozen dataclass would be, but built for every world-changing
    action: a frozen dataclass sets each field through ``object.__setattr__``
    (3 µs for these seven, against 0.3 for a Struct)."""

    name: str
    params: dict[str, Any]
    session_id: str | None
    reply: dict[str, Any]
    at: float
    replayed: bool = False
    slices: tuple[str, ...] = ()  # the slices it changed


@dataclass(frozen=True)
class ImportStep:
    """How some slices of a worldhost export go into a world: one of the plugin's
    own import actions (checked and applied all or nothing, as a client's would
    be), with the slices it takes care of (``world_import``)."""

    action: str
    params: dict[str, Any]
    covers: tuple[str, ...]


@dataclass(frozen=True)
class TaskFailure:
    """A plugin's background task raised (the host logs it and restarts the task)."""

    plugin: str
    task: str
    error: BaseException


class HostAPI:
    """A world, as its plugins' lifecycle hooks and background tasks use it (the
    server's own plugins get the server's, whose slices are the sessions and the
    registry of worlds).

    Background tasks change the world only through ``submit``; reads through
    ``read`` see the committed world (treat it as read-only).
    """

    restart_delay_s = 1.0

    def __init__(self, world: Any) -> None:
        self._world = world  # host.world.World: this facade's one collaborator
        self.log = logging.getLogger("worldhost.plugins")
        self.reads: set[str] | None = None  # when a set: the slices read go into it
        self.task_listeners: list[Callable[[TaskFailure], None]] = []

    async def submit(self, action: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        """Apply an action through this world's dispatcher (journaled like any other)
        and return its reply data once durable; raises ActionError if refused."""
        return await self._world.dispatcher.submit(action, params or {})

    async def wait_changed(self, slices: Iterable[str], deadline: float = math.inf) -> bool:
        """Wait until an action changes one of ``slices`` (True), or until
        ``deadline`` on trio's clock (``trio.current_time()``, virtual under a mock
        clock) passes (False): a background task's one way to sleep until its
        world needs it. Only changes applied while it waits count: read the world
        again after it returns."""
        return bool(await self._world.dispatcher.wait_changed(slices, deadline))

    def read(self, slice_name: str) -> Any:
        """The committed value of a slice (a dict of records for keyed slices)."""
        if self.reads is not None:
            self.reads.add(slice_name)
        return self._world.slices[slice_name].data()

    def now(self) -> float:
        """The server clock, in seconds since the epoch (virtual under a mock clock)."""
        return float(self._world.clock())

    def settings(self, plugin: str | None = None) -> Any:
        """A plugin's checked settings (its ``Settings`` struct, or None if it has none).

        Without an argument: the settings of the plugin whose code calls this,
        found from the calling module, so a plugin need not know the name it was
        registered under (a config table, an entry point, or its module's name
        when a test registers the module itself).
        """
        if plugin is None:
            plugin = self.plugin_of(sys._getframe(1).f_globals.get("__name__", ""))
        return self._world.registry.settings.get(plugin)

    def plugin_of(self, module: str) -> str:
        """The registered name of the plugin whose code is in ``module`` (its own
        module, or a module of its package; the innermost wins). LookupError if no
        plugin's, or if the module holds several plugin objects."""
        found: dict[str, list[str]] = {}
        for name, plugin in self._world.registry.pm.list_name_plugin():
            home = plugin.__name__ if isinstance(plugin, ModuleType) else type(plugin).__module__
            if module == home or module.startswith(home + "."):
                found.setdefault(home, []).append(name)
        if not found:
            raise LookupError(f"module {module!r} belongs to no registered plugin: "
                              f"name the plugin, host.settings(NAME)")
        names = found[max(found, key=len)]
        if len(names) > 1:
            raise LookupError(f"module {module!r} holds the plugins {sorted(names)}: "
                              f"name one, host.settings(NAME)")
        return names[0]

    def task_failed(self, plugin: str, task: Any, error: BaseException) -> None:
        """A background task raised: tell the listeners (the test harness fails the
        test with it, as a trio nursery would). The host logs it and restarts the task."""
        failure = TaskFailure(plugin, getattr(task, "__qualname__", repr(task)), error)
        for listener in self.task_listeners:
            listener(failure)

    @property
    def config(self) -> Any:
        return self._world.config

    @property
    def world_id(self) -> str:
        """This world's id (``"server"`` for the server's own plugins)."""
        return str(self._world.id)

    def sessions(self) -> list[dict[str, Any]]:
        """The sessions in this world (every session, for the server's plugins), with
        live figures: connected, last activity, actions, signals."""
        return [s.overview() for s in list(self._world.audience.values())]

    @property
    def interest(self) -> Any:
        """Who in this world subscribed to which topic (``host.topics.Interest``), so
        that a plugin builds a topic's signal only when somebody wants it."""
        return self._world.dispatcher.interest

    @property
    def hook(self) -> Any:
        """pluggy's hook caller over this world's plugins:
        ``host.hook.agent_removed(ctx=ctx, agent_id=...)``."""
        return self._world.hooks

    def collect(self, hook: str, **kwargs: Any) -> list[tuple[str, Any]]:
        """Call a hook on every plugin; (plugin name, result) pairs, None results left out."""
        return list(self._world.registry.collect(hook, **kwargs))

    def runtime(self, plugin: str) -> dict[str, Any]:
        """A plugin's scratch space for this world while it is loaded; never saved."""
        return self._world.runtime.setdefault(plugin, {})  # type: ignore[no-any-return]

    @property
    def generation(self) -> int:
        """The store generation of the last checkpoint."""
        return int(self._world.generation)

    @property
    def replaying(self) -> bool:
        return bool(self._world.dispatcher.replaying)
