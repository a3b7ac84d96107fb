"""Rate-limited simulation topics (``simulation.agent:t1@2``): at most N deltas a
second, the ticks in between coalesced. A client holding a snapshot plus every
coalesced delta holds the topic's part of the world at each delta's tick, also
when it joined mid-run and after the server is killed (-9) and restarted."""

from __future__ import annotations

import copy
import uuid
from pathlib import Path
from typing import Any

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from host import config as config_mod
from host import plugins
from host.actions import Invalid
from host.client import CallError, open_client, url_opener
from host.testing import open_harness
from host.topics import TopicForms, family, rate_of
from plugins.simulation import position
from test_deltas import apply_delta, drain, wait_open
from worlds import logistics_state, step_strategies, take_step

ADMIN = {"host": {"admin_token": "adm"}}
VIEW = (0.0, 0.0, 500.0, 500.0)  # a quarter of a logistics_state map
TICK_HZ = 20.0


def records_of(state: dict[str, Any]) -> dict[str, Any]:
    """An export's records by slice key, as deltas name them."""
    records = {"meta": state["metadata"]}
    records.update({"agent:" + a["id"]: a for a in state["agents"]})
    records.update({"package:" + p["id"]: p for p in state["packages"]})
    return copy.deepcopy(records)


def restrict(topic: str, records: dict[str, Any], graph: dict[str, Any]) -> dict[str, Any]:
    """The records a topic (with or without its rate) covers."""
    bare = topic.rsplit("@", 1)[0] if "@" in topic else topic
    if bare == "simulation.ticks":
        return records
    if bare.startswith("simulation.agent:"):
        key = "agent:" + bare.split(":", 1)[1]
        return {key: records[key]} if key in records else {}
    x0, y0, x1, y1 = (float(v) for v in bare.split(":", 1)[1].split(","))
    where = {**{"node:" + n["id"]: n for n in graph["nodes"]},
             **{"edge:" + e["id"]: e for e in graph["edges"]}}
    out = {}
    for key, record in records.items():
        at = position(where, record) if key.startswith("agent:") else None
        if at is not None and x0 <= at[0] <= x1 and y0 <= at[1] <= y1:
            out[key] = record
    return out


class Held:
    """What a client holds of one topic: a snapshot kept up by its deltas. A coalesced
    delta may delete a key the client does not hold (it came and went, or was gone
    before the client's snapshot): nothing to do."""

    def __init__(self, topic: str, state: dict[str, Any]) -> None:
        self.topic = topic
        self.graph = copy.deepcopy(state["graph"])
        self.records = restrict(topic, records_of(state), self.graph)
        self.ticks: list[int] = []  # the tick of each delta taken
        self.history: list[dict[str, Any]] = []  # the records after each delta

    def apply(self, delta: dict[str, Any]) -> None:
        assert delta["topic"] == self.topic, delta
        self.graph = apply_delta(self.records, delta, self.graph, held_only=True)
        self.ticks.append(delta["tick"])
        self.history.append(copy.deepcopy(self.records))


async def snapshot(client: Any, topics: list[str]) -> dict[str, Any]:
    """Subscribe, then take the export: the deltas after its reply are what is new."""
    await client.call("world.subscribe", topics=topics)
    state = (await client.call("simulation.export_state"))["state_data"]
    drain(client)
    return state


