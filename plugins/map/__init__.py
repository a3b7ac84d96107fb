"""The map: a directed graph of nodes and edges (slice ``map``).

The slice is a keyed collection, one record per node (``node:ID``) and per edge
(``edge:ID``), so editing one node rewrites one row. Imports build the new graph
aside, validate all of it, then swap it in: all or nothing.
"""

from __future__ import annotations

import math
from typing import Any

import msgspec
import pluggy

from host.actions import (Action, Conflict, Context, Id, Invalid, NotFound, Role, Usage,
                          encoded_size)
from host.api import AppliedAction, HostAPI, ImportStep
from host.config import error_path
from host.plugins import hookimpl
from host.topics import Topic
from plugins.map import hookspecs
from state.slices import KeyedSlice, SliceSpec

NODE = "node:"
EDGE = "edge:"


MAX_LENGTH = 1e9  # of an edge, in length units
MAX_SPEED = 1e6
MIN_SPEED = 1e-6  # slower edges would make travel times overflow


class Settings(msgspec.Struct, forbid_unknown_fields=True):
    max_nodes: int = 1_000_000
    max_edges: int = 1_000_000
    max_bytes: int = 256 * 1024 * 1024  # the map's records, encoded as JSON
    max_building_bytes: int = 4096


class Node(msgspec.Struct, forbid_unknown_fields=True):
    id: Id
    x: float
    y: float
    building: dict[str, Any] | None = None


class Edge(msgspec.Struct, forbid_unknown_fields=True, rename={"from_": "from"}):
    id: Id
    from_: Id
    to: Id
    length: float
    speed: float = 1.0


class MapData(msgspec.Struct, forbid_unknown_fields=True):
    """Both parts are required: an empty map is sent as empty lists, explicitly."""

    nodes: list[Node]
    edges: list[Edge]


class ImportParams(msgspec.Struct, forbid_unknown_fields=True):
    map_data: dict[str, Any]  # checked by build_graph, which names a missing part's path


class NodeUpdate(msgspec.Struct, forbid_unknown_fields=True):
    id: Id
    x: float | None = None
    y: float | None = None
    building: dict[str, Any] | None | msgspec.UnsetType = msgspec.UNSET


class IdParams(msgspec.Struct, forbid_unknown_fields=True):
    id: Id


def _bad(path: str, message: str) -> Invalid:
    return Invalid(f"{message} at {path}", details={"path": path, "message": message})


def invalid(exc: msgspec.ValidationError, root: str) -> Invalid:
    """validation_error for a msgspec error, the path naming the bad field, also a
    missing one (msgspec reports that at the enclosing object)."""
    path, message = error_path(exc, root)
    if message.startswith("Object missing required field"):
        path += "." + message.split("`")[1]
    return _bad(path, message)


def node_record(node: Node, path: str, settings: Settings) -> dict[str, Any]:
    if not node.id:
        raise _bad(f"{path}.id", "node id must not be empty")
    for axis in ("x", "y"):
        if not math.isfinite(getattr(node, axis)):
            raise _bad(f"{path}.{axis}", f"node {node.id!r} has a non-finite {axis}")
    building = node.building
    if building is not None:
        if not isinstance(building.get("type"), str):
            raise _bad(f"{path}.building.type",
                       f"node {node.id!r}: building needs a string type")
        size = encoded_size(building)
        if size > settings.max_building_bytes:
            raise _bad(f"{path}.building", f"node {node.id!r}: building is {size} bytes; "
                                           f"max_building_bytes is {settings.max_building_bytes}")
    return {"id": node.id, "x": float(node.x), "y": float(node.y), "building": building}


