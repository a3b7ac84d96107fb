"""The built-in agent kind ``truck``: drives to waiting packages, carries them to
their destination, and pays for fuel at the global price.

Units: lengths in km, speeds in km per simulated second, fuel in litres.
"""

from __future__ import annotations

from typing import Any

from host.actions import bounded
from plugins.simulation import AgentKind, Sim, bad, number

DEFAULTS: dict[str, Any] = {
    "capacity": 10.0, "speed": 1.0, "fuel": 100.0, "fuel_capacity": 100.0, "fuel_per_km": 0.1,
    "cargo": [], "route": [], "edge": None, "progress": 0.0, "target": None, "state": "idle",
    "odometer": 0.0, "fuel_cost": 0.0, "delivered": 0,
}
STATES = ("idle", "to_pickup", "to_deliver")
_FIELDS = set(DEFAULTS) | {"id", "kind", "node"}
MAX_AMOUNT = 1e6  # capacity, fuel_capacity, speed (and at least MIN_SPEED), fuel_per_km
MIN_SPEED = 1e-6
MAX_PROGRESS = 1e9  # the longest edge
MAX_TOTAL = 1e15  # odometer and fuel_cost saturate here: totals stay finite for ever


def from_plain(sim: Sim, data: dict[str, Any], path: str) -> dict[str, Any]:
    extra = sorted(set(data) - _FIELDS)
    if extra:
        raise bad(f"{path}.{extra[0]}", f"unknown truck field {extra[0]!r}")
    record = {"id": data["id"], "kind": "truck", "node": data["node"]}
    for field in ("capacity", "speed", "fuel_capacity"):
        record[field] = number(data, field, path, DEFAULTS[field], positive=True,
                                maximum=MAX_AMOUNT)
    if record["speed"] < MIN_SPEED:
        raise bad(f"{path}.speed", f"speed must be at least {MIN_SPEED:g}")
    record["fuel_per_km"] = number(data, "fuel_per_km", path, DEFAULTS["fuel_per_km"],
                                    maximum=MAX_AMOUNT)
    record["fuel"] = number(data, "fuel", path, record["fuel_capacity"])
    if record["fuel"] > record["fuel_capacity"]:
        raise bad(f"{path}.fuel", "fuel is more than fuel_capacity")
    record["progress"] = number(data, "progress", path, 0.0, maximum=MAX_PROGRESS)
    for field in ("odometer", "fuel_cost"):
        record[field] = number(data, field, path, DEFAULTS[field], maximum=MAX_TOTAL)
    delivered = data.get("delivered", 0)
    if isinstance(delivered, bool) or not isinstance(delivered, int) or not 0 <= delivered <= 2**53:
        raise bad(f"{path}.delivered", "delivered must be a whole number from 0 to 2**53")
    record["delivered"] = delivered
    for field in ("cargo", "route"):
        value = data.get(field, [])
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise bad(f"{path}.{field}", f"{field} must be a list of ids")
        for i, item in enumerate(value):
            bounded(item, f"{path}.{field}[{i}]")
        record[field] = list(value)
    for field in ("edge", "target"):
        value = data.get(field)
        if value is not None and not isinstance(value, str):
            raise bad(f"{path}.{field}", f"{field} must be an id or null")
        record[field] = bounded(value, f"{path}.{field}")
    state = data.get("state", "idle")
    if state not in STATES:
        raise bad(f"{path}.state", f"state must be one of {', '.join(STATES)}")
    record["state"] = state
    return record


def _load(sim: Sim, truck: dict[str, Any]) -> float:
    total = 0.0
    for package_id in truck["cargo"]:
        package = sim.package(package_id)
        if package is not None:
            total += package["weight"]
    return total


def _plan(sim: Sim, truck: dict[str, Any]) -> None:
    """Pick the oldest waiting package this truck can carry and head for it."""
    if sim.plans_left <= 0:
        return
    sim.plans_left -= 1
    room = truck["capacity"] - _load(sim, truck)
    targeted = sim.targeted()
    tries = 0
    for package in sim.waiting():
        if package["id"] in targeted or package["weight"] > room:
            continue
        tries += 1
        to_origin = sim.route(truck["node"], package["origin"])
        if to_origin is not None and sim.route(package["origin"], package["destination"]) is not None:
            truck.update(target=package["id"], state="to_pickup", route=to_origin)
            return
        if tries >= 3:
            return


