"""The hook the simulation offers other plugins: more kinds of agent.

Added to the host's plugin manager by the simulation's ``add_hookspecs``, so
it exists only where the simulation is loaded.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from host.hookspecs import hookspec

if TYPE_CHECKING:
    from plugins.simulation import AgentKind


@hookspec
def register_agent_kinds() -> list[AgentKind]:
    """Return simulation agent kinds (``plugins.simulation.AgentKind``).

    A kind validates an agent's plain data (``from_plain``), moves it a step
    (``step``) and gives its exported form (``to_plain``). Names are unique
    across plugins; a duplicate stops startup naming both.

    :return: the kinds this plugin adds.
    """
