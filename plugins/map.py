"""The map: a directed graph of nodes and edges (slice ``map``).

The slice is a keyed collection, one record per node (``node:ID``) and per edge
(``edge:ID``), so editing one node rewrites one row. Imports build the new graph
aside, validate all of it, then swap it in: all or nothing.
"""

from __future__ import annotations

import math
from typing import Any

import msgspec

from host.actions import Action, Conflict, Context, Invalid, NotFound, Role
from host.config import error_path
from host.plugins import hookimpl
from state.slices import KeyedSlice, SliceSpec

NODE = "node:"
EDGE = "edge:"


class Settings(msgspec.Struct, forbid_unknown_fields=True):
    max_nodes: int = 1_000_000
    max_edges: int = 1_000_000


class Node(msgspec.Struct, forbid_unknown_fields=True):
    id: str
    x: float
    y: float
    building: dict[str, Any] | None = None


class Edge(msgspec.Struct, forbid_unknown_fields=True, rename={"from_": "from"}):
    id: str
    from_: str
    to: str
    length: float
    speed: float = 1.0


class MapData(msgspec.Struct, forbid_unknown_fields=True):
    nodes: list[Node] = []
    edges: list[Edge] = []


class ImportParams(msgspec.Struct, forbid_unknown_fields=True):
    map_data: MapData


class NodeUpdate(msgspec.Struct, forbid_unknown_fields=True):
    id: str
    x: float | None = None
    y: float | None = None
    building: dict[str, Any] | None | msgspec.UnsetType = msgspec.UNSET


class IdParams(msgspec.Struct, forbid_unknown_fields=True):
    id: str


def _bad(path: str, message: str) -> Invalid:
    return Invalid(f"{message} at {path}", details={"path": path, "message": message})


def node_record(node: Node, path: str) -> dict[str, Any]:
    if not node.id:
        raise _bad(f"{path}.id", "node id must not be empty")
    for axis in ("x", "y"):
        if not math.isfinite(getattr(node, axis)):
            raise _bad(f"{path}.{axis}", f"node {node.id!r} has a non-finite {axis}")
    building = node.building
    if building is not None and not isinstance(building.get("type"), str):
        raise _bad(f"{path}.building.type", f"node {node.id!r}: building needs a string type")
    return {"id": node.id, "x": float(node.x), "y": float(node.y), "building": building}


def edge_record(edge: Edge, path: str, has_node: Any) -> dict[str, Any]:
    if not edge.id:
        raise _bad(f"{path}.id", "edge id must not be empty")
    for field in ("length", "speed"):
        value = getattr(edge, field)
        if not (math.isfinite(value) and value > 0):
            raise _bad(f"{path}.{field}", f"edge {edge.id!r}: {field} must be a positive number")
    for end, node_id in (("from", edge.from_), ("to", edge.to)):
        if not has_node(node_id):
            raise _bad(f"{path}.{end}", f"edge {edge.id!r} names missing node {node_id!r}")
    return {"id": edge.id, "from": edge.from_, "to": edge.to,
            "length": float(edge.length), "speed": float(edge.speed)}


def build_graph(data: Any, settings: Settings, path: str = "params.map_data") -> dict[str, Any]:
    """Validate map_data completely and return the records of a new map slice.

    Raises Invalid naming the offending item; builds nothing in the world.
    """
    try:
        parsed = data if isinstance(data, MapData) else msgspec.convert(data, MapData)
    except msgspec.ValidationError as exc:
        raise _bad(*error_path(exc, path)) from None
    if len(parsed.nodes) > settings.max_nodes:
        raise _bad(f"{path}.nodes", f"{len(parsed.nodes)} nodes is more than the maximum "
                                    f"of {settings.max_nodes}")
    if len(parsed.edges) > settings.max_edges:
        raise _bad(f"{path}.edges", f"{len(parsed.edges)} edges is more than the maximum "
                                    f"of {settings.max_edges}")
    records: dict[str, Any] = {}
    for i, node in enumerate(parsed.nodes):
        key = NODE + node.id
        if key in records:
            raise _bad(f"{path}.nodes[{i}].id", f"duplicate node id {node.id!r}")
        records[key] = node_record(node, f"{path}.nodes[{i}]")
    for i, edge in enumerate(parsed.edges):
        key = EDGE + edge.id
        if key in records:
            raise _bad(f"{path}.edges[{i}].id", f"duplicate edge id {edge.id!r}")
        records[key] = edge_record(edge, f"{path}.edges[{i}]", lambda n: NODE + n in records)
    return records


def export_graph(records: Any) -> dict[str, Any]:
    """map_data from the slice's records, nodes and edges in id order."""
    nodes: list[dict[str, Any]] = []
    edges: list[dict[str, Any]] = []
    for key in sorted(records.keys()):
        (nodes if key.startswith(NODE) else edges).append(records[key])
    return {"nodes": nodes, "edges": edges}


def simulation_running(ctx: Context) -> bool:
    sim = ctx.world.slices.get("simulation")
    meta = sim.get("meta") if sim is not None else None
    return bool(meta and meta.get("running"))


def _map(ctx: Context) -> KeyedSlice:
    return ctx.keyed("map")


def export(ctx: Context, params: None) -> dict[str, Any]:
    return {"map_data": export_graph(_map(ctx).data())}