def _arrive(sim: Sim, truck: dict[str, Any]) -> None:
    """At the end of a route: load or deliver, then plan what is next."""
    target = sim.package(truck["target"]) if truck["target"] else None
    if truck["state"] == "to_pickup":
        if target is None or target["status"] != "waiting" or target["origin"] != truck["node"]:
            truck.update(state="idle", target=None, route=[])
            return
        route = sim.route(truck["node"], target["destination"])
        if route is None:
            truck.update(state="idle", target=None, route=[])
            return
        sim.put_package({**target, "status": "in_transit", "carried_by": truck["id"]})
        truck.update(state="to_deliver", route=route, cargo=[*truck["cargo"], target["id"]])
    elif truck["state"] == "to_deliver" and target is not None \
            and target["destination"] == truck["node"]:
        sim.put_package({**target, "status": "delivered", "carried_by": None,
                         "delivered_tick": sim.meta["tick"]})
        truck.update(state="idle", target=None, route=[], delivered=truck["delivered"] + 1,
                     cargo=[c for c in truck["cargo"] if c != target["id"]])


def _refuel(sim: Sim, truck: dict[str, Any]) -> None:
    litres = truck["fuel_capacity"] - truck["fuel"]
    truck["fuel_cost"] = min(MAX_TOTAL, truck["fuel_cost"] + litres * sim.meta["global_fuel_price"])
    truck["fuel"] = truck["fuel_capacity"]


def _reroute(sim: Sim, truck: dict[str, Any]) -> bool:
    """Find a new route to the current goal (the map changed); False when there is none."""
    target = sim.package(truck["target"]) if truck["target"] else None
    goal = None
    if target is not None:
        goal = target["origin"] if truck["state"] == "to_pickup" else target["destination"]
    route = sim.route(truck["node"], goal) if goal is not None else None
    if route is None or (route and sim.edge(route[0]) is None):
        truck["route"] = []
        if truck["state"] == "to_pickup":
            truck.update(state="idle", target=None)
        return False
    truck["route"] = route
    return True


def _along_edge(sim: Sim, agent: dict[str, Any], dt: float) -> dict[str, Any] | None:
    """The common case, made cheap: a truck that stays on its edge for the whole tick
    (None otherwise). The same arithmetic as the general loop in ``step``."""
    edge = sim.edge(agent["edge"])
    if edge is None:
        return None
    velocity = min(agent["speed"], edge["speed"])
    if (edge["length"] - agent["progress"]) / velocity <= dt:
        return None
    distance = velocity * dt
    return {**agent, "fuel": max(0.0, agent["fuel"] - distance * agent["fuel_per_km"]),
            "odometer": min(MAX_TOTAL, agent["odometer"] + distance),
            "progress": agent["progress"] + distance}


def step(sim: Sim, agent: dict[str, Any], dt: float) -> dict[str, Any] | None:
    if agent["state"] == "idle":
        if sim.plans_left <= 0 or not sim.waiting():
            return None
    elif agent["edge"] is not None:
        moved = _along_edge(sim, agent, dt)
        if moved is not None:
            return moved
    truck = {**agent, "cargo": list(agent["cargo"]), "route": list(agent["route"])}
    if truck["state"] == "idle":
        _plan(sim, truck)
        if truck["state"] == "idle":
            return None
    time_left = dt
    for _ in range(10_000):  # bounded: a tick crosses at most this many edges
        if truck["edge"] is None:
            if not truck["route"]:
                _arrive(sim, truck)
                if truck["state"] == "to_deliver" and not truck["route"]:
                    _reroute(sim, truck)
                if not truck["route"]:
                    break
            edge = sim.edge(truck["route"][0])
            if edge is None or edge["from"] != truck["node"]:
                if not _reroute(sim, truck):
                    break
                continue
            need = edge["length"] * truck["fuel_per_km"]
            if need > truck["fuel_capacity"]:  # this truck can never cross that edge
                truck["route"] = []
                if truck["state"] == "to_pickup":
                    truck.update(state="idle", target=None)
                break
            if truck["fuel"] < need:
                _refuel(sim, truck)
            truck["route"].pop(0)
            truck.update(edge=edge["id"], progress=0.0)
        if time_left <= 0:
            break
        edge = sim.edge(truck["edge"])
        if edge is None:  # the edge was removed under the truck: it stays at its last node
            truck.update(edge=None, progress=0.0)
            continue
        velocity = min(truck["speed"], edge["speed"])
        remaining = edge["length"] - truck["progress"]
        needed = remaining / velocity
        if needed <= time_left:
            truck["fuel"] = max(0.0, truck["fuel"] - remaining * truck["fuel_per_km"])
            truck["odometer"] = min(MAX_TOTAL, truck["odometer"] + remaining)
            truck.update(node=edge["to"], edge=None, progress=0.0)
            time_left -= needed
        else:
            distance = velocity * time_left
            truck["fuel"] = max(0.0, truck["fuel"] - distance * truck["fuel_per_km"])
            truck["odometer"] = min(MAX_TOTAL, truck["odometer"] + distance)
            truck["progress"] += distance
            time_left = 0.0
    return truck


TRUCK = AgentKind("truck", from_plain, step)
