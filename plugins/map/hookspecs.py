"""The hook the map offers other plugins: a say in what the map may lose.

Added to the host's plugin manager by the map's ``add_hookspecs``. The map
knows nothing of what stands on it; whoever keeps things on nodes and edges
(the simulation's agents and packages) answers here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from host.hookspecs import hookspec

if TYPE_CHECKING:
    from host.actions import Context


@hookspec(firstresult=True)
def map_change_blocked(ctx: Context, nodes: list[str], edges: list[str],
                       replace: bool) -> str | None:
    """Say why the map may not lose these nodes and edges now, or None.

    Asked inside the changing action's transaction (``map.remove_node``,
    ``map.remove_edge``, ``map.import``), before anything changed, and again
    when the action is replayed; the first answer that is not None refuses the
    action with a ``conflict`` carrying it.

    :param ctx: the changing action's context: read the world through it.
    :param nodes: the ids of the nodes the change takes away.
    :param edges: the ids of the edges the change takes away (those of a removed
        node too).
    :param replace: the whole map is being replaced (``map.import``).
    :return: why not, as a sentence the client is shown, or None.
    """
