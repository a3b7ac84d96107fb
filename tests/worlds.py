"""Generated worlds for tests and benchmarks."""

from __future__ import annotations

import random
from typing import Any


def grid_map(width: int, height: int, length: float = 1.0,
             two_way: bool = True) -> dict[str, Any]:
    """A grid of nodes with edges between neighbours (both ways, or right/down only)."""
    nodes = [{"id": f"n{x}_{y}", "x": float(x), "y": float(y),
              "building": {"type": "depot"} if (x + y) % 7 == 0 else None}
             for y in range(height) for x in range(width)]
    edges = []
    for y in range(height):
        for x in range(width):
            for dx, dy in ((1, 0), (0, 1)):
                nx, ny = x + dx, y + dy
                if nx < width and ny < height:
                    a, b = f"n{x}_{y}", f"n{nx}_{ny}"
                    edges.append({"id": f"{a}>{b}", "from": a, "to": b, "length": length,
                                  "speed": 1.0})
                    if two_way:
                        edges.append({"id": f"{b}>{a}", "from": b, "to": a,
                                      "length": length, "speed": 1.0})
    return {"nodes": nodes, "edges": edges}


def logistics_state(nodes: int, edges: int, trucks: int, packages: int,
                    seed: int = 1) -> dict[str, Any]:
    """A random connected world: a ring (so everything is reachable) plus chords."""
    rng = random.Random(seed)
    ids = [f"n{i}" for i in range(nodes)]
    node_list = [{"id": n, "x": rng.uniform(0, 1000), "y": rng.uniform(0, 1000),
                  "building": None} for n in ids]
    edge_list = []
    where = {n["id"]: (n["x"], n["y"]) for n in node_list}

    def length(a: str, b: str) -> float:  # roads are longer than the straight line
        (x1, y1), (x2, y2) = where[a], where[b]
        return max(0.5, ((x2 - x1) ** 2 + (y2 - y1) ** 2) ** 0.5 * rng.uniform(1.0, 1.4))

    for i in range(nodes):
        a, b = ids[i], ids[(i + 1) % nodes]
        edge_list.append({"id": f"r{i}", "from": a, "to": b, "length": length(a, b),
                          "speed": rng.uniform(5, 20)})
    for j in range(max(0, edges - nodes)):
        a, b = rng.sample(ids, 2)
        edge_list.append({"id": f"c{j}", "from": a, "to": b, "length": length(a, b),
                          "speed": rng.uniform(5, 20)})
    agents = [{"id": f"t{i}", "kind": "truck", "node": rng.choice(ids), "speed": 15.0,
               "capacity": 5.0, "fuel_per_km": 0.01} for i in range(trucks)]
    pkgs = [{"id": f"p{i}", "origin": rng.choice(ids), "destination": rng.choice(ids),
             "weight": 1.0, "status": "waiting"} for i in range(packages)]
    return {"graph": {"nodes": node_list, "edges": edge_list}, "agents": agents,
            "packages": pkgs,
            "metadata": {"tick": 0, "dt_s": 1.0, "global_fuel_price": 1.5, "current_day": 0}}
