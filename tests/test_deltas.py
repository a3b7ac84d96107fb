"""Deltas: a client holding a snapshot (simulation.export_state) plus every
simulation.delta of its topics holds exactly the export, at every step: through
the real server, store and transport."""

from __future__ import annotations

import copy
import uuid
from pathlib import Path
from typing import Any

import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from host.client import CallError
from host.testing import open_harness
from state.codec import encode_json
from plugins.simulation import position
from worlds import grid_map, logistics_state, step_strategies, take_step

ADMIN = {"host": {"admin_token": "adm"}}
VIEW = (0.0, 0.0, 1.0, 1.0)  # a corner of the 3 x 3 grid
VIEW_TOPIC = "simulation.view:0,0,1,1"


def drain(client: Any) -> list[dict[str, Any]]:
    """The signals the client has received and not yet taken (all sent before the
    reply it last got: the server sends a session's signals in order)."""
    out = []
    while True:
        try:
            out.append(client._signals.receive_nowait())
        except trio.WouldBlock:
            return out



def apply_delta(records: dict[str, Any], delta: dict[str, Any], graph: Any,
                held_only: bool = False) -> Any:
    """Apply one ``simulation.delta`` to the records a client holds; the graph after
    it. ``held_only``: a deleted key the client does not hold is nothing to do (a
    coalesced delta's, for a record that came and went); else it is an error."""
    if delta.get("reset"):
        records.clear()
    for key in delta.get("del", []):
        if held_only:
            records.pop(key, None)
        else:
            del records[key]
    for key, record in delta.get("set", {}).items():
        records[key] = record
    for key, fields in delta.get("patch", {}).items():
        records[key].update(fields)
    return delta.get("graph", graph)

class Follower:
    """What a client holds: records by slice key (``meta``, ``agent:ID``,
    ``package:ID``) and the graph, from a snapshot kept up by deltas (and by the
    ``map`` topic's signals for the graph)."""

    def __init__(self, client: Any, topics: list[str]) -> None:
        self.client = client
        self.topics = topics
        self.records: dict[str, Any] = {}
        self.graph: dict[str, Any] = {}
        self.deltas = 0
        self.sizes: list[int] = []  # bytes of each delta's data, as JSON

    async def join(self) -> None:
        await self.client.call("world.subscribe", topics=self.topics)
        drain(self.client)
        state = (await self.client.call("simulation.export_state"))["state_data"]
        self.records = {"meta": state["metadata"]}
        for agent in state["agents"]:
            self.records["agent:" + agent["id"]] = agent
        for package in state["packages"]:
            self.records["package:" + package["id"]] = package
        self.graph = state["graph"]
        if VIEW_TOPIC in self.topics:  # a view holds only the agents inside it
            self.records = {k: v for k, v in self.records.items()
                            if k.startswith("agent:") and inside(self.graph, v)}
        elif not any(t == "simulation.ticks" for t in self.topics):
            keys = {"agent:" + t.split(":", 1)[1] for t in self.topics}
            self.records = {k: v for k, v in self.records.items() if k in keys}
        self.records = copy.deepcopy(self.records)
        drain(self.client)  # sent before the snapshot: already in it

    def take(self) -> None:
        for sig in drain(self.client):
            if "re" in sig:  # a reply the client had resent after a resume, come twice
                continue
            name, data = sig["signal"], sig["data"]
            if name == "simulation.delta":
                assert data["topic"] in self.topics, data
                self.sizes.append(len(encode_json(data)))
                self.apply(data)
            elif name == "map.edge_removed":
                self.graph["edges"] = [e for e in self.graph["edges"] if e["id"] != data["id"]]
            else:
                assert name in ("sync_state", "map.imported"), sig

    def apply(self, delta: dict[str, Any]) -> None:
        self.deltas += 1
        self.graph = apply_delta(self.records, delta, self.graph)

    def export(self) -> dict[str, Any]:
        def of(prefix: str) -> list[Any]:
            return [self.records[k] for k in sorted(self.records) if k.startswith(prefix)]
        return {"graph": self.graph, "agents": of("agent:"), "packages": of("package:"),
                "metadata": self.records["meta"]}


def records_of(graph: dict[str, Any]) -> dict[str, Any]:
    return {**{"node:" + n["id"]: n for n in graph["nodes"]},
            **{"edge:" + e["id"]: e for e in graph["edges"]}}


