"""The hooks the process controller offers other plugins: more process
templates, and a word when a process survived a restart.

Added to the host's plugin manager by the controller's ``add_hookspecs``, so
they exist only where the controller is loaded.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from host.hookspecs import hookspec

if TYPE_CHECKING:
    from host.api import HostAPI


@hookspec
def register_process_templates() -> list[dict[str, Any]]:
    """Return process templates: ``{"id", "name", "stages": [...]}``.

    Templates are validated at startup; a bad one stops startup naming the plugin.

    :return: the templates this plugin adds.
    """


@hookspec
def process_resumed(host: HostAPI, process: dict[str, Any]) -> None:
    """A running or paused process was found at startup, after a restart or crash.

    Re-create whatever the plugin had attached to it (timers, spawned runners).

    :param host: the world the process runs in.
    :param process: the process's record, as ``process.get`` returns it.
    """