def import_(ctx: Context, params: ImportParams) -> dict[str, Any]:
    if simulation_running(ctx):
        raise Conflict("the simulation is running; stop it before importing a map")
    records = build_graph(params.map_data, ctx.settings)
    sim = ctx.world.slices.get("simulation")
    if sim is not None:
        for key, rec in sim.items():
            for field in ("node", "origin", "destination"):
                ref = rec.get(field) if isinstance(rec, dict) else None
                if ref is not None and NODE + ref not in records:
                    raise Conflict(f"{key} refers to node {ref!r}, which the new map lacks; "
                                   f"remove it or import a full state instead")
    _map(ctx).replace_all(records)
    nodes = sum(1 for k in records if k.startswith(NODE))
    ctx.broadcast("map.imported", {"nodes": nodes, "edges": len(records) - nodes}, others=True)
    return {"nodes": nodes, "edges": len(records) - nodes}


def add_node(ctx: Context, node: Node) -> dict[str, Any]:
    record = node_record(node, "params")
    if NODE + node.id in _map(ctx):
        raise _bad("params.id", f"duplicate node id {node.id!r}")
    _map(ctx).put(NODE + node.id, record)
    ctx.broadcast("map.node_added", {"node": record}, others=True)
    return {"node": record}


def update_node(ctx: Context, update: NodeUpdate) -> dict[str, Any]:
    key = NODE + update.id
    if key not in _map(ctx):
        raise NotFound(f"no node {update.id!r}")
    current = _map(ctx)[key]
    merged = Node(update.id,
                  current["x"] if update.x is None else update.x,
                  current["y"] if update.y is None else update.y,
                  current["building"] if update.building is msgspec.UNSET else update.building)
    record = node_record(merged, "params")
    _map(ctx).put(key, record)
    ctx.broadcast("map.node_updated", {"node": record}, others=True)
    return {"node": record}


def _users_of(ctx: Context, node_id: str) -> str | None:
    sim = ctx.world.slices.get("simulation")
    if sim is None:
        return None
    for key, rec in sim.items():
        if key.startswith("agent:") and rec.get("node") == node_id:
            return f"agent {rec['id']!r} stands on it"
        if key.startswith("package:") and node_id in (rec.get("origin"), rec.get("destination")):
            return f"package {rec['id']!r} starts or ends there"
    return None


def remove_node(ctx: Context, params: IdParams) -> dict[str, Any]:
    m = _map(ctx)
    if NODE + params.id not in m:
        raise NotFound(f"no node {params.id!r}")
    user = _users_of(ctx, params.id)
    if user is not None:
        raise Conflict(f"cannot remove node {params.id!r}: {user}")
    edges = [k for k, e in m.items() if k.startswith(EDGE)
             and params.id in (e["from"], e["to"])]
    for key in edges:
        _check_edge_free(ctx, key[len(EDGE):])
    for key in edges:
        m.delete(key)
    m.delete(NODE + params.id)
    data = {"id": params.id, "removed_edges": sorted(k[len(EDGE):] for k in edges)}
    ctx.broadcast("map.node_removed", data, others=True)
    return data


def add_edge(ctx: Context, edge: Edge) -> dict[str, Any]:
    m = _map(ctx)
    record = edge_record(edge, "params", lambda n: NODE + n in m)
    if EDGE + edge.id in m:
        raise _bad("params.id", f"duplicate edge id {edge.id!r}")
    m.put(EDGE + edge.id, record)
    ctx.broadcast("map.edge_added", {"edge": record}, others=True)
    return {"edge": record}


def _check_edge_free(ctx: Context, edge_id: str) -> None:
    sim = ctx.world.slices.get("simulation")
    if sim is None:
        return
    for key, rec in sim.items():
        if key.startswith("agent:") and rec.get("edge") == edge_id:
            raise Conflict(f"cannot remove edge {edge_id!r}: agent {rec['id']!r} is driving on it")


def remove_edge(ctx: Context, params: IdParams) -> dict[str, Any]:
    m = _map(ctx)
    if EDGE + params.id not in m:
        raise NotFound(f"no edge {params.id!r}")
    _check_edge_free(ctx, params.id)
    m.delete(EDGE + params.id)
    ctx.broadcast("map.edge_removed", {"id": params.id}, others=True)
    return {"id": params.id}


@hookimpl
def register_actions() -> list[Action]:
    return [
        Action("map.export", export, None, Role.viewer, changes_world=False, reply="map.exported",
               description="The whole graph as map_data."),
        Action("map.import", import_, ImportParams, Role.admin, reply="map.imported",
               description="Replace the graph; all or nothing; not while the simulation runs."),
        Action("map.add_node", add_node, Node, Role.player, reply="map.node_added"),
        Action("map.update_node", update_node, NodeUpdate, Role.player, reply="map.node_updated"),
        Action("map.remove_node", remove_node, IdParams, Role.player, reply="map.node_removed"),
        Action("map.add_edge", add_edge, Edge, Role.player, reply="map.edge_added"),
        Action("map.remove_edge", remove_edge, IdParams, Role.player, reply="map.edge_removed"),
    ]


@hookimpl
def register_slices() -> list[SliceSpec]:
    return [SliceSpec("map", dict, version=1, keyed=True)]
