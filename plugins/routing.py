"""Shortest travel-time routes over the map, cached until the map changes."""

from __future__ import annotations

import heapq
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
        self._cache: OrderedDict[tuple[str, str], list[str] | None] = OrderedDict()
        self.computed = 0

    def invalidate(self) -> None:
        self._adjacency = None
        self._cache.clear()

    def _adjacent(self, records: Any) -> dict[str, list[tuple[str, str, float]]]:
        if self._adjacency is None:
            adjacency: dict[str, list[tuple[str, str, float]]] = {}
            for key in records.keys():
                if key.startswith(EDGE):
                    e = records[key]
                    adjacency.setdefault(e["from"], []).append(
                        (e["to"], e["id"], e["length"] / e["speed"]))
            for edges in adjacency.values():
                edges.sort(key=lambda item: item[1])
            self._adjacency = adjacency
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
        path = self._dijkstra(self._adjacent(records), start, goal)
        if NODE + goal not in records:
            path = None
        self._cache[key] = path
        if len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return None if path is None else list(path)  # callers may consume their copy

    def _dijkstra(self, adjacency: dict[str, list[tuple[str, str, float]]],
                  start: str, goal: str) -> list[str] | None:
        self.computed += 1
        best = {start: 0.0}
        came: dict[str, tuple[str, str]] = {}
        heap = [(0.0, start)]
        while heap:
            cost, node = heapq.heappop(heap)
            if node == goal:
                path = []
                while node != start:
                    node, edge = came[node]
                    path.append(edge)
                path.reverse()
                return path
            if cost > best[node]:
                continue
            for to, edge_id, time in adjacency.get(node, ()):
                new = cost + time
                if new < best.get(to, float("inf")):
                    best[to] = new
                    came[to] = (node, edge_id)
                    heapq.heappush(heap, (new, to))
        return None
