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
