"""The core of every world: its own meta slice (``host``: the world's store
identity and random seed), ``world.snapshot``, and the offline import's
``world.replace_slices``.
"""

from __future__ import annotations

import secrets
from typing import Any

import msgspec

from host.actions import Action, Context, Invalid, NotFound, Role
from host.hookspecs import hookimpl
from state.slices import SliceSpec


class SnapshotParams(msgspec.Struct, forbid_unknown_fields=True):
    slices: list[str] | None = None


# what world.snapshot shows of a session (its journaled record less what identifies
# its credential, its token or its address)
PUBLIC_FIELDS = ("id", "name", "role", "state", "created_at", "disconnected_at", "world")


def snapshot(ctx: Context, params: SnapshotParams) -> dict[str, Any]:
    """The world's slices, and its sessions as the ``sessions`` slice (their records
    without resume-token hashes, credentials or addresses: those stay in the server)."""
    names = params.slices
    if names is not None:
        unknown = [n for n in names if n not in ctx.world.slices and n != "sessions"]
        if unknown:
            raise NotFound(f"no slice named {unknown[0]!r}",
                           details={"path": "params.slices", "unknown": unknown})
    slices = ctx.world.snapshot([n for n in names if n != "sessions"] if names is not None
                                else None)
    if names is None or "sessions" in names:
        slices["sessions"] = {s["id"]: {k: s[k] for k in PUBLIC_FIELDS}
                              for s in ctx.host.sessions()}
    return {"generation": ctx.host.generation, "slices": slices}


class ReplaceSlicesParams(msgspec.Struct, forbid_unknown_fields=True):
    slices: dict[str, dict[str, Any]]


PROTECTED = ("host", "sessions")


def replace_slices(ctx: Context, p: ReplaceSlicesParams) -> dict[str, Any]:
    """Internal (offline import): replace whole slices from an export, checked first."""
    ready = {}
    for name, entry in p.slices.items():
        where = f"params.slices.{name}"
        if name in PROTECTED or name not in ctx.world.slices:
            raise Invalid(f"slice {name!r} cannot be imported here",
                          details={"path": where, "message": "unknown or protected slice"})
        spec = ctx.world[name].spec
        version, keyed, data = entry.get("version"), entry.get("keyed"), entry.get("data")
        if not isinstance(version, int) or version > spec.version:
            raise Invalid(f"slice {name!r} is version {version}; this host has {spec.version}",
                          details={"path": f"{where}.version", "message": "unsupported version"})
        if keyed is not spec.keyed or (keyed and not isinstance(data, dict)):
            raise Invalid(f"slice {name!r} has the wrong shape",
                          details={"path": f"{where}.data", "message": "wrong shape"})
        if version < spec.version:
            if spec.migrate is None:
                raise Invalid(f"slice {name!r} version {version} cannot be migrated",
                              details={"path": f"{where}.version", "message": "no migration"})
            data = spec.migrate(version, data)
        ready[name] = spec.fill_defaults(data)
    for name, data in ready.items():
        s = ctx.world[name]
        if s.spec.keyed:
            s.replace_all(data)
        else:
            s.set(data)
    return {"replaced": sorted(ready)}


def _world_meta() -> dict[str, Any]:
    return {"world_id": secrets.token_hex(8), "seed": secrets.token_hex(16)}


@hookimpl
def register_actions() -> list[Action]:
    return [
        Action("world.snapshot", snapshot, SnapshotParams, Role.viewer, changes_world=False,
               description="The merged world, or the named slices."),
        Action("world.replace_slices", replace_slices, ReplaceSlicesParams, Role.admin,
               internal=True, reply="world.slices_replaced"),
    ]


@hookimpl
def register_slices() -> list[SliceSpec]:
    return [SliceSpec("host", _world_meta, version=1)]