def edge_record(edge: Edge, path: str, has_node: Any) -> dict[str, Any]:
    if not edge.id:
        raise _bad(f"{path}.id", "edge id must not be empty")
    for field, top in (("length", MAX_LENGTH), ("speed", MAX_SPEED)):
        value = getattr(edge, field)
        if not (math.isfinite(value) and value > 0):
            raise _bad(f"{path}.{field}", f"edge {edge.id!r}: {field} must be a positive number")
        if value > top or (field == "speed" and value < MIN_SPEED):
            low = MIN_SPEED if field == "speed" else 0
            raise _bad(f"{path}.{field}", f"edge {edge.id!r}: {field} must be from {low:g} "
                                          f"to {top:g}")
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
        raise invalid(exc, path) from None
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
        records[key] = node_record(node, f"{path}.nodes[{i}]", settings)
    for i, edge in enumerate(parsed.edges):
        key = EDGE + edge.id
        if key in records:
            raise _bad(f"{path}.edges[{i}].id", f"duplicate edge id {edge.id!r}")
        records[key] = edge_record(edge, f"{path}.edges[{i}]", lambda n: NODE + n in records)
    size = count(records)["bytes"]
    if size > settings.max_bytes:
        raise Conflict(f"the map would be {size} bytes; the budget max_bytes is "
                       f"{settings.max_bytes}", details={"path": path, "budget": "max_bytes"})
    return records


def count(records: Any) -> dict[str, int]:
    """The map's usage: nodes, edges, and bytes (its records' JSON, summed; measured in
    one encoding of them all, less the list's brackets and commas)."""
    nodes = sum(1 for key in records if key.startswith(NODE))
    values = list(records.values())
    size = encoded_size(values) - 2 - max(0, len(values) - 1)
    return {"nodes": nodes, "edges": len(values) - nodes, "bytes": size}


def _usage(ctx: Context) -> Usage:
    rt = ctx.host.runtime("map")
    if "usage" not in rt:
        rt["usage"] = Usage(count)
    return rt["usage"]


def _within_budget(ctx: Context, reply: dict[str, Any], nodes: int = 0, edges: int = 0,
                   size: int = 0) -> None:
    """Refuse (``conflict``, naming the budget) a change that would take the map past
    max_nodes, max_edges or max_bytes; else remember the new usage with the reply."""
    usage = _usage(ctx)
    now = usage.current(_map(ctx).data())
    grows = {"nodes": nodes, "edges": edges, "bytes": size}
    new = {field: now[field] + grows[field] for field in grows}
    for field, budget in (("nodes", "max_nodes"), ("edges", "max_edges"),
                          ("bytes", "max_bytes")):
        limit = getattr(ctx.settings, budget)
        if grows[field] > 0 and new[field] > limit:  # shrinking is always allowed
            raise Conflict(f"the map is full: {budget} is {limit} and this would make "
                           f"{new[field]} {field}", details={"budget": budget, "limit": limit})
    usage.propose(reply, new)


def export_graph(records: Any) -> dict[str, Any]:
    """map_data from the slice's records, nodes and edges in id order."""
    nodes: list[dict[str, Any]] = []
    edges: list[dict[str, Any]] = []
    for key in sorted(records.keys()):
        (nodes if key.startswith(NODE) else edges).append(records[key])
    return {"nodes": nodes, "edges": edges}


def _refuse_if_blocked(ctx: Context, nodes: list[str], edges: list[str],
                      replace: bool = False) -> None:
    """Whatever stands on the map (agents, packages) is another plugin's: ask them."""
    if nodes or edges or replace:
        why = ctx.host.hook.map_change_blocked(ctx=ctx, nodes=nodes, edges=edges,
                                               replace=replace)
        if why is not None:
            raise Conflict(why)


def _map(ctx: Context) -> KeyedSlice:
    return ctx.keyed("map")


def export(ctx: Context, params: None) -> dict[str, Any]:
    return {"map_data": export_graph(_map(ctx).data())}


def import_(ctx: Context, params: ImportParams) -> dict[str, Any]:
    _refuse_if_blocked(ctx, [], [], replace=True)  # (before the work of building it)
    records = build_graph(params.map_data, ctx.settings)
    m = _map(ctx)
    _refuse_if_blocked(ctx, [k[len(NODE):] for k in m.keys() if k.startswith(NODE)
                             and k not in records],
                       [k[len(EDGE):] for k in m.keys() if k.startswith(EDGE)
                        and k not in records], replace=True)
    m.replace_all(records)
    usage = count(records)
    reply = {"nodes": usage["nodes"], "edges": usage["edges"]}
    _usage(ctx).propose(reply, usage)
    ctx.broadcast("map.imported", dict(reply), others=True, topic="map")
    return reply


