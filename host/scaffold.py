"""``worldhost new-plugin NAME``: a new plugin project from the template that ships
in the package (``host/templates/plugin``), so a plugin starts from something that
runs: the module, its pyproject with the ``worldhost`` entry point, and its tests
through the harness.

Template files end in ``.tmpl`` (so linters and pytest leave them alone) and say
``{{name}}`` where the plugin's name goes, in their text and their paths.
"""

from __future__ import annotations

import functools
import keyword
import re
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path

NAME = re.compile(r"[a-z][a-z0-9_]{0,39}")
PLACEHOLDER = "{{name}}"


class ScaffoldError(Exception):
    """The plugin cannot be created; the message says why, in one line."""


@functools.cache
def reserved_names() -> frozenset[str]:
    """Names a new plugin may not take: the built-in plugins, and the action
    namespaces and slices the host and built-ins already use (the template's
    actions are ``NAME.*`` and its slice is ``NAME``)."""
    from host import config as config_mod
    from host import plugins

    registry = plugins.load(config_mod.Config(), entry_points=False)
    return frozenset({name.split(".")[0] for name in registry.actions} | set(registry.slices)
                     | set(registry.plugin_names) | set(config_mod.BUILTIN_PLUGINS))


def check_name(name: str) -> None:
    if not NAME.fullmatch(name) or keyword.iskeyword(name):
        raise ScaffoldError(
            f"invalid plugin name {name!r}: use 1 to 40 lowercase letters, digits and "
            f"underscores, starting with a letter (it names the package worldhost_{name}, "
            f"the actions {name}.* and the slice {name})")
    if name in reserved_names():
        raise ScaffoldError(f"invalid plugin name {name!r}: the host or a built-in plugin "
                            f"already uses it as a plugin, action namespace or slice name")


def new_plugin(name: str, parent: Path) -> Path:
    """Create ``parent/worldhost-NAME`` from the template; returns its path.
    Refuses to overwrite anything: the folder must not exist."""
    check_name(name)
    target = parent / f"worldhost-{name}"
    if target.exists():
        raise ScaffoldError(f"{target} already exists; not overwriting it")
    template = resources.files("host") / "templates" / "plugin"
    files = list(_walk(template, ""))
    target.mkdir(parents=True)
    for relative, source in files:
        out = target / relative.replace(PLACEHOLDER, name).removesuffix(".tmpl")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(source.read_text(encoding="utf-8").replace(PLACEHOLDER, name),
                       encoding="utf-8")
    return target


def _walk(folder: Traversable, prefix: str) -> list[tuple[str, Traversable]]:
    out = []
    for entry in sorted(folder.iterdir(), key=lambda e: e.name):
        if entry.name == "__pycache__":
            continue
        if entry.is_dir():
            out += _walk(entry, f"{prefix}{entry.name}/")
        elif entry.name.endswith(".tmpl"):
            out.append((prefix + entry.name, entry))
    return out
