"""Shortest travel-time routes over the map, cached until the map changes."""

from __future__ import annotations

import heapq
import math
from collections import OrderedDict
from typing import Any

from plugins.map import EDGE, NODE

Adjacency = list[list[tuple[int, str, float]]]  # node index -> (other node, edge id, time)


class Graph:
    """The map compiled for searching: nodes as indices, edges both ways."""

    def __init__(self, records: Any) -> None:
        self.ids = sorted(record["id"] for key, record in records.items() if key.startswith(NODE))
        self.index = {node_id: i for i, node_id in enumerate(self.ids)}
        self.forward: Adjacency = [[] for _ in self.ids]
        self.backward: Adjacency = [[] for _ in self.ids]
        for key, e in records.items():
            if key.startswith(EDGE):
                a, b = self.index[e["from"]], self.index[e["to"]]
                time = e["length"] / e["speed"]
                self.forward[a].append((b, e["id"], time))
                self.backward[b].append((a, e["id"], time))
        for edges in (*self.forward, *self.backward):
            edges.sort(key=lambda item: item[1])  # the search order must not hang on dict order


class Router:
    """Least travel time routes over the ``map`` slice's records, cached per (from, to).

    Bidirectional Dijkstra: the search grows from both ends and stops once no
    shorter meeting is possible, so it settles far fewer nodes than a search
    from one end. Deterministic (ties break by node index and edge id), so
    replay routes the same way. ``invalidate()`` must be called when the map changes.
    """

    def __init__(self, cache_size: int = 20_000) -> None:
        self.cache_size = cache_size
        self._graph: Graph | None = None
        self._cache: OrderedDict[tuple[str, str], list[str] | None] = OrderedDict()
        self.computed = 0

    def invalidate(self) -> None:
        self._graph = None
        self._cache.clear()

    def route(self, records: Any, start: str, goal: str) -> list[str] | None:
        """Edge ids from start to goal by least travel time; [] if equal; None if unreachable."""
        if start == goal:
            return []
        key = (start, goal)
        if key in self._cache:
            self._cache.move_to_end(key)
            cached = self._cache[key]
            return None if cached is None else list(cached)
        if self._graph is None:
            self._graph = Graph(records)
        path = self._search(self._graph, start, goal)
        self._cache[key] = path
        if len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return None if path is None else list(path)  # callers may consume their copy

    def _search(self, graph: Graph, start_id: str, goal_id: str) -> list[str] | None:
        self.computed += 1
        start, goal = graph.index.get(start_id), graph.index.get(goal_id)
        if start is None or goal is None:
            return None
        pop, push = heapq.heappop, heapq.heappush
        # side 0 searches forward from start, side 1 backward from goal
        dist: tuple[dict[int, float], dict[int, float]] = ({start: 0.0}, {goal: 0.0})
        came: tuple[dict[int, tuple[int, str]], dict[int, tuple[int, str]]] = ({}, {})
        heaps: tuple[list[tuple[float, int]], list[tuple[float, int]]] = \
            ([(0.0, start)], [(0.0, goal)])
        done: tuple[set[int], set[int]] = (set(), set())
        adjacency = (graph.forward, graph.backward)
        best, meet = math.inf, -1
        while heaps[0] and heaps[1]:
            if heaps[0][0][0] + heaps[1][0][0] >= best:
                break
            side = 0 if heaps[0][0][0] <= heaps[1][0][0] else 1
            mine, other = dist[side], dist[1 - side]
            d, node = pop(heaps[side])
            if node in done[side]:
                continue
            done[side].add(node)
            for to, edge_id, time in adjacency[side][node]:
                new = d + time
                if new < mine.get(to, math.inf):
                    mine[to] = new
                    came[side][to] = (node, edge_id)
                    push(heaps[side], (new, to))
                if to in other:
                    total = mine[to] + other[to]
                    if total < best or (total == best and to < meet):
                        best, meet = total, to
        if meet < 0:
            return None
        path: list[str] = []
        node = meet
        while node != start:
            node, edge_id = came[0][node]
            path.append(edge_id)
        path.reverse()
        node = meet
        while node != goal:
            node, edge_id = came[1][node]
            path.append(edge_id)
        return path
