"""A third-party plugin: a shared counter. Loaded through the ``worldhost`` entry point."""

from __future__ import annotations

from typing import Any

import msgspec

from host import Action, Context, Invalid, Role, SliceSpec, hookimpl


class Settings(msgspec.Struct, forbid_unknown_fields=True):
    max_step: int = 100


class AddParams(msgspec.Struct, forbid_unknown_fields=True):
    n: int = 1


def add(ctx: Context, p: AddParams) -> dict[str, Any]:
    if not 1 <= p.n <= ctx.settings.max_step:
        raise Invalid(f"n must be from 1 to {ctx.settings.max_step}",
                      details={"path": "params.n", "message": "out of range"})
    counter = ctx.value("counter")
    total = counter.value["total"] + p.n
    counter.set({"total": total})
    ctx.broadcast("counter.changed", {"total": total}, others=True)
    return {"total": total}


def get(ctx: Context, p: None) -> dict[str, Any]:
    return {"total": ctx.value("counter").value["total"]}


@hookimpl
def register_actions() -> list[Action]:
    return [
        Action("counter.add", add, AddParams, Role.player, reply="counter.added"),
        Action("counter.get", get, None, Role.viewer, changes_world=False, reply="counter.value"),
    ]


@hookimpl
def register_slices() -> list[SliceSpec]:
    return [SliceSpec("counter", lambda: {"total": 0}, version=1)]
