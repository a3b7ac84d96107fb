"""Shortest travel-time routes over the map, cached until the map changes."""

from __future__ import annotations

import heapq
import math
from collections import OrderedDict
from typing import Any

from plugins.map import EDGE, NODE


class Router:
    """Dijkstra over the ``map`` slice's records, with results cached per (from, to).

    Deterministic: ties are broken by node id, so replay routes the same way.
    ``invalidate()`` must be called when the map changes.
    """

    def __init__(self, cache_size: int = 20_000) -> None:
        self.cache_size = cache_size
        self._adjacency: dict[str, list[tuple[str, str, float]]] | None = None
        self._coords: dict[str, tuple[float, float]] = {}
        self._ratio = 0.0
        self._cache: OrderedDict[tuple[str, str], list[str] | None] = OrderedDict()
        self.computed = 0

    def invalidate(self) -> None:
        self._adjacency = None
        self._cache.clear()

    def _adjacent(self, records: Any) -> dict[str, list[tuple[str, str, float]]]:
        if self._adjacency is None:
            adjacency: dict[str, list[tuple[str, str, float]]] = {}
            self._coords = {}
            ratio = float("inf")  # least travel time per unit of straight-line distance
            for key, record in records.items():
                if key.startswith(NODE):
                    self._coords[record["id"]] = (record["x"], record["y"])
            for key, e in records.items():
                if key.startswith(EDGE):
                    time = e["length"] / e["speed"]
                    adjacency.setdefault(e["from"], []).append((e["to"], e["id"], time))
                    (x1, y1), (x2, y2) = self._coords[e["from"]], self._coords[e["to"]]
                    straight = math.hypot(x2 - x1, y2 - y1)
                    if straight > 0:
                        ratio = min(ratio, time / straight)
            for edges in adjacency.values():
                edges.sort(key=lambda item: item[1])
            self._adjacency = adjacency
            self._ratio = 0.0 if ratio == float("inf") else ratio
        return self._adjacency

    def route(self, records: Any, start: str, goal: str) -> list[str] | None:
        """Edge ids from start to goal by least travel time; [] if equal; None if unreachable."""
        if start == goal:
            return []
        key = (start, goal)
        if key in self._cache:
            self._cache.move_to_end(key)
            cached = self._cache[key]
            return None if cached is None else list(cached)
        path = self._search(self._adjacent(records), start, goal)
        if NODE + goal not in records:
            path = None
        self._cache[key] = path
        if len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return None if path is None else list(path)  # callers may consume their copy

    def _search(self, adjacency: dict[str, list[tuple[str, str, float]]],
                start: str, goal: str) -> list[str] | None:
        """A*: Dijkstra guided by straight-line distance times the least time per unit of
        distance of any edge, which never overestimates, so routes stay shortest."""
        self.computed += 1
        coords, ratio = self._coords, self._ratio
        if goal not in coords or start not in coords:
            return None
        gx, gy = coords[goal]

        def estimate(node: str) -> float:
            x, y = coords[node]
            return ratio * math.hypot(gx - x, gy - y)

        best = {start: 0.0}
        came: dict[str, tuple[str, str]] = {}
        heap = [(estimate(start), start)]
        pop, push = heapq.heappop, heapq.heappush
        while heap:
            _, node = pop(heap)
            if node == goal:
                path = []
                while node != start:
                    node, edge = came[node]
                    path.append(edge)
                path.reverse()
                return path
            cost = best[node]
            for to, edge_id, time in adjacency.get(node, ()):
                new = cost + time
                if new < best.get(to, math.inf):
                    best[to] = new
                    came[to] = (node, edge_id)
                    push(heap, (new + estimate(to), to))
        return None
