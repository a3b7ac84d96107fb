"""What the host offers plugins outside of a handler."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from host.server import Host


@dataclass(frozen=True)
class SessionInfo:
    """A session as plugins see it."""

    id: str
    name: str
    role: str
    resumed: bool = False


@dataclass(frozen=True)
class AppliedAction:
    """An action that succeeded: what ran, for whom, and what it answered."""

    name: str
    params: dict[str, Any]
    session_id: str | None
    reply: dict[str, Any]
    at: float
    replayed: bool = False
    slices: tuple[str, ...] = ()  # the slices it changed


@dataclass(frozen=True)
class TaskFailure:
    """A plugin's background task raised (the host logs it and restarts the task)."""

    plugin: str
    task: str
    error: BaseException


class HostAPI:
    """The host, as lifecycle hooks and background tasks use it.

    Background tasks change the world only through ``submit``; reads through
    ``read`` see the committed world (treat it as read-only).
    """

    restart_delay_s = 1.0

    def __init__(self, host: Host) -> None:
        self._host = host
        self.log = logging.getLogger("worldhost.plugins")
        self.reads: set[str] | None = None  # when a set: the slices read go into it
        self.task_listeners: list[Callable[[TaskFailure], None]] = []

    async def submit(self, action: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        """Apply an action through the dispatcher (journaled like any other) and
        return its reply data once durable; raises ActionError if refused."""
        return await self._host.dispatcher.submit(action, params or {})

    def read(self, slice_name: str) -> Any:
        """The committed value of a slice (a dict of records for keyed slices)."""
        if self.reads is not None:
            self.reads.add(slice_name)
        return self._host.world[slice_name].data()

    def now(self) -> float:
        """The host clock, in seconds since the epoch (virtual under a mock clock)."""
        return self._host.clock()

    def settings(self, plugin: str | None = None) -> Any:
        """A plugin's checked settings (its ``Settings`` struct, or None if it has none).

        Without an argument: the settings of the plugin whose code calls this,
        found from the calling module, so a plugin need not know the name it was
        registered under (a config table, an entry point, or its module's name
        when a test registers the module itself).
        """
        if plugin is None:
            plugin = self.plugin_of(sys._getframe(1).f_globals.get("__name__", ""))
        return self._host.registry.settings.get(plugin)

    def plugin_of(self, module: str) -> str:
        """The registered name of the plugin whose code is in ``module`` (its own
        module, or a module of its package; the innermost wins). LookupError if no
        plugin's, or if the module holds several plugin objects."""
        found: dict[str, list[str]] = {}
        for name, plugin in self._host.registry.pm.list_name_plugin():
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
        return self._host.config

    @property
    def world_id(self) -> str:
        return self._host.world_id

    def sessions(self) -> list[dict[str, Any]]:
        """Every session with live figures: connected, last activity, actions, signals."""
        return self._host.sessions_overview()

    @property
    def hook(self) -> Any:
        """pluggy's hook caller: ``host.hook.agent_removed(ctx=ctx, agent_id=...)``."""
        return self._host.registry.pm.hook

    def collect(self, hook: str, **kwargs: Any) -> list[tuple[str, Any]]:
        """Call a hook on every plugin; (plugin name, result) pairs, None results left out."""
        return self._host.registry.collect(hook, **kwargs)

    def runtime(self, plugin: str) -> dict[str, Any]:
        """A plugin's scratch space for this host run (caches, events); never saved."""
        return self._host.plugin_runtime.setdefault(plugin, {})

    @property
    def generation(self) -> int:
        """The store generation of the last checkpoint."""
        return self._host.generation

    @property
    def replaying(self) -> bool:
        return self._host.dispatcher.replaying