class Watcher:
    """One client on ``simulation.ticks`` and ``map`` (every change, as before: the
    world as it is after each action) and on rate-limited topics: at each coalesced
    delta, in the order the client gets its signals, the rate-limited topic holds
    exactly its part of the world, and it came no sooner than its rate allows."""

    def __init__(self, client: Any, rated: list[str]) -> None:
        self.client = client
        self.rated = rated

    async def join(self) -> None:
        state = await snapshot(self.client, ["simulation.ticks", "map", *self.rated])
        self.all = Held("simulation.ticks", state)
        self.held = {topic: Held(topic, state) for topic in self.rated}

    def take(self) -> None:
        for sig in drain(self.client):
            name, data = sig["signal"], sig["data"]
            if name == "map.edge_removed":
                for held in (self.all, *self.held.values()):
                    held.graph["edges"] = [e for e in held.graph["edges"] if e["id"] != data["id"]]
            elif name == "simulation.delta" and data["topic"] == "simulation.ticks":
                self.all.apply(data)
            elif name == "simulation.delta":
                held = self.held[data["topic"]]
                last = held.ticks[-1] if held.ticks else None
                held.apply(data)
                assert data["tick"] == self.all.records["meta"]["tick"]
                assert held.records == restrict(held.topic, self.all.records, self.all.graph)
                if "graph" in data:
                    assert data["graph"] == self.all.graph
                rate = float(held.topic.rsplit("@", 1)[1])
                if self.all.records["meta"]["running"] and last is not None:
                    assert data["tick"] - last >= TICK_HZ / rate, (held.topic, last, data)
            else:
                assert name in ("sync_state", "map.imported"), sig


rates = st.sampled_from(["0.5", "1", "2", "3", "7", "20", "1000"])
actions = st.lists(st.one_of(
    *step_strategies(agents=6),
    st.tuples(st.just("start")),
    st.tuples(st.just("stop")),
    st.tuples(st.just("run"), st.floats(0.05, 3.0)),
    st.tuples(st.just("run"), st.floats(0.05, 1.0)),
    st.tuples(st.just("join")),
    st.tuples(st.just("join")),
), max_size=25)
worlds = st.tuples(st.integers(1, 5), st.integers(0, 8), st.integers(0, 1000))


