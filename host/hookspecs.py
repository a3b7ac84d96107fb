"""The hooks a worldhost plugin may implement.

A plugin lives in every world (the default) or once in the server (``scope =
"server"`` on its module or class: the session housekeeping). Lifecycle hooks
are called per world, with that world's ``host``: ``startup`` and
``background_tasks`` when a world loads (at startup, on a join, after an idle
unload), ``shutdown`` when it unloads or the server stops. A server plugin's
are called once, with the server's ``host`` (whose slices are the sessions and
the registry of worlds).

Mark implementations with ``host.hookimpl`` (``host.plugins.hookimpl`` is the
same marker). Registration hooks are plain
functions returning lists; lifecycle hooks may return an awaitable, which the
host awaits (pluggy itself never awaits). Every hook is documented with an
example in ``docs/plugins.md``.

A plugin adds hooks of its own through ``add_hookspecs``, as pytest's plugins
do through ``pytest_addhooks``: the simulation's ``register_agent_kinds`` is in
``plugins/simulation/hookspecs.py``, the process controller's in
``plugins/process_controller/hookspecs.py``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from host.actions import Action, ActionError, Context
    from host.api import AppliedAction, HostAPI, ImportStep, SessionInfo
    from state.slices import SliceSpec

hookspec = pluggy.HookspecMarker("worldhost")
hookimpl = pluggy.HookimplMarker("worldhost")


@hookspec(historic=True)
def add_hookspecs(pluginmanager: pluggy.PluginManager) -> None:
    """Add the hooks this plugin offers other plugins: ``pluginmanager.add_hookspecs``
    with a module (or class) of functions marked ``host.hookspec``.

    Called as each plugin is registered, before the world starts; a plugin
    registered earlier that implements one of the new hooks is checked against
    it then, and a mismatch stops startup naming the plugin.

    :param pluginmanager: the pluggy plugin manager of this host's plugins.
    """


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
    """Called once a world is loaded (each world, each time it loads) and before its
    clients are served.

    May return an awaitable. A plugin that raises here stops startup.

    :param host: the world loaded (the server's, for a server plugin).
    """


@hookspec
def shutdown(host: HostAPI) -> Awaitable[None] | None:
    """Called after the last action was applied and before the final save.

    May return an awaitable; it gets a short deadline.

    :param host: the world unloading or stopping.
    """


@hookspec
def background_tasks(host: HostAPI) -> list[Callable[[], Awaitable[None]]]:
    """Return async callables the host runs for as long as the world is loaded.

    They change the world only through ``host.submit``. A task that raises is
    logged and restarted after ``host.restart_delay_s`` (under the test harness
    it also fails the test). ``host.settings()`` gives the plugin its settings.

    :param host: the world the tasks run for: their only way to read and change it.
    """


@hookspec
def session_opened(host: HostAPI, session: SessionInfo) -> None:
    """A session was opened or resumed (``session.resumed`` tells which).

    Server plugins hear of every session; a world's plugins of the sessions that
    open or resume into that world (``host`` is that world's).

    :param host: the server's, or the world the session opened into.
    :param session: the session: its id, role, world and live figures.
    """


@hookspec
def session_closed(host: HostAPI, session: SessionInfo, reason: str) -> None:
    """A session ended for good: ``closed``, ``expired``, ``kicked``, ``timeout``,
    ``evicted``, ``revoked`` or ``repaired``; to the server plugins and to the
    plugins of the world it was in.

    :param host: the server's, or the world the session was in.
    :param session: the session as it ended.
    :param reason: why it ended, one of the words above.
    """


@hookspec
def action_applied(host: HostAPI, applied: AppliedAction) -> None:
    """An action changed the world (after its transaction, before its reply is durable).

    Runs outside the action's transaction: to change the world in response,
    ``host.submit`` another action.

    :param host: the world the action changed.
    :param applied: the action, its params, requester, reply, time and the slices
        it changed (``applied.slices``); ``applied.replayed`` during a restart.
    """


@hookspec
def server_info(host: HostAPI) -> dict[str, Any] | None:
    """Return fields to merge into ``server.info`` and ``sync_state`` (e.g. ``phase``).

    Compute them from the world, read through ``host.read``: the host notes which
    slices the ``phase`` and ``processes`` fields were computed from, and asks
    again only after an action changes one of those.

    :param host: the world asked about (the server's, for a server plugin).
    :return: fields to merge, or None.
    """


@hookspec
def session_limit(host: HostAPI) -> ActionError | None:
    """Return an error to refuse a new ``session.open`` (say, the server is full).

    Resuming an existing session is never refused by this hook.

    :param host: the server's, or the default world's.
    :return: the error the ``session.open`` is refused with, or None to allow it.
    """


@hookspec
def register_topics() -> list[Any]:
    """Return the topics this plugin emits to (``host.topics.Topic``).

    A session may subscribe only to declared topics (``world.subscribe``); a
    handler emits to one with ``ctx.broadcast(signal, data, topic=...)``.
    """


@hookspec
def agent_removed(ctx: Context, agent_id: str) -> None:
    """An agent left the world (a simulation agent removed, a process agent gone).

    Runs inside the removing action's transaction, so a plugin forgets what it
    kept about the agent atomically with the removal (and again on replay). A
    world-level event: two plugins fire it and a third listens, so it is the host's.

    :param ctx: the removing action's context: change the world through it.
    :param agent_id: the agent that left.
    """


@hookspec(firstresult=True)
def world_import(slices: dict[str, Any]) -> ImportStep | None:
    """Say how slices of a worldhost export (``worldhost import``) go into a world
    through your own import action, or None.

    The host asks again with what is left until nobody answers; the slices no
    plugin took are written as they are (``world.replace_slices``). A plugin whose
    import covers more slices than another's answers first (``tryfirst``): the
    simulation's ``simulation.import_state`` takes the map with it.

    :param slices: the export's slices not imported yet, by name, each
        ``{"version", "data"}`` as ``worldhost export`` wrote it.
    :return: the action, its params and the slices it covers; or None.
    """


@hookspec
def world_running(host: HostAPI) -> str | None:
    """Say what keeps this world running with nobody in it, or None.

    A world whose plugins all answer None, and that no session has joined, is
    checkpointed and unloaded after ``[worlds] idle_unload_s``; one that answers
    (say ``"simulation"``) stays loaded, and after a stop or a crash it is loaded
    again at startup, without anyone joining, and resumed.

    :param host: the world asking.
    :return: a short name of what runs (shown in ``world.list``), or None.
    """
