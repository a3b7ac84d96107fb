"""A store written before worlds is adopted as world ``main`` with nothing lost.

tests/fixtures/format2 holds a store written by the single-world server (store
format 2, sessions kept in the world), killed with kill -9 so that its last
actions are only in its journal. The current server, started on a copy, must
find everything: the world, the sessions with their resume tokens, the replies
remembered for repeated request ids; and must have moved the sessions into its
own store.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
from pathlib import Path
from typing import Any

import trio
from trio_websocket import open_websocket_url

from serverproc import ServerProcess

FIXTURE = Path(__file__).parent / "fixtures" / "format2"


async def _call(ws: Any, action: str, params: dict[str, Any], rid: Any) -> dict[str, Any]:
    await ws.send_message(json.dumps({"action": action, "params": params, "id": rid}))
    while True:
        message = json.loads(await ws.get_message())
        if message.get("re") == rid:
            return message  # type: ignore[no-any-return]


async def _resume_and_look(url: str, opened: dict[str, Any]) -> dict[str, Any]:
    async with open_websocket_url(url) as ws:
        info = json.loads(await ws.get_message())["data"]
        resumed = await _call(ws, "session.resume", {
            "session_id": opened["session_id"], "resume_token": opened["resume_token"],
            "last_seq": 0}, 1)
        assert resumed["signal"] == "session.resumed", resumed
        opened["resume_token"] = resumed["data"]["resume_token"]
        history = await _call(ws, "chat.history", {"limit": 10}, "history")
        snapshot = await _call(ws, "world.snapshot", {"slices": ["map"]}, "map")
        # ada's chat.say of id 4 was acknowledged before the crash: sent again, it is
        # answered from memory and not applied twice (bob's gets applied: he never sent it)
        again = await _call(ws, "chat.say", {"text": "before worlds"}, 4) \
            if opened.get("said_4") else None
        history_after = await _call(ws, "chat.history", {"limit": 10}, "after")
        listed = await _call(ws, "world.list", {}, "list")
        return {"info": info, "history": history["data"], "map": snapshot["data"],
                "again": again, "history_after": history_after["data"],
                "list": listed["data"]}


def test_a_store_from_before_worlds_is_adopted_with_nothing_lost(tmp_path: Path) -> None:
    for name in ("world.db", "world.db-wal", "world.db.admin-token"):
        shutil.copy(FIXTURE / name, tmp_path / name)
    sessions = json.loads((FIXTURE / "sessions.json").read_text())
    sessions["ada"]["said_4"] = True
    db = tmp_path / "world.db"
    # the fixture's sessions were left long ago: a resume window that still holds them
    config = tmp_path / "c.toml"
    config.write_text("[sessions]\nresume_ttl_s = 1e10\n")
    server = ServerProcess(db, config=config).start()
    try:
        seen = trio.run(_resume_and_look, server.url, sessions["ada"])
        assert seen["info"]["world_id"] == "main"
        assert [w["world_id"] for w in seen["info"]["worlds"]] == ["main"]
        texts = [m["text"] for m in seen["history"]["messages"]]
        assert texts == ["before worlds", "bob was here"]
        assert set(seen["map"]["slices"]["map"]) >= {"node:a", "node:b", "node:c"}
        assert seen["again"]["signal"] == "chat.said", seen["again"]
        assert seen["history_after"] == seen["history"]
        assert seen["list"]["joined"] == "main"
        # bob, disconnected when the old server died, resumes too, in world main
        bob = trio.run(_resume_and_look, server.url, sessions["bob"])
        assert bob["list"]["joined"] == "main"
        server.kill9()
        server.start()  # and it all stays after a crash of the new server
        again = trio.run(_resume_and_look, server.url, sessions["ada"])
        assert [m["text"] for m in again["history"]["messages"]] == texts
    finally:
        assert server.stop() == 0
    # the sessions moved to the server's own store; the world's store no longer has them
    with sqlite3.connect(tmp_path / "world.server.db") as conn:
        ids = {r[0] for r in conn.execute("SELECT key FROM records WHERE slice = 'sessions'")}
    conn.close()
    assert {sessions["ada"]["session_id"], sessions["bob"]["session_id"]} <= ids
    with sqlite3.connect(db) as conn:
        names = {r[0] for r in conn.execute("SELECT name FROM slices")}
    conn.close()
    assert "sessions" not in names and {"map", "chat", "host"} <= names
