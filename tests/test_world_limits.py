"""What a client can store is bounded: every string it chooses has a maximum length
(a ``validation_error`` naming the field), and every slice a budget (a ``conflict``
naming the budget's config key). Through the real server, WebSocket and store."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from host.actions import MAX_ID_LENGTH
from host.client import CallError
from worlds import grid_map

LONG = "x" * (MAX_ID_LENGTH + 1)
ADMIN = {"admin_token": "adm", "port": 0}


async def admin_host(worldhost: Any, **plugins: Any) -> Any:
    return await worldhost.start(config={"host": ADMIN, "plugins": plugins}, listen=True)


async def seeded(root: Any) -> None:
    """A small world every refused action below would otherwise have changed."""
    await root.call("map.import", map_data=grid_map(2, 2))
    await root.call("simulation.add_agent", id="t1", kind="truck", node="n0_0")
    await root.call("process.start", template_id="QUICK_POLL", problem_statement="q",
                    agents=["ann"], process_id="p1")


TOO_LONG = [
    ("map.add_node", {"id": LONG, "x": 0, "y": 0}, "params.id"),
    ("map.update_node", {"id": LONG, "x": 1}, "params.id"),
    ("map.add_edge", {"id": "e", "from": LONG, "to": "n0_0", "length": 1}, "params.from"),
    ("map.add_edge", {"id": LONG, "from": "n0_0", "to": "n0_1", "length": 1}, "params.id"),
    ("map.remove_node", {"id": LONG}, "params.id"),
    ("simulation.add_agent", {"id": LONG, "kind": "truck", "node": "n0_0"}, "params.id"),
    ("simulation.add_agent", {"id": "t2", "kind": "truck", "node": "n0_0",
                              "route": ["n0_0>n1_0", LONG]}, "params.route[1]"),
    ("simulation.add_agent", {"id": "t2", "kind": "truck", "node": "n0_0", "target": LONG},
     "params.target"),
    ("simulation.add_package", {"id": LONG, "origin": "n0_0", "destination": "n1_1"},
     "params.id"),
    ("simulation.add_package", {"id": "p", "origin": "n0_0", "destination": LONG},
     "params.destination"),
    ("process.start", {"template_id": "QUICK_POLL", "problem_statement": "q",
                       "agents": ["ann", LONG]}, "params.agents[1]"),
    ("process.start", {"template_id": "QUICK_POLL", "problem_statement": "q" * 16_385,
                       "agents": ["ann"]}, "params.problem_statement"),
    ("process.start", {"template_id": "QUICK_POLL", "problem_statement": "q",
                       "agents": ["ann"], "process_id": LONG}, "params.process_id"),
    ("process.turn", {"process_id": "p1", "agent_id": LONG}, "params.agent_id"),
    ("nav.push", {"agent_id": LONG, "path": "/a"}, "params.agent_id"),
    ("nav.goto", {"agent_id": LONG, "path": "/a"}, "params.agent_id"),
    ("chat.say", {"text": "x" * 4001}, "params.text"),
]


@pytest.mark.parametrize("action, params, path", TOO_LONG)
async def test_an_over_long_string_is_refused_naming_the_field(
        worldhost: Any, action: str, params: dict[str, Any], path: str) -> None:
    h = await admin_host(worldhost)
    async with h.client("root", token="adm") as root:
        await seeded(root)
        before = h.encoded_world()
        with pytest.raises(CallError) as err:
            await root.call(action, params)
        assert err.value.code == "validation_error"
        assert err.value.details["path"] == path, err.value.details
        assert h.encoded_world() == before
        await root.call("host.ping")  # the connection survives


async def test_an_8_mib_id_never_reaches_the_store(worldhost: Any, tmp_path: Path) -> None:
    """Ten ``map.add_node`` with 8 MiB ids used to make a 723 MiB store."""
    h = await admin_host(worldhost)
    async with h.client("ada") as ada:
        for i in range(3):
            with pytest.raises(CallError) as err:
                await ada.call("map.add_node", id=f"{i}" * (8 * 1024 * 1024), x=0, y=0)
            assert err.value.code == "validation_error"
            assert err.value.details["path"] == "params.id"
        await ada.call("map.add_node", id="fine", x=0, y=0)
    assert h.world()["map"] == {"node:fine": {"id": "fine", "x": 0.0, "y": 0.0,
                                              "building": None}}
    await h.stop()
    assert sum(f.stat().st_size for f in tmp_path.glob("world-*")) < 4 * 1024 * 1024


async def test_a_building_is_bounded(worldhost: Any) -> None:
    h = await admin_host(worldhost, map={"max_building_bytes": 100})
    async with h.client("ada") as ada:
        await ada.call("map.add_node", id="a", x=0, y=0, building={"type": "depot", "n": 1})
        before = h.encoded_world()
        for action in ("map.add_node", "map.update_node"):
            with pytest.raises(CallError) as err:
                await ada.call(action, id="a" if action.endswith("update_node") else "b", x=0,
                               y=0, building={"type": "depot", "notes": "n" * 100})
            assert err.value.code == "validation_error"
            assert err.value.details["path"] == "params.building"
            assert "max_building_bytes" in err.value.message
        assert h.encoded_world() == before


@pytest.mark.parametrize("budget, limit, fill", [
    ("max_nodes", 3, lambda i: ("map.add_node", {"id": f"m{i}", "x": 0, "y": 0})),
    ("max_bytes", 600, lambda i: ("map.add_node", {"id": f"m{i}", "x": 0, "y": 0,
                                                   "building": {"type": "t" * 50}})),
    ("max_edges", 2, lambda i: ("map.add_edge", {"id": f"e{i}", "from": "a", "to": "b",
                                                 "length": 1})),
])
async def test_the_map_budget_is_refused_with_conflict_naming_it(
        worldhost: Any, budget: str, limit: int, fill: Any) -> None:
    h = await admin_host(worldhost, map={budget: limit})
    async with h.client("ada") as ada:
        if budget == "max_edges":
            await ada.call("map.add_node", id="a", x=0, y=0)
            await ada.call("map.add_node", id="b", x=0, y=0)
        refused = None
        for i in range(20):
            action, params = fill(i)
            before = h.encoded_world()
            try:
                await ada.call(action, params)
            except CallError as err:
                refused = err
                break
        assert refused is not None and refused.code == "conflict"
        assert budget in refused.message and refused.details["budget"] == budget
        assert h.encoded_world() == before
        # room is made by removing, and the count survives a restart (counted anew)
        await ada.call("map.remove_node" if action == "map.add_node" else "map.remove_edge",
                       id="m0" if action == "map.add_node" else "e0")
    await h.crash()
    await h.restart()
    async with h.client("bob") as bob:
        await bob.call(action, params)
        with pytest.raises(CallError) as again:
            await bob.call(*fill(99))
        assert again.value.code == "conflict" and again.value.details["budget"] == budget


async def test_a_map_import_over_max_bytes_is_refused(worldhost: Any) -> None:
    h = await admin_host(worldhost, map={"max_bytes": 1000})
    async with h.client("root", token="adm") as root:
        before = h.encoded_world()
        with pytest.raises(CallError) as err:
            await root.call("map.import", map_data=grid_map(5, 5))
        assert err.value.code == "conflict" and "max_bytes" in err.value.message
        assert h.encoded_world() == before


async def test_simulation_budgets(worldhost: Any) -> None:
    h = await admin_host(worldhost, simulation={"max_agents": 2, "max_packages": 2,
                                                "max_agent_bytes": 2000})
    async with h.client("root", token="adm") as root:
        await root.call("map.import", map_data=grid_map(2, 2))
        with pytest.raises(CallError) as err:
            await root.call("simulation.add_agent", id="big", kind="truck", node="n0_0",
                            route=["n0_0>n1_0"] * 200)
        assert err.value.code == "validation_error" and "max_agent_bytes" in err.value.message
        for kind, params in (("agent", {"kind": "truck", "node": "n0_0"}),
                             ("package", {"origin": "n0_0", "destination": "n1_1"})):
            for i in range(2):
                await root.call(f"simulation.add_{kind}", id=f"{kind}{i}", **params)
            before = h.encoded_world()
            with pytest.raises(CallError) as err:
                await root.call(f"simulation.add_{kind}", id=f"{kind}9", **params)
            assert err.value.code == "conflict"
            assert err.value.details["budget"] == f"max_{kind}s"
            assert h.encoded_world() == before
        state = (await root.call("simulation.export_state"))["state_data"]
        state["packages"].append({"id": "p3", "origin": "n0_0", "destination": "n1_1"})
        with pytest.raises(CallError) as err:
            await root.call("simulation.import_state", state_data=state)
        assert err.value.code == "validation_error"
        assert err.value.details["path"] == "params.state_data.packages"
        assert "max_packages" in err.value.message


async def test_process_and_navigation_budgets(worldhost: Any) -> None:
    h = await admin_host(worldhost, process_controller={"max_processes": 2,
                                                        "max_process_bytes": 8000},
                         navigation={"max_agents": 2})
    async with h.client("ada") as ada:
        for i in range(2):
            await ada.call("process.start", template_id="STANDARD_BRAINSTORM",
                           problem_statement="q", agents=["ann", "ben"], process_id=f"p{i}")
        with pytest.raises(CallError) as err:
            await ada.call("process.start", template_id="QUICK_POLL", problem_statement="q",
                           agents=["ann"])
        assert err.value.code == "conflict" and err.value.details["budget"] == "max_processes"
        await ada.call("process.turn", process_id="p0", agent_id="ann", artifact="a" * 3000)
        await ada.call("process.turn", process_id="p0", agent_id="ann", artifact="a" * 3000)
        before = h.encoded_world()
        with pytest.raises(CallError) as err:
            await ada.call("process.turn", process_id="p0", agent_id="ann", artifact="a" * 3000)
        assert err.value.code == "conflict"
        assert err.value.details["budget"] == "max_process_bytes"
        assert h.encoded_world() == before
        await ada.call("process.cancel", process_id="p0")  # cancelling is always possible

        await ada.call("nav.push", agent_id="a1", path="/x")
        await ada.call("nav.push", agent_id="a2", path="/x")
        await ada.call("nav.push", agent_id="a2", path="/y")  # an existing record may change
        with pytest.raises(CallError) as err:
            await ada.call("nav.goto", agent_id="a3", path="/x")
        assert err.value.code == "conflict" and err.value.details["budget"] == "max_agents"
