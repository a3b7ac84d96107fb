"""A request that fails changes nothing: for every built-in action, failing requests
leave the canonical encoding of the world byte-identical."""

from __future__ import annotations

from typing import Any

import pytest

from host.actions import Action, Role
from host.client import CallError
from host.plugins import hookimpl
from state.slices import SliceSpec

MAP = {"nodes": [{"id": "a", "x": 0, "y": 0, "building": None},
                 {"id": "b", "x": 1, "y": 0, "building": {"type": "depot"}}],
       "edges": [{"id": "ab", "from": "a", "to": "b", "length": 1, "speed": 1},
                 {"id": "ba", "from": "b", "to": "a", "length": 1, "speed": 1}]}

# action -> failing requests (params, expected error code)
FAILING: dict[str, list[tuple[dict[str, Any], str]]] = {
    "host.ping": [],  # cannot fail
    "world.snapshot": [({"slices": ["nope"]}, "not_found"), ({"slices": "map"}, "validation_error")],
    "host.describe": [({"actions": ["nope"]}, "not_found"),
                      ({"actions": "chat.say"}, "validation_error")],
    "session.open": [({"name": "x"}, "conflict"), ({}, "validation_error")],
    "session.resume": [({"session_id": "s", "resume_token": "t"}, "conflict")],
    "session.close": [({"x": 1}, "validation_error")],
    "world.subscribe": [({"topics": ["nope"]}, "validation_error"), ({}, "validation_error")],
    "world.unsubscribe": [({"topics": "chat"}, "validation_error")],
    "map.export": [({"x": 1}, "validation_error")],
    "map.import": [
        ({"map_data": {"nodes": [{"id": "a", "x": 0, "y": 0}, {"id": "a", "x": 1, "y": 1}],
                       "edges": []}},
         "validation_error"),
        ({"map_data": {"nodes": [], "edges": [{"id": "e", "from": "a", "to": "z", "length": 1,
                                               "speed": 1}]}}, "validation_error"),
        ({"map_data": {"nodes": [{"id": "q", "x": 0, "y": 0}], "edges": []}}, "conflict"),
    ],
    "map.add_node": [({"id": "a", "x": 0, "y": 0}, "validation_error"),
                     ({"id": "z", "x": "far", "y": 0}, "validation_error")],
    "map.update_node": [({"id": "nope"}, "not_found"), ({"id": "a", "x": None, "bogus": 1},
                                                         "validation_error")],
    "map.remove_node": [({"id": "nope"}, "not_found"), ({"id": "a"}, "conflict")],
    "map.add_edge": [({"id": "ab", "from": "a", "to": "b", "length": 1, "speed": 1},
                      "validation_error"),
                     ({"id": "x", "from": "a", "to": "b", "length": -1, "speed": 1},
                      "validation_error")],
    "map.remove_edge": [({"id": "nope"}, "not_found")],
    "simulation.start": [({"tick_hz": 0}, "validation_error")],
    "simulation.stop": [({}, "conflict")],
    "simulation.step": [({"ticks": 0}, "validation_error")],
    "simulation.set": [({"dt_s": -1}, "validation_error"), ({"ticks_per_day": 0},
                                                           "validation_error")],
    "simulation.add_agent": [({"id": "t1", "kind": "truck", "node": "a"}, "validation_error"),
                             ({"id": "t2", "kind": "ufo", "node": "a"}, "validation_error"),
                             ({"id": "t3", "kind": "truck", "node": "zz"}, "validation_error")],
    "simulation.remove_agent": [({"id": "nope"}, "not_found")],
    "simulation.add_package": [({"id": "p1", "origin": "a", "destination": "b"},
                                "validation_error"),
                               ({"id": "p9", "origin": "a", "destination": "nowhere"},
                                "validation_error")],
    "simulation.cancel_package": [({"id": "nope"}, "not_found")],
    "simulation.export_state": [({"x": 1}, "validation_error")],
    "simulation.import_state": [({"state_data": {"graph": MAP, "agents": [], "packages": []}},
                                 "validation_error"),
                                ({"state_data": {"graph": MAP, "agents": [{"id": "x"}],
                                                 "packages": [], "metadata": {}}},
                                 "validation_error")],
    "process.templates": [({"x": 1}, "validation_error")],
    "process.start": [({"template_id": "NOPE", "problem_statement": "", "agents": ["a"]},
                       "not_found"),
                      ({"template_id": "QUICK_POLL", "problem_statement": "", "agents": []},
                       "validation_error")],
    "process.turn": [({"process_id": "p1", "agent_id": "stranger"}, "conflict"),
                     ({"process_id": "nope", "agent_id": "a"}, "not_found")],
    "process.advance": [({"process_id": "nope"}, "not_found")],
    "process.pause": [({"process_id": "nope"}, "not_found")],
    "process.resume": [({"process_id": "p1"}, "conflict")],
    "process.cancel": [({"process_id": "nope"}, "not_found")],
    "process.status": [({"process_id": "nope"}, "not_found")],
    "process.list": [({"x": 1}, "validation_error")],
    "nav.push": [({"agent_id": "a", "path": "relative"}, "validation_error"),
                 ({"agent_id": "a", "path": "/../up"}, "validation_error")],
    "nav.pop": [({"agent_id": "nobody"}, "conflict")],
    "nav.goto": [({"agent_id": "a", "path": "/a\x01b"}, "validation_error")],
    "nav.reset": [({"agent_id": ""}, "validation_error")],
    "nav.get": [({}, "validation_error")],
    "sessions.kick": [({"session_id": "nope"}, "not_found")],
    "sessions.stats": [({"x": 1}, "validation_error")],
    "sessions.list": [({"x": 1}, "validation_error")],
    "chat.say": [({"text": "x" * 4001}, "validation_error"), ({"text": "bell\x07"},
                                                              "validation_error")],
    "chat.history": [({"limit": 0}, "validation_error")],
    "world.list": [({"x": 1}, "validation_error")],
    "world.create": [({"world_id": "../up"}, "validation_error"), ({"world_id": "main"},
                                                                  "conflict")],
    "world.archive": [({"world_id": "nope"}, "not_found"), ({"world_id": ""},
                                                           "validation_error")],
    "world.join": [({"world_id": "nope"}, "not_found"), ({"world_id": "a\x00b"},
                                                        "validation_error")],
    "world.leave": [({"x": 1}, "validation_error")],
}


