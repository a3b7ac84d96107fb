"""A plugin for the benchmarks: ``bench.touch``, the most trivial world-changing action
(one record written, journaled and answered once durable, nothing broadcast)."""

from __future__ import annotations

from typing import Any

import msgspec

from host.actions import Action, Context, Role
from host.plugins import hookimpl
from state.slices import SliceSpec


class TouchParams(msgspec.Struct, forbid_unknown_fields=True):
    key: str
    n: int = 0


def touch(ctx: Context, p: TouchParams) -> dict[str, Any]:
    ctx.keyed("bench").put(p.key, {"n": p.n})
    return {"n": p.n}


@hookimpl
def register_actions() -> list[Action]:
    return [Action("bench.touch", touch, TouchParams, Role.player)]


@hookimpl
def register_slices() -> list[SliceSpec]:
    return [SliceSpec("bench", dict, keyed=True)]


@hookimpl
def register_process_templates() -> list[dict[str, Any]]:
    """One open-ended stage, so a benchmark can take turns for as long as it runs."""
    return [{"id": "BENCH_ENDLESS", "name": "Endless", "stages": [
        {"id": "talk", "name": "Talk", "advance": "manual"}]}]
