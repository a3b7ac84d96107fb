"""The hooks a worldhost plugin may implement.

Mark implementations with ``host.hookimpl``. Registration hooks are plain
functions returning lists; lifecycle hooks may return an awaitable, which the
host awaits (pluggy itself never awaits). Every hook is documented with an
example in ``docs/plugins.md``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from host.actions import Action, ActionError
    from host.api import AppliedAction, HostAPI, SessionInfo
    from state.slices import SliceSpec

hookspec = pluggy.HookspecMarker("worldhost")


@hookspec
def register_actions() -> list[Action]:
    """Return the actions this plugin serves.

    Names are ``namespace.verb`` and unique across all plugins: a duplicate
    stops startup naming both plugins.
    """


@hookspec
def register_slices() -> list[SliceSpec]:
    """Return the slices of the world this plugin owns.

    Names are unique across all plugins. A slice's value is plain data and is
    saved, restored and migrated by the host.
    """


@hookspec
def startup(host: HostAPI) -> Awaitable[None] | None:
    """Called once the world is loaded and before clients are served.

    May return an awaitable. A plugin that raises here stops startup.
    """


@hookspec
def shutdown(host: HostAPI) -> Awaitable[None] | None:
    """Called after the last action was applied and before the final save.

    May return an awaitable; it gets a short deadline.
    """


@hookspec
def background_tasks(host: HostAPI) -> list[Callable[[], Awaitable[None]]]:
    """Return async callables the host runs in its nursery for its lifetime.

    They change the world only through ``host.submit``. A task that raises is
    logged and restarted after ``host.restart_delay_s``.
    """


@hookspec
def session_opened(host: HostAPI, session: SessionInfo) -> None:
    """A session was opened or resumed (``session.resumed`` tells which)."""


@hookspec
def session_closed(host: HostAPI, session: SessionInfo, reason: str) -> None:
    """A session ended for good: ``closed``, ``expired``, ``kicked``."""


@hookspec
def action_applied(host: HostAPI, applied: AppliedAction) -> None:
    """An action succeeded (after its transaction, before its reply is durable).

    Runs outside the action's transaction: to change the world in response,
    ``host.submit`` another action.
    """


@hookspec
def server_info(host: HostAPI) -> dict[str, Any] | None:
    """Return fields to merge into ``server.info`` and ``sync_state`` (e.g. ``phase``)."""


@hookspec
def session_limit(host: HostAPI) -> ActionError | None:
    """Return an error to refuse a new ``session.open`` (say, the server is full).

    Resuming an existing session is never refused by this hook.
    """
