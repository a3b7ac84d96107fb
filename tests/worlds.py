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


def step_strategies(agents: int) -> list[Any]:
    """Hypothesis strategies of the steps :func:`take_step` takes, for up to ``agents``
    trucks (imported here: the benchmarks use this module without hypothesis)."""
    from hypothesis import strategies as st

    return [
        st.tuples(st.just("agent"), st.integers(0, agents - 1), st.integers(0, 8)),
        st.tuples(st.just("package"), st.integers(0, 6), st.integers(0, 8), st.integers(0, 8)),
        st.tuples(st.just("step"), st.integers(1, 4)),
        st.tuples(st.just("remove_agent"), st.integers(0, agents - 1)),
        st.tuples(st.just("cancel"), st.integers(0, 6)),
        st.tuples(st.just("set"), st.floats(0.1, 3.0)),
        st.tuples(st.just("remove_edge"), st.integers(0, 23)),
        st.tuples(st.just("import"), st.integers(1, 5)),
    ]


async def take_step(root: Any, step: tuple[Any, ...], nodes: list[str],
                    edges: list[str]) -> tuple[list[str], list[str]] | None:
    """Take one of the random steps the simulation tests draw (``agent``, ``package``,
    ``step``, ``remove_agent``, ``cancel``, ``set``, ``remove_edge``, ``import``) as
    ``root``: the map's node and edge ids after it (an import changes them), or None
    for a step of another kind, the caller's own."""
    kind = step[0]
    if kind == "agent":
        await root.call("simulation.add_agent", id=f"t{step[1]}", kind="truck",
                        node=nodes[step[2]], capacity=2)
    elif kind == "package":
        await root.call("simulation.add_package", id=f"p{step[1]}",
                        origin=nodes[step[2]], destination=nodes[step[3]])
    elif kind == "step":
        await root.call("simulation.step", ticks=step[1])
    elif kind == "remove_agent":
        await root.call("simulation.remove_agent", id=f"t{step[1]}")
    elif kind == "cancel":
        await root.call("simulation.cancel_package", id=f"p{step[1]}")
    elif kind == "set":
        await root.call("simulation.set", dt_s=step[1])
    elif kind == "remove_edge":
        await root.call("map.remove_edge", id=edges[step[1] % len(edges)])
    elif kind == "import":
        state = logistics_state(9, 14, step[1], 3, seed=step[1])
        await root.call("simulation.import_state", state_data=state)
        return ([n["id"] for n in state["graph"]["nodes"]],
                [e["id"] for e in state["graph"]["edges"]])
    else:
        return None
    return nodes, edges
