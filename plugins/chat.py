"""Chat: messages broadcast to every session, the last 1,000 kept in the world.

The slice is keyed (one record per message, ``m:`` + a zero-padded number), so
a new message writes one row however long the history is.
"""

from __future__ import annotations

from typing import Any

import msgspec

from host.actions import Action, Context, Invalid, Role
from host.plugins import hookimpl
from host.topics import Topic
from state.slices import SliceSpec

MAX_TEXT = 4000
KEEP = 1000


class Settings(msgspec.Struct, forbid_unknown_fields=True):
    keep: int = KEEP


class SayParams(msgspec.Struct, forbid_unknown_fields=True):
    text: str


class HistoryParams(msgspec.Struct, forbid_unknown_fields=True):
    limit: int = 50
    before: int | None = None


def _key(n: int) -> str:
    return f"m:{n:012d}"


def say(ctx: Context, p: SayParams) -> dict[str, Any]:
    text = p.text
    if not text.strip():
        raise Invalid("text is empty", details={"path": "params.text", "message": "empty"})
    if len(text) > MAX_TEXT:
        raise Invalid(f"text is {len(text)} characters; at most {MAX_TEXT}",
                      details={"path": "params.text", "message": "too long"})
    if any((ord(c) < 32 and c != "\n") or 127 <= ord(c) < 160 for c in text):
        raise Invalid("text has control characters (only newline is allowed)",
                      details={"path": "params.text", "message": "control characters"})
    chat = ctx.keyed("chat")
    meta = chat.get("meta") or {"next": 1}
    n = meta["next"]
    message = {"id": n, "from": ctx.session.name if ctx.session else "host",
               "session_id": ctx.session.id if ctx.session else None, "text": text,
               "at": ctx.now}
    chat.put(_key(n), message)
    chat.put("meta", {"next": n + 1})
    old = _key(n - ctx.settings.keep)
    if old in chat:
        chat.delete(old)
    ctx.broadcast("chat.message", {"id": n, "from": message["from"], "text": text,
                                   "at": message["at"]}, topic="chat")
    return {"id": n}


def history(ctx: Context, p: HistoryParams) -> dict[str, Any]:
    if not 1 <= p.limit <= KEEP:
        raise Invalid(f"limit must be from 1 to {KEEP}",
                      details={"path": "params.limit", "message": "out of range"})
    chat = ctx.keyed("chat")
    last = (chat.get("meta") or {"next": 1})["next"] - 1
    end = last if p.before is None else min(last, p.before - 1)
    messages: list[dict[str, Any]] = []
    n = end
    while n > 0 and len(messages) < p.limit:
        record = chat.get(_key(n))
        if record is None:
            break
        messages.append({k: record[k] for k in ("id", "from", "text", "at")})
        n -= 1
    messages.reverse()
    return {"messages": messages, "more": n > 0 and chat.get(_key(n)) is not None}


@hookimpl
def register_actions() -> list[Action]:
    return [
        Action("chat.say", say, SayParams, Role.player, reply="chat.said"),
        Action("chat.history", history, HistoryParams, Role.viewer, changes_world=False,
               reply="chat.history"),
    ]


@hookimpl
def register_topics() -> list[Topic]:
    return [Topic("chat", description="chat.message")]


@hookimpl
def register_slices() -> list[SliceSpec]:
    return [SliceSpec("chat", dict, version=1, keyed=True)]