@given(worlds, actions, rates, rates, rates)
@settings(max_examples=15, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
async def test_a_snapshot_plus_every_coalesced_delta_is_the_world_at_its_tick(
        tmp_path: Path, autojump_clock: Any, world: tuple[int, int, int], steps: list[Any],
        every: str, one: str, view: str) -> None:
    """Under virtual time (ticks are counted, not timed): random worlds, running from
    the start, random actions while running and stopped, random rates. A client
    that joins mid-run gets the same deltas from its snapshot on and holds the same
    at each; after the stop (which flushes) every client holds the export."""
    rated = [f"simulation.ticks@{every}", f"simulation.agent:t1@{one}",
             "simulation.view:{},{},{},{}@{}".format(*VIEW, view)]
    async with open_harness(tmp_path) as harness:
        h = await harness.start(config=ADMIN, db=tmp_path / f"{uuid.uuid4().hex}.db")
        agents, packages, seed = world
        state = logistics_state(9, 14, agents, packages, seed=seed)
        nodes = [n["id"] for n in state["graph"]["nodes"]]
        edges = [e["id"] for e in state["graph"]["edges"]]
        async with h.client("root", token="adm") as root, h.client("watch") as watch, \
                h.client("late") as late:
            await root.call("simulation.import_state", state_data=state)
            watcher = Watcher(watch, rated)
            await watcher.join()
            await root.call("simulation.start", tick_hz=TICK_HZ)
            joined: dict[str, Held] | None = None
            for step in steps:
                try:
                    taken = await take_step(root, step, nodes, edges)
                    if taken is not None:
                        nodes, edges = taken
                    elif step[0] == "start":
                        await root.call("simulation.start", tick_hz=TICK_HZ)
                    elif step[0] == "stop":
                        await root.call("simulation.stop")
                    elif step[0] == "run":
                        await trio.sleep(step[1])
                    elif step[0] == "join" and joined is None:
                        state = await snapshot(late, rated)  # mid-run, maybe while running
                        joined = {topic: Held(topic, state) for topic in rated}
                except CallError as err:
                    assert err.code in ("validation_error", "conflict", "not_found"), err
                await watch.call("host.ping")  # its signals so far are in before this reply
                watcher.take()
            try:
                await root.call("simulation.stop")
            except CallError as err:
                assert err.code == "conflict"
            export = (await root.call("simulation.export_state"))["state_data"]
            await watch.call("host.ping")
            watcher.take()
            for held in (watcher.all, *watcher.held.values()):
                assert held.records == restrict(held.topic, records_of(export), export["graph"])
            if joined is not None:
                await late.call("host.ping")
                for sig in drain(late):
                    if sig["signal"] == "simulation.delta":
                        joined[sig["data"]["topic"]].apply(sig["data"])
                for topic, held in joined.items():
                    assert held.records == restrict(topic, records_of(export), export["graph"])
                    # the same deltas as the first client's last ones, and at each, the same
                    mine = watcher.held[topic]
                    if held.ticks:
                        assert mine.ticks[-len(held.ticks):] == held.ticks
                        assert mine.history[-len(held.history):] == held.history


async def test_one_truck_at_two_a_second_gets_two_deltas_a_second(worldhost: Any) -> None:
    """Over a real port, in real time, at 20 ticks a second: the truck watched at
    @2 gets a delta every 10 ticks, the one watched at full rate one every tick, and
    both hold the truck as the export has it once the simulation stops."""
    h = await worldhost.start(config=ADMIN, listen=True)
    state = logistics_state(60, 150, 10, 30, seed=3)
    async with h.client("root", token="adm") as root, h.client("slow") as slow, \
            h.client("fast") as fast:
        await root.call("simulation.import_state", state_data=state)
        await root.call("simulation.step", ticks=5)  # trucks under way
        moving = next(a["id"] for a in
                      (await root.call("simulation.export_state"))["state_data"]["agents"]
                      if a.get("edge") is not None)
        topics = {slow: f"simulation.agent:{moving}@2", fast: f"simulation.agent:{moving}"}
        held = {c: Held(t, await snapshot(c, [t])) for c, t in topics.items()}
        await root.call("simulation.start", tick_hz=20)
        await trio.sleep(1.6)
        stopped = (await root.call("simulation.stop"))["tick"]
        export = (await root.call("simulation.export_state"))["state_data"]
        for client, h_ in held.items():
            await client.call("host.ping")
            for sig in drain(client):
                if sig["signal"] == "simulation.delta":
                    h_.apply(sig["data"])
            assert h_.records == restrict(h_.topic, records_of(export), export["graph"])
        slow_ticks, fast_ticks = held[slow].ticks, held[fast].ticks
        assert slow_ticks[0] == 5  # the first: a reset to the truck, at once
        gaps = [b - a for a, b in zip(slow_ticks, slow_ticks[1:-1])]  # the stop may flush
        assert gaps and all(g >= 10 for g in gaps), slow_ticks
        assert len(slow_ticks) <= (stopped - 5) // 10 + 2
        assert len(fast_ticks) > 2 * len(slow_ticks)  # one a tick while the truck drives


@pytest.mark.parametrize(("topic", "why"), [
    ("simulation.agent:t1@0", "above 0"),
    ("simulation.agent:t1@-2", "above 0"),
    ("simulation.agent:t1@1001", "at most 1000"),
    ("simulation.ticks@1e400", "at most 1000"),
    ("simulation.view:0,0,5,5@nan", "0,0,5,5@nan"),
    ("simulation.ticks@fast", "@fast"),
    ("simulation.ticks@2@3", "at most 1000"),
    ("chat@2", "takes no rate"),
])
async def test_a_bad_rate_is_refused_naming_the_topic(worldhost: Any, topic: str,
                                                      why: str) -> None:
    h = await worldhost.start(listen=True)
    async with h.client("ada") as ada:
        await ada.call("world.subscribe", topics=["map"])
        with pytest.raises(CallError) as err:
            await ada.call("world.subscribe", topics=["chat", topic])
        assert err.value.code == "validation_error"
        assert err.value.details["path"] == "params.topics[1]"
        assert err.value.details["topic"] == topic and topic in err.value.message
        assert why in err.value.message, err.value.message
        reply = await ada.call("world.subscribe", topics=[])
        assert reply["topics"] == ["map"]  # nothing changed


FORMS = TopicForms.of(plugins.load(config_mod.from_dict({}, "<test>"), entry_points=False))


@settings(max_examples=300, deadline=None)
@given(base=st.sampled_from(["simulation.ticks", "simulation.agent:t1", "simulation.agent:a@b",
                             "simulation.view:0,0,5,5", "chat", "process:p1"]),
       suffix=st.one_of(st.text(max_size=12), st.floats(allow_nan=True).map(str),
                        st.integers(-5, 2000).map(str)))
def test_any_rate_suffix_is_taken_with_its_rate_or_refused(base: str, suffix: str) -> None:
    """``<topic>@<anything>``: a simulation topic takes it as a rate above 0 and at
    most 1000, or (an agent id may hold ``@``) as part of its argument; a topic
    without rates only as part of an argument; anything else is a validation_error
    naming the topic."""
    topic = f"{base}@{suffix}"
    try:
        assert FORMS.check(topic, "params.topics[0]") == topic
    except Invalid as exc:
        assert exc.details["path"] == "params.topics[0]" and exc.details["topic"] == topic
        return
    if family(topic).startswith("simulation."):
        rate = rate_of(topic)
        if rate is None:  # the suffix is part of an agent's id
            assert base.startswith("simulation.agent:")
            assert suffix[:1] not in set("0123456789.+-")
        else:
            assert 0 < rate <= 1000
    else:
        assert base == "process:p1"


async def test_after_kill_nine_and_restart_a_rate_limited_client_converges(
        tmp_path: Path) -> None:
    """A real ``worldhost serve``: what a @2 topic had gathered but not sent dies with
    the process; after the restart the simulation runs on, the client resumes, and
    the topic's first delta is a reset to the truck, so the client holds the export."""
    from serverproc import ServerProcess, free_port
    server = ServerProcess(tmp_path / "w.db", port=free_port(),
                           env={"WORLDHOST_ADMIN_TOKEN": "adm"}).start()
    try:
        opener = url_opener(server.url)
        async with open_client(opener, name="root", token="adm") as root, \
                open_client(opener, name="watch") as watch:
            await root.call("simulation.import_state",
                            state_data=logistics_state(60, 150, 10, 30, seed=5))
            await root.call("simulation.step", ticks=5)
            moving = next(a["id"] for a in
                          (await root.call("simulation.export_state"))["state_data"]["agents"]
                          if a.get("edge") is not None)
            topics = [f"simulation.agent:{moving}@2", "simulation.ticks@1"]
            state = await snapshot(watch, topics)
            held = {t: Held(t, state) for t in topics}
            await root.call("simulation.start", tick_hz=20)
            await trio.sleep(1.3)  # a few deltas sent, then some ticks gathered, unsent
            server.kill9()
            server.start()
            await wait_open(watch)
            await wait_open(root)
            await trio.sleep(1.0)  # running again: ticks after the restart
            await root.call("simulation.stop")
            export = (await root.call("simulation.export_state"))["state_data"]
            await watch.call("host.ping")
            resets = {t: 0 for t in topics}
            for sig in drain(watch):
                if sig["signal"] == "simulation.delta" and "re" not in sig:
                    held[sig["data"]["topic"]].apply(sig["data"])
                    resets[sig["data"]["topic"]] += bool(sig["data"].get("reset"))
            assert watch.resumes >= 1
            assert resets == {t: 2 for t in topics}  # at the subscription, after the restart
            for topic, h_ in held.items():
                assert h_.records == restrict(topic, records_of(export), export["graph"])
    finally:
        server.stop()