def add_node(ctx: Context, node: Node) -> dict[str, Any]:
    record = node_record(node, "params", ctx.settings)
    if NODE + node.id in _map(ctx):
        raise _bad("params.id", f"duplicate node id {node.id!r}")
    reply = {"node": record}
    _within_budget(ctx, reply, nodes=1, size=encoded_size(record))
    _map(ctx).put(NODE + node.id, record)
    ctx.broadcast("map.node_added", {"node": record}, others=True, topic="map")
    return reply


def update_node(ctx: Context, update: NodeUpdate) -> dict[str, Any]:
    key = NODE + update.id
    if key not in _map(ctx):
        raise NotFound(f"no node {update.id!r}")
    current = _map(ctx)[key]
    merged = Node(update.id,
                  current["x"] if update.x is None else update.x,
                  current["y"] if update.y is None else update.y,
                  current["building"] if update.building is msgspec.UNSET else update.building)
    record = node_record(merged, "params", ctx.settings)
    reply = {"node": record}
    _within_budget(ctx, reply, size=encoded_size(record) - encoded_size(current))
    _map(ctx).put(key, record)
    ctx.broadcast("map.node_updated", {"node": record}, others=True, topic="map")
    return reply


def remove_node(ctx: Context, params: IdParams) -> dict[str, Any]:
    m = _map(ctx)
    if NODE + params.id not in m:
        raise NotFound(f"no node {params.id!r}")
    edges = [k for k, e in m.items() if k.startswith(EDGE)
             and params.id in (e["from"], e["to"])]
    _refuse_if_blocked(ctx, [params.id], [k[len(EDGE):] for k in edges])
    data = {"id": params.id, "removed_edges": sorted(k[len(EDGE):] for k in edges)}
    _within_budget(ctx, data, nodes=-1, edges=-len(edges),
                   size=-sum(encoded_size(m[k]) for k in [*edges, NODE + params.id]))
    for key in edges:
        m.delete(key)
    m.delete(NODE + params.id)
    ctx.broadcast("map.node_removed", data, others=True, topic="map")
    return data


def add_edge(ctx: Context, edge: Edge) -> dict[str, Any]:
    m = _map(ctx)
    record = edge_record(edge, "params", lambda n: NODE + n in m)
    if EDGE + edge.id in m:
        raise _bad("params.id", f"duplicate edge id {edge.id!r}")
    reply = {"edge": record}
    _within_budget(ctx, reply, edges=1, size=encoded_size(record))
    m.put(EDGE + edge.id, record)
    ctx.broadcast("map.edge_added", {"edge": record}, others=True, topic="map")
    return reply


def remove_edge(ctx: Context, params: IdParams) -> dict[str, Any]:
    m = _map(ctx)
    if EDGE + params.id not in m:
        raise NotFound(f"no edge {params.id!r}")
    _refuse_if_blocked(ctx, [], [params.id])
    reply = {"id": params.id}
    _within_budget(ctx, reply, edges=-1, size=-encoded_size(m[EDGE + params.id]))
    m.delete(EDGE + params.id)
    ctx.broadcast("map.edge_removed", {"id": params.id}, others=True, topic="map")
    return reply


@hookimpl
def world_import(slices: dict[str, Any]) -> ImportStep | None:
    if "map" not in slices:
        return None
    return ImportStep("map.import", {"map_data": export_graph(slices["map"]["data"])}, ("map",))


@hookimpl
def add_hookspecs(pluginmanager: pluggy.PluginManager) -> None:
    pluginmanager.add_hookspecs(hookspecs)


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
def register_topics() -> list[Topic]:
    return [Topic("map", description="map.imported and every map.node_* and map.edge_* signal")]


@hookimpl
def register_slices() -> list[SliceSpec]:
    return [SliceSpec("map", dict, version=1, keyed=True)]


@hookimpl
def action_applied(host: HostAPI, applied: AppliedAction) -> None:
    rt = host.runtime("map")
    if "usage" in rt:
        rt["usage"].applied(applied.reply, "map" in applied.slices)