async def test_every_builtin_action_has_failing_requests(worldhost: Any) -> None:
    h = await worldhost.start()
    served = {n for n, a in h.host.registry.actions.items() if not a.internal}
    assert served == set(FAILING)


async def test_failing_requests_leave_the_world_byte_identical(worldhost: Any) -> None:
    h = await worldhost.start(config={"host": {"admin_token": "adm"}})
    async with h.client("root", token="adm") as admin:
        await admin.call("map.import", map_data=MAP)
        await admin.call("simulation.add_agent", id="t1", kind="truck", node="a")
        await admin.call("simulation.add_package", id="p1", origin="a", destination="b")
        await admin.call("process.start", template_id="QUICK_POLL", problem_statement="?",
                         agents=["a"], process_id="p1")
        await admin.call("chat.say", text="hello")
        for action, requests in FAILING.items():
            for params, code in requests:
                before = h.encoded_world()
                with pytest.raises(CallError) as err:
                    await admin.call(action, params)
                assert err.value.code == code, (action, params, err.value)
                assert h.encoded_world() == before, (action, params)


class Faulty:
    """A plugin whose handler changes the world and then fails."""

    __name__ = "faulty"

    @hookimpl
    def register_actions(self) -> list[Action]:
        def half_done(ctx: Any, p: Any) -> dict[str, Any]:
            ctx.value("faulty").set({"n": 1})
            ctx.keyed("map").put("node:ghost", {"id": "ghost", "x": 0.0, "y": 0.0,
                                                "building": None})
            ctx.broadcast("faulty.never", {})
            raise KeyError("boom")
        return [Action("faulty.half_done", half_done, None, Role.player)]

    @hookimpl
    def register_slices(self) -> list[SliceSpec]:
        return [SliceSpec("faulty", lambda: {"n": 0})]


async def test_a_failing_handler_is_internal_error_and_rolled_back(
        worldhost: Any, caplog: pytest.LogCaptureFixture) -> None:
    h = await worldhost.start(Faulty())
    async with h.client("ada") as ada:
        before = h.encoded_world()
        with pytest.raises(CallError) as err:
            await ada.call("faulty.half_done")
        assert err.value.code == "internal_error"
        assert h.encoded_world() == before
        assert await ada.call("host.ping", still="alive") == {"still": "alive"}
    assert "Traceback" in caplog.text and "boom" in caplog.text


async def test_read_only_actions_cannot_write(worldhost: Any) -> None:
    class Sneaky:
        __name__ = "sneaky"

        @hookimpl
        def register_actions(self) -> list[Action]:
            def sneak(ctx: Any, p: Any) -> dict[str, Any]:
                ctx.keyed("map").put("node:x", {})
                return {}
            return [Action("sneaky.write", sneak, None, Role.viewer, changes_world=False)]

    h = await worldhost.start(Sneaky())
    async with h.client("ada") as ada:
        before = h.encoded_world()
        with pytest.raises(CallError) as err:
            await ada.call("sneaky.write")
        assert err.value.code == "internal_error"
        assert h.encoded_world() == before


async def test_a_connection_that_fails_closes_alone_with_1011(worldhost: Any) -> None:
    from trio_websocket import ConnectionClosed

    from host.testing import raw_connection

    class Unencodable:
        __name__ = "unencodable"

        @hookimpl
        def register_actions(self) -> list[Action]:
            return [Action("bad.reply", lambda ctx, p: {"x": object()}, None, Role.viewer,
                           changes_world=False)]

    h = await worldhost.start(Unencodable())
    async with h.client("bystander") as bystander, raw_connection(h) as ws:
        import json
        await ws.get_message()
        await ws.send_message(json.dumps({"id": 1, "action": "session.open",
                                          "params": {"name": "victim"}}))
        await ws.get_message()
        await ws.get_message()
        await ws.send_message(json.dumps({"id": 2, "action": "bad.reply"}))
        with pytest.raises(ConnectionClosed) as closed:
            while True:
                await ws.get_message()
        assert closed.value.reason.code == 1011
        assert await bystander.call("host.ping", fine=True) == {"fine": True}
