"""The map plugin: editing, validation that names the item, import/export, big maps."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import cbor2
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from host.client import CallError
from host.testing import open_harness
from state.codec import DecodeError
from worlds import grid_map

ADMIN = {"host": {"admin_token": "adm"}}


async def admin_host(worldhost: Any, **config: Any) -> Any:
    return await worldhost.start(config={**ADMIN, **config})


async def test_edit_and_broadcast(worldhost: Any) -> None:
    h = await admin_host(worldhost)
    async with h.client("ada") as ada, h.client("bob") as bob:
        added = await ada.call("map.add_node", id="a", x=1, y=2,
                               building={"type": "warehouse", "capacity": 9})
        assert added["node"]["building"] == {"type": "warehouse", "capacity": 9}
        assert (await bob.next_signal("map.node_added"))["data"]["node"]["id"] == "a"
        await ada.call("map.add_node", id="b", x=3, y=4)
        await ada.call("map.add_edge", id="ab", **{"from": "a", "to": "b"}, length=5, speed=2)
        assert (await bob.next_signal("map.edge_added"))["data"]["edge"]["length"] == 5.0
        updated = await ada.call("map.update_node", id="b", building=None, x=7)
        assert updated["node"] == {"id": "b", "x": 7.0, "y": 4.0, "building": None}
        removed = await ada.call("map.remove_node", id="a")
        assert removed == {"id": "a", "removed_edges": ["ab"]}
        assert (await bob.next_signal("map.node_removed"))["data"]["id"] == "a"
        exported = await ada.call("map.export")
        assert exported["map_data"] == {"nodes": [{"id": "b", "x": 7.0, "y": 4.0,
                                                   "building": None}], "edges": []}


BAD_IMPORTS = [
    ({"nodes": [{"id": "a", "x": 0, "y": 0}, {"id": "a", "x": 1, "y": 1}], "edges": []},
     "params.map_data.nodes[1].id", "duplicate node id 'a'"),
    ({"nodes": [{"id": "a", "x": 0, "y": 0}],
      "edges": [{"id": "e", "from": "a", "to": "b", "length": 1, "speed": 1}]},
     "params.map_data.edges[0].to", "missing node 'b'"),
    ({"nodes": [{"id": "a", "x": 0, "y": 0}, {"id": "b", "x": 0, "y": 0}],
      "edges": [{"id": "e", "from": "a", "to": "b", "length": 1, "speed": 1},
                {"id": "e", "from": "b", "to": "a", "length": 1, "speed": 1}]},
     "params.map_data.edges[1].id", "duplicate edge id 'e'"),
    ({"nodes": [{"id": "a", "x": 0, "y": 0}, {"id": "b", "x": 0, "y": 0}],
      "edges": [{"id": "e", "from": "a", "to": "b", "length": 0, "speed": 1}]},
     "params.map_data.edges[0].length", "positive"),
    ({"nodes": [{"id": "a", "x": 0, "y": 0}, {"id": "b", "x": 0, "y": 0}],
      "edges": [{"id": "e", "from": "a", "to": "b", "length": 1, "speed": -2}]},
     "params.map_data.edges[0].speed", "positive"),
    ({"nodes": [{"id": "a", "x": 0, "y": 0, "colour": "red"}], "edges": []},
     "params.map_data.nodes[0]", "colour"),
    ({"nodes": [{"id": "a", "x": "0", "y": 0}], "edges": []}, "params.map_data.nodes[0].x",
     "float"),
    ({"nodes": [{"id": "a", "x": 0, "y": 0, "building": {"kind": "depot"}}], "edges": []},
     "params.map_data.nodes[0].building.type", "type"),
    ({"nodes": [{"id": f"n{i}", "x": 0, "y": 0} for i in range(6)], "edges": []},
     "params.map_data.nodes", "maximum of 5"),
    ({"nodes": [], "edges": [], "extra": []}, "params.map_data", "extra"),
    # a missing part is named, never read as empty (an empty map is sent as empty lists)
    ({}, "params.map_data.nodes", "nodes"),
    ({"nodes": [{"id": "a", "x": 0, "y": 0}]}, "params.map_data.edges", "edges"),
    ({"edges": []}, "params.map_data.nodes", "nodes"),
]


@pytest.mark.parametrize("map_data, path, words", BAD_IMPORTS)
async def test_import_validation_names_the_item_and_changes_nothing(
        worldhost: Any, map_data: dict[str, Any], path: str, words: str) -> None:
    h = await admin_host(worldhost, plugins={"map": {"max_nodes": 5}})
    async with h.client("root", token="adm") as root:
        await root.call("map.import", map_data=grid_map(2, 2))
        before = h.encoded_world()
        with pytest.raises(CallError) as err:
            await root.call("map.import", map_data=map_data)
        assert err.value.code == "validation_error"
        assert err.value.details["path"].startswith(path), err.value.details
        assert words in err.value.message
        assert h.encoded_world() == before


async def test_non_finite_coordinates_are_refused_over_cbor(worldhost: Any) -> None:
    h = await admin_host(worldhost)
    async with h.client("ada", encoding="cbor") as ada:
        before = h.encoded_world()
        with pytest.raises(DecodeError):  # the client library will not even send it
            await ada.call("map.add_node", id="z", x=float("inf"), y=0)
        # sent anyway, the host refuses the frame: CBOR can carry inf, the decoder cannot
        await ada.send_raw(cbor2.dumps({"id": "z", "action": "map.add_node",
                                        "params": {"id": "z", "x": float("inf"), "y": 0}}))
        refused = await ada.next_signal("error")
        assert refused["data"]["code"] == "bad_frame" and refused["re"] is None
        assert h.encoded_world() == before


async def test_import_is_admin_only_and_conflicts_while_running(worldhost: Any) -> None:
    h = await admin_host(worldhost)
    async with h.client("ada") as ada, h.client("root", token="adm") as root:
        with pytest.raises(CallError) as err:
            await ada.call("map.import", map_data=grid_map(2, 2))
        assert err.value.code == "forbidden"
        await root.call("simulation.start", tick_hz=1)
        with pytest.raises(CallError) as err:
            await root.call("map.import", map_data=grid_map(2, 2))
        assert err.value.code == "conflict"
        await root.call("simulation.stop")
        assert await root.call("map.import", map_data=grid_map(2, 2)) == {"nodes": 4, "edges": 8}


async def test_removing_a_node_in_use_is_a_conflict(worldhost: Any) -> None:
    h = await admin_host(worldhost)
    async with h.client("root", token="adm") as root:
        await root.call("map.import", map_data=grid_map(3, 1))
        await root.call("simulation.add_agent", id="t", kind="truck", node="n0_0")
        await root.call("simulation.add_package", id="p", origin="n1_0", destination="n2_0")
        for node, words in (("n0_0", "agent 't'"), ("n1_0", "package 'p'"),
                            ("n2_0", "package 'p'")):
            before = h.encoded_world()
            with pytest.raises(CallError) as err:
                await root.call("map.remove_node", id=node)
            assert err.value.code == "conflict" and words in err.value.message
            assert h.encoded_world() == before


async def test_round_trip_export_import_export(worldhost: Any) -> None:
    first = await admin_host(worldhost)
    second = await admin_host(worldhost)
    async with first.client("root", token="adm") as a, second.client("root", token="adm") as b:
        await a.call("map.import", map_data=grid_map(6, 5))
        await a.call("map.update_node", id="n2_2", building={"type": "fuel_station", "price": 2})
        exported = (await a.call("map.export"))["map_data"]
        await b.call("map.import", map_data=exported)
        assert (await b.call("map.export"))["map_data"] == exported


@pytest.mark.parametrize("encoding", ["json", "cbor"])
async def test_a_100000_node_map_round_trips_in_chunks(worldhost: Any, encoding: str) -> None:
    h = await admin_host(worldhost)
    big = grid_map(400, 250, two_way=False)  # 100,000 nodes, 199,350 edges: ~25 MB of JSON
    async with h.client("root", token="adm", encoding=encoding) as root:
        assert await root.call("map.import", map_data=big) == {"nodes": 100_000,
                                                               "edges": len(big["edges"])}
        exported = (await root.call("map.export"))["map_data"]
    assert len(exported["nodes"]) == 100_000
    assert {n["id"] for n in exported["nodes"]} == {n["id"] for n in big["nodes"]}
    assert len(exported["edges"]) == len(big["edges"])


ids = st.sampled_from([f"n{i}" for i in range(8)])
edits = st.lists(st.one_of(
    st.tuples(st.just("add_node"), ids, st.floats(-1e6, 1e6), st.floats(-1e6, 1e6)),
    st.tuples(st.just("remove_node"), ids),
    st.tuples(st.just("add_edge"), ids, ids, st.floats(0.1, 100)),
    st.tuples(st.just("remove_edge"), st.integers(0, 20)),
), max_size=25)


@given(edits)
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
async def test_random_edit_sequences_keep_the_graph_whole(tmp_path: Path, steps: list) -> None:
    async with open_harness(tmp_path) as harness:
        h = await harness.start(db=tmp_path / f"edits-{uuid.uuid4().hex}.db")
        await _edit(h, steps)


async def _edit(h: Any, steps: list) -> None:
    async with h.client("ed") as ed:
        for n, step in enumerate(steps):
            before = h.encoded_world()
            try:
                if step[0] == "add_node":
                    await ed.call("map.add_node", id=step[1], x=step[2], y=step[3])
                elif step[0] == "remove_node":
                    await ed.call("map.remove_node", id=step[1])
                elif step[0] == "add_edge":
                    await ed.call("map.add_edge", id=f"e{n}", length=step[3],
                                  **{"from": step[1], "to": step[2]})
                else:
                    await ed.call("map.remove_edge", id=f"e{step[1]}")
            except CallError as err:
                assert err.code in ("validation_error", "not_found", "conflict")
                assert h.encoded_world() == before
            world = h.world()["map"]
            nodes = {k[5:] for k in world if k.startswith("node:")}
            for key, edge in world.items():
                if key.startswith("edge:"):
                    assert edge["from"] in nodes and edge["to"] in nodes


budget_edits = st.lists(st.one_of(
    st.tuples(st.just("add_node"), ids, st.integers(0, 120)),
    st.tuples(st.just("update_node"), ids, st.integers(0, 120)),
    st.tuples(st.just("remove_node"), ids),
    st.tuples(st.just("add_edge"), ids, ids),
    st.tuples(st.just("remove_edge"), st.integers(0, 30)),
), max_size=30)


@given(budget_edits)
@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
async def test_random_edits_keep_the_map_within_its_budget(tmp_path: Path, steps: list) -> None:
    """Under a tight budget: every refusal is a conflict naming it, the map never
    exceeds it, and the usage kept action by action equals the usage counted anew
    (so a replay decides exactly as the live run did)."""
    from plugins.map import count
    limits = {"max_nodes": 5, "max_edges": 6, "max_bytes": 700}
    async with open_harness(tmp_path) as harness:
        h = await harness.start(db=tmp_path / f"budget-{uuid.uuid4().hex}.db",
                                config={"plugins": {"map": limits}})
        async with h.client("ed") as ed:
            for n, step in enumerate(steps):
                building = {"type": "b" * step[2]} if step[0].endswith("_node") and \
                    len(step) > 2 else None
                try:
                    if step[0] == "add_node":
                        await ed.call("map.add_node", id=step[1], x=0, y=0, building=building)
                    elif step[0] == "update_node":
                        await ed.call("map.update_node", id=step[1], building=building)
                    elif step[0] == "remove_node":
                        await ed.call("map.remove_node", id=step[1])
                    elif step[0] == "add_edge":
                        await ed.call("map.add_edge", id=f"e{n}", length=1,
                                      **{"from": step[1], "to": step[2]})
                    else:
                        await ed.call("map.remove_edge", id=f"e{step[1]}")
                except CallError as err:
                    assert err.code in ("validation_error", "not_found", "conflict")
                    if err.code == "conflict":
                        assert err.details["budget"] in limits
                usage = count(h.world()["map"])
                assert usage["nodes"] <= 5 and usage["edges"] <= 6 and usage["bytes"] <= 700
                kept = h.host.world().api.runtime("map").get("usage")  # made by the first edit
                assert kept is None or kept.current(h.world()["map"]) == usage
