"""A plugin for tests/test_outbound_log.py: ``shout.say``, an action that changes
nothing (no journal entry) and still tells everyone else (``shout.heard``)."""

from __future__ import annotations

from typing import Any

import msgspec

from host.actions import Action, Context, Role
from host.plugins import hookimpl


class SayParams(msgspec.Struct, forbid_unknown_fields=True):
    text: str


def say(ctx: Context, p: SayParams) -> dict[str, Any]:
    ctx.broadcast("shout.heard", {"text": p.text}, others=True)
    return {"text": p.text}


@hookimpl
def register_actions() -> list[Action]:
    return [Action("shout.say", say, SayParams, Role.player, changes_world=False,
                   reply="shout.said")]
