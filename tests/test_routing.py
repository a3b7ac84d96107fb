"""The router: least travel time routes over the map, the same ones every time."""

from __future__ import annotations

import heapq
import math
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from plugins.map import EDGE, NODE
from plugins.routing import Router


@st.composite
def maps(draw: st.DrawFn) -> dict[str, Any]:
    count = draw(st.integers(2, 12))
    records: dict[str, Any] = {NODE + f"n{i}": {"id": f"n{i}", "x": 0.0, "y": 0.0,
                                                "building": None} for i in range(count)}
    edges = draw(st.lists(st.tuples(st.integers(0, count - 1), st.integers(0, count - 1),
                                    st.integers(1, 9), st.integers(1, 3)), max_size=40))
    for j, (a, b, length, speed) in enumerate(edges):
        records[EDGE + f"e{j}"] = {"id": f"e{j}", "from": f"n{a}", "to": f"n{b}",
                                   "length": float(length), "speed": float(speed)}
    return records


def least_time(records: dict[str, Any], start: str, goal: str) -> float | None:
    """Textbook Dijkstra from one end: the reference."""
    best = {start: 0.0}
    heap = [(0.0, start)]
    while heap:
        cost, node = heapq.heappop(heap)
        if node == goal:
            return cost
        if cost > best[node]:
            continue
        for e in records.values():
            if "from" in e and e["from"] == node:
                new = cost + e["length"] / e["speed"]
                if new < best.get(e["to"], math.inf):
                    best[e["to"]] = new
                    heapq.heappush(heap, (new, e["to"]))
    return None


@settings(max_examples=150, deadline=None)
@given(maps())
def test_every_route_is_a_least_time_path(records: dict[str, Any]) -> None:
    router = Router()
    nodes = [r["id"] for k, r in records.items() if k.startswith(NODE)]
    for start in nodes:
        for goal in nodes:
            path = router.route(records, start, goal)
            expected = least_time(records, start, goal)
            if expected is None:
                assert path is None
                continue
            assert path is not None
            at, cost = start, 0.0
            for edge_id in path:  # a connected walk from start to goal ...
                edge = records[EDGE + edge_id]
                assert edge["from"] == at
                at, cost = edge["to"], cost + edge["length"] / edge["speed"]
            assert at == goal
            assert math.isclose(cost, expected, rel_tol=1e-9, abs_tol=1e-9)  # ... and least


@settings(max_examples=50, deadline=None)
@given(maps())
def test_routes_do_not_depend_on_the_order_records_were_added(records: dict[str, Any]) -> None:
    reordered = dict(reversed(list(records.items())))
    nodes = sorted(r["id"] for k, r in records.items() if k.startswith(NODE))
    first, second = Router(), Router()
    for start in nodes:
        for goal in nodes:
            assert first.route(records, start, goal) == second.route(reordered, start, goal)


def test_a_changed_map_is_searched_again_after_invalidate() -> None:
    records = {NODE + n: {"id": n, "x": 0.0, "y": 0.0, "building": None} for n in "abc"}
    records[EDGE + "ab"] = {"id": "ab", "from": "a", "to": "b", "length": 1.0, "speed": 1.0}
    records[EDGE + "bc"] = {"id": "bc", "from": "b", "to": "c", "length": 1.0, "speed": 1.0}
    router = Router()
    assert router.route(records, "a", "c") == ["ab", "bc"]
    records[EDGE + "ac"] = {"id": "ac", "from": "a", "to": "c", "length": 1.0, "speed": 1.0}
    assert router.route(records, "a", "c") == ["ab", "bc"]  # cached until told
    router.invalidate()
    assert router.route(records, "a", "c") == ["ac"]
    assert router.route(records, "c", "a") is None
    returned = router.route(records, "a", "c")
    assert returned is not None
    returned.clear()  # callers own their copy
    assert router.route(records, "a", "c") == ["ac"]


edits = st.lists(st.one_of(
    st.tuples(st.just("map.add_node"), st.integers(0, 14)),
    st.tuples(st.just("map.remove_node"), st.integers(0, 14)),
    st.tuples(st.just("map.add_edge"), st.integers(0, 14), st.integers(0, 14), st.integers(1, 9)),
    st.tuples(st.just("map.remove_edge"), st.integers(0, 60)),
    st.tuples(st.just("map.update_node"), st.integers(0, 14)),
), max_size=25)


@settings(max_examples=100, deadline=None)
@given(maps(), edits)
def test_a_graph_kept_up_to_date_edit_by_edit_routes_as_one_compiled_afresh(
        records: dict[str, Any], changes: list[tuple[Any, ...]]) -> None:
    """What a map edit's reply says is enough to keep the compiled graph exact."""
    kept = Router()
    nodes = sorted(r["id"] for k, r in records.items() if k.startswith(NODE))
    kept.route(records, nodes[0], nodes[-1])  # compiled before the edits
    for n, change in enumerate(changes):
        action, node = change[0], f"n{change[1]}"
        if action == "map.add_node" and NODE + node not in records:
            records[NODE + node] = {"id": node, "x": 0.0, "y": 0.0, "building": None}
            reply: dict[str, Any] = {"node": records[NODE + node]}
        elif action == "map.remove_node" and NODE + node in records:
            gone = [k for k, e in records.items()
                    if k.startswith(EDGE) and node in (e["from"], e["to"])]
            for key in [*gone, NODE + node]:
                del records[key]
            reply = {"id": node, "removed_edges": sorted(k[len(EDGE):] for k in gone)}
        elif action == "map.add_edge" and {NODE + node, NODE + f"n{change[2]}"} <= set(records):
            edge = {"id": f"x{n}", "from": node, "to": f"n{change[2]}",
                    "length": float(change[3]), "speed": 1.0}
            records[EDGE + edge["id"]] = edge
            reply = {"edge": edge}
        elif action == "map.remove_edge" and EDGE + f"e{change[1]}" in records:
            del records[EDGE + f"e{change[1]}"]
            reply = {"id": f"e{change[1]}"}
        elif action == "map.update_node" and NODE + node in records:
            reply = {"node": records[NODE + node]}
        else:
            continue
        kept.map_changed(action, reply)
        fresh = Router()
        present = sorted(r["id"] for k, r in records.items() if k.startswith(NODE))
        for start in present:
            for goal in present:
                assert kept.route(records, start, goal) == fresh.route(records, start, goal)
