"""Session housekeeping and chat."""

from __future__ import annotations

from typing import Any

import pytest
import trio
from trio_websocket import ConnectionClosed

from host.client import CallError


async def test_max_sessions_refuses_new_ones_but_not_resumes(worldhost: Any) -> None:
    h = await worldhost.start(config={"plugins": {"session_cleanup": {"max_sessions": 2}}})
    async with h.client("a") as a, h.client("b", reconnect=True) as b:
        with pytest.raises(CallError) as err:
            async with h.client("c"):
                pass
        assert err.value.code == "conflict" and "server full" in err.value.message
        await b.drop()
        assert (await b.call("host.ping", back=True)) == {"back": True}  # resumed
        assert b.resumes == 1
        await a.call("host.ping")


async def test_sweeps_end_idle_and_abandoned_sessions(worldhost: Any, autojump_clock: Any) -> None:
    h = await worldhost.start(config={
        "sessions": {"resume_ttl_s": 300},
        "plugins": {"session_cleanup": {"session_timeout_s": 3600, "sweep_interval_s": 300}}})
    async with h.client("watcher") as watcher, h.client("idler") as idler, \
            h.client("leaver", reconnect=False) as leaver:
        await leaver.aclose()
        await trio.sleep(301 + 300)  # past the resume window, at the next sweep
        expired = await watcher.next_signal("session.expired")
        assert expired["data"]["name"] == "leaver" and expired["data"]["reason"] == "expired"
        for _ in range(11):
            await trio.sleep(300)
            await watcher.call("host.ping")  # the watcher stays active; the idler does not
        gone = await watcher.next_signal("session.expired")
        assert gone["data"]["name"] == "idler" and gone["data"]["reason"] == "timeout"
        ended = await idler.next_signal("session.ended")
        assert ended["data"]["reason"] == "timeout"
    names = {r["name"] for r in h.sessions().values()}
    assert "leaver" not in names and "idler" not in names


async def test_stats_list_and_kick(worldhost: Any) -> None:
    h = await worldhost.start(config={"host": {"admin_token": "adm"}})
    async with h.client("root", token="adm") as root, h.client("bob") as bob:
        await bob.call("chat.say", text="hi")
        stats = await root.call("sessions.stats")
        assert stats["active"] == 2 and stats["total"] == 2 and stats["disconnected"] == 0
        by_name = {s["name"]: s for s in stats["sessions"]}
        assert by_name["bob"]["actions_applied"] >= 1 and by_name["bob"]["signals_sent"] >= 3
        assert {"name", "role", "connected", "created_at", "last_active"} <= set(by_name["bob"])
        listed = (await bob.call("sessions.list"))["sessions"]
        assert {s["name"] for s in listed} == {"root", "bob"} and "id" not in listed[0]
        assert "id" in (await root.call("sessions.list"))["sessions"][0]
        with pytest.raises(CallError) as err:
            await bob.call("sessions.stats")
        assert err.value.code == "forbidden"
        kicked = await root.call("sessions.kick", session_id=bob.session_id)
        assert kicked["reason"] == "kicked"
        ended = await bob.next_signal("session.ended")
        assert ended["data"]["reason"] == "kicked"
    assert [r["name"] for r in h.sessions().values()] == ["root"]


async def test_sync_state_follows_the_phase(worldhost: Any) -> None:
    h = await worldhost.start()
    async with h.client("ada") as ada:
        first = await ada.next_signal("sync_state")
        assert first["data"]["phase"] == "onboarding"
        assert first["data"]["session"]["name"] == "ada"
        assert {s["name"] for s in first["data"]["slices"]} >= {"map", "simulation", "process"}
        assert first["data"]["simulation"] == {"running": False, "tick": 0, "tick_hz": 20.0,
                                               "current_day": 0, "agents": 0, "packages": 0}
        await ada.call("process.start", template_id="QUICK_POLL", problem_statement="?",
                       agents=["x"])
        again = await ada.next_signal("sync_state")
        assert again["data"]["phase"] == "playing" and len(again["data"]["processes"]) == 1


async def test_chat_history_pages_back_oldest_first(worldhost: Any) -> None:
    h = await worldhost.start(config={"plugins": {"chat": {"keep": 30}}})
    async with h.client("ada") as ada, h.client("bob") as bob:
        for i in range(40):
            await ada.call("chat.say", text=f"line {i}\nsecond line")
        heard = await bob.next_signal("chat.message")
        assert heard["data"]["from"] == "ada" and heard["data"]["text"].startswith("line 0")
        page = await bob.call("chat.history", limit=10)
        assert [m["text"].split("\n")[0] for m in page["messages"]] == \
            [f"line {i}" for i in range(30, 40)]
        assert page["more"] is True
        older = await bob.call("chat.history", limit=100, before=page["messages"][0]["id"])
        assert [m["text"].split("\n")[0] for m in older["messages"]] == \
            [f"line {i}" for i in range(10, 30)]  # only the last 30 are kept
        assert older["more"] is False
    assert len([k for k in h.world()["chat"] if k.startswith("m:")]) == 30


async def test_chat_survives_a_crash(worldhost: Any) -> None:
    h = await worldhost.start()
    async with h.client("ada", reconnect=False) as ada:
        await ada.call("chat.say", text="remember me")
    await h.crash()
    await h.restart()
    async with h.client("bob") as bob:
        assert [m["text"] for m in (await bob.call("chat.history"))["messages"]] == ["remember me"]


async def test_kicked_connection_is_closed(worldhost: Any) -> None:
    from host.testing import raw_connection
    import json
    h = await worldhost.start(config={"host": {"admin_token": "adm"}})
    async with h.client("root", token="adm") as root, raw_connection(h) as ws:
        await ws.get_message()
        await ws.send_message(json.dumps({"id": 1, "action": "session.open",
                                          "params": {"name": "victim"}}))
        sid = json.loads(await ws.get_message())["data"]["session_id"]
        await root.call("sessions.kick", session_id=sid)
        with pytest.raises(ConnectionClosed):
            while True:
                await ws.get_message()


async def test_sync_state_is_sent_again_only_when_the_summary_changes(worldhost: Any) -> None:
    """A turn changes the process slice but not the summary: no sync_state. The
    turn that completes the process changes its status and the phase: sync_state."""
    h = await worldhost.start()
    async with h.client("ada") as ada, h.client("bob") as bob:
        await ada.next_signal("sync_state")
        started = await ada.call("process.start", template_id="QUICK_POLL",
                                 problem_statement="?", agents=["x", "y"])
        pid = started["process_id"]
        assert (await ada.next_signal("sync_state"))["data"]["phase"] == "playing"
        await ada.call("process.turn", process_id=pid, agent_id="x", artifact="yes")
        await bob.call("chat.say", text="after the first turn")
        after_turn = await ada.next_signal()
        assert after_turn["signal"] == "chat.message", after_turn
        await ada.call("process.turn", process_id=pid, agent_id="y", artifact="no")
        again = await ada.next_signal("sync_state")
        assert again["data"]["phase"] == "onboarding"
        assert [p["status"] for p in again["data"]["processes"]] == ["completed"]
