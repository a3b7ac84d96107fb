"""Shortest travel-time routes over the map, cached until the map changes."""

from __future__ import annotations

import bisect
import heapq
import math
from collections import OrderedDict
from typing import Any

from plugins.map import EDGE, NODE

Link = tuple[str, str, float]  # (the node at the other end, edge id, travel time)


def _edge_id(link: Link) -> str:
    return link[1]


class Graph:
    """The map compiled for searching, both ways; kept up to date edit by edit, so a
    map edit does not cost a recompile of the whole map on the next route."""

    def __init__(self, records: Any) -> None:
        self.forward: dict[str, list[Link]] = {}
        self.backward: dict[str, list[Link]] = {}
        self.ends: dict[str, tuple[str, str]] = {}  # edge id -> (from, to)
        for key, record in records.items():
            if key.startswith(NODE):
                self.add_node(record["id"])
        for key, record in records.items():
            if key.startswith(EDGE):
                out, back = self._links(record)
                self.forward[record["from"]].append(out)
                self.backward[record["to"]].append(back)
        for links in (*self.forward.values(), *self.backward.values()):
            links.sort(key=_edge_id)  # the search order must not hang on dict order

    def add_node(self, node_id: str) -> None:
        self.forward.setdefault(node_id, [])
        self.backward.setdefault(node_id, [])

    def _links(self, edge: dict[str, Any]) -> tuple[Link, Link]:
        """The edge as its start node sees it and as its end node does."""
        time = edge["length"] / edge["speed"]
        self.ends[edge["id"]] = (edge["from"], edge["to"])
        return (edge["to"], edge["id"], time), (edge["from"], edge["id"], time)

    def add_edge(self, edge: dict[str, Any]) -> None:
        out, back = self._links(edge)
        bisect.insort(self.forward[edge["from"]], out, key=_edge_id)
        bisect.insort(self.backward[edge["to"]], back, key=_edge_id)

    def remove_edge(self, edge_id: str) -> None:
        start, end = self.ends.pop(edge_id)
        self.forward[start] = [link for link in self.forward[start] if link[1] != edge_id]
        self.backward[end] = [link for link in self.backward[end] if link[1] != edge_id]

    def remove_node(self, node_id: str) -> None:
        for link in (*self.forward[node_id], *self.backward[node_id]):
            if link[1] in self.ends:
                self.remove_edge(link[1])
        del self.forward[node_id], self.backward[node_id]


class Router:
    """Least travel time routes over the ``map`` slice's records, cached per (from, to).

    Bidirectional Dijkstra: the search grows from both ends and stops once no
    shorter meeting is possible, so it settles far fewer nodes than a search
    from one end. Deterministic (ties break by node id, links are tried in edge id
    order), so replay routes the same way. Map edits reach it through
    ``map_changed``; ``invalidate()`` forgets everything.
    """

    def __init__(self, cache_size: int = 20_000) -> None:
        self.cache_size = cache_size
        self._graph: Graph | None = None
        # tuples: the cyclic GC stops tracking tuples of strings, so a full cache costs
        # the collector nothing
        self._cache: OrderedDict[tuple[str, str], tuple[str, ...] | None] = OrderedDict()
        self.computed = 0

    def invalidate(self) -> None:
        self._graph = None
        self._cache.clear()

    def map_changed(self, action: str, reply: dict[str, Any]) -> None:
        """Bring the compiled graph up to date after one of the map plugin's edits."""
        if action == "map.update_node":
            return  # coordinates and buildings do not change travel times
        self._cache.clear()
        graph = self._graph
        if graph is None:
            return  # compiled when next needed
        if action == "map.add_node":
            graph.add_node(reply["node"]["id"])
        elif action == "map.add_edge":
            graph.add_edge(reply["edge"])
        elif action == "map.remove_edge":
            graph.remove_edge(reply["id"])
        elif action == "map.remove_node":
            graph.remove_node(reply["id"])
        else:
            self._graph = None

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
        self._cache[key] = None if path is None else tuple(path)
        if len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return path  # the caller's own list

    def _search(self, graph: Graph, start: str, goal: str) -> list[str] | None:
        self.computed += 1
        if start not in graph.forward or goal not in graph.forward:
            return None
        pop, push = heapq.heappop, heapq.heappush
        # side 0 searches forward from start, side 1 backward from goal
        dist: tuple[dict[str, float], dict[str, float]] = ({start: 0.0}, {goal: 0.0})
        came: tuple[dict[str, tuple[str, str]], dict[str, tuple[str, str]]] = ({}, {})
        heaps: tuple[list[tuple[float, str]], list[tuple[float, str]]] = \
            ([(0.0, start)], [(0.0, goal)])
        done: tuple[set[str], set[str]] = (set(), set())
        links = (graph.forward, graph.backward)
        best, meet = math.inf, None
        while heaps[0] and heaps[1]:
            if heaps[0][0][0] + heaps[1][0][0] >= best:
                break
            side = 0 if heaps[0][0][0] <= heaps[1][0][0] else 1
            mine, other = dist[side], dist[1 - side]
            d, node = pop(heaps[side])
            if node in done[side]:
                continue
            done[side].add(node)
            for to, edge_id, time in links[side][node]:
                new = d + time
                if new < mine.get(to, math.inf):
                    mine[to] = new
                    came[side][to] = (node, edge_id)
                    push(heaps[side], (new, to))
                if to in other:
                    total = mine[to] + other[to]
                    if total < best or (total == best and meet is not None and to < meet):
                        best, meet = total, to
        if meet is None:
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