def inside(graph: dict[str, Any], agent: dict[str, Any]) -> bool:
    at = position(records_of(graph), agent)
    return at is not None and VIEW[0] <= at[0] <= VIEW[2] and VIEW[1] <= at[1] <= VIEW[3]


async def check(root: Any, followers: list[Follower]) -> None:
    export = (await root.call("simulation.export_state"))["state_data"]
    for f in followers:
        await f.client.call("host.ping")  # its signals so far are in before this reply
        f.take()
        if "simulation.ticks" in f.topics:
            assert f.export() == export
        elif VIEW_TOPIC in f.topics:
            expected = {"agent:" + a["id"]: a for a in export["agents"]
                        if inside(export["graph"], a)}
            assert f.records == expected
        else:
            (topic,) = f.topics
            key = "agent:" + topic.split(":", 1)[1]
            expected = {"agent:" + a["id"]: a for a in export["agents"]
                        if "agent:" + a["id"] == key}
            assert f.records == expected


async def wait_open(client: Any) -> None:
    with trio.fail_after(10):
        while client.state != "open":
            await trio.sleep(0.01)


actions = st.lists(st.one_of(
    *step_strategies(agents=4),
    st.tuples(st.just("join")),
    st.tuples(st.just("drop")),
), max_size=25)


@given(actions)
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
async def test_a_snapshot_plus_every_delta_is_the_export_at_every_step(
        tmp_path: Path, steps: list[Any]) -> None:
    async with open_harness(tmp_path) as harness:
        h = await harness.start(config=ADMIN, listen=True,
                                db=tmp_path / f"{uuid.uuid4().hex}.db")
        grid = grid_map(3, 3)
        nodes = [n["id"] for n in grid["nodes"]]
        edges = [e["id"] for e in grid["edges"]]
        async with h.client("root", token="adm") as root, h.client("all") as everything, \
                h.client("one") as one, h.client("view") as view, \
                h.client("late") as late, h.client("gone") as gone:
            await root.call("map.import", map_data=grid)
            followers = [Follower(everything, ["simulation.ticks", "map"]),
                         Follower(one, ["simulation.agent:t1"]),
                         Follower(view, [VIEW_TOPIC]),
                         Follower(gone, ["simulation.ticks", "map"])]
            for f in followers:
                await f.join()
            joiner = Follower(late, ["simulation.ticks", "map"])
            for step in steps:
                try:
                    taken = await take_step(root, step, nodes, edges)
                    if taken is not None:
                        nodes, edges = taken
                    elif step[0] == "join" and joiner not in followers:
                        await joiner.join()  # mid-run: snapshot then deltas
                        followers.append(joiner)
                    elif step[0] == "drop":
                        await wait_open(gone)
                        await gone.drop()  # resumes by itself, replaying what it missed
                except CallError as err:
                    assert err.code in ("validation_error", "conflict", "not_found"), err
                await check(root, followers)
            await wait_open(gone)
            assert gone.resumes == sum(1 for s in steps if s[0] == "drop")
            if gone.last_resume is not None:
                assert gone.last_resume["complete"]


async def test_a_running_simulation_sends_one_truck_a_small_delta_per_tick(worldhost: Any) -> None:
    h = await worldhost.start(config=ADMIN, listen=True)
    state = logistics_state(60, 150, 40, 80, seed=3)
    async with h.client("root", token="adm") as root, h.client("all") as everything, \
            h.client("one") as one, h.client("legacy") as legacy:
        await root.call("simulation.import_state", state_data=state)
        follow_all = Follower(everything, ["simulation.ticks", "map"])
        follow_one = Follower(one, ["simulation.agent:t1"])
        await follow_all.join()
        await follow_one.join()
        drain(legacy)
        await root.call("simulation.start", tick_hz=50)
        await trio.sleep(1.0)
        await root.call("simulation.stop")
        await check(root, [follow_all, follow_one])
        assert follow_all.deltas >= 20  # one per tick (and the start and the stop)
        # the client that never subscribed still gets simulation.ticked, unchanged
        await legacy.call("host.ping")
        ticked = [s for s in drain(legacy) if s["signal"] == "simulation.ticked"]
        assert len(ticked) >= 20 and {"tick", "moved", "packages", "dropped", "at"} <= \
            set(ticked[0]["data"])
        # one truck's delta is a few fields: under 1% of a tick's whole record (43 KB
        # with 1,000 trucks), whatever the world's size
        assert follow_one.sizes and max(follow_one.sizes) < 430, follow_one.sizes
