"""A logistics simulation: trucks carry packages over the map (slice ``simulation``).

The slice is a keyed collection: ``meta`` (tick, clock, prices, running), one
record per agent (``agent:ID``) and per package (``package:ID``). Ticks are
internal ``simulation.tick`` actions submitted by a background task, so they
are journaled and replayed like everything else, and a tick is a pure function
of the world: the same world and actions give the same world.

Agent kinds are pluggable through the ``register_agent_kinds`` hook; the
built-in kind is ``truck`` (see ``plugins.trucks``).
"""

from __future__ import annotations

import bisect
import logging
import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field as dataclass_field
from typing import Annotated, Any

import msgspec
import pluggy
import trio

from host.actions import (MAX_ID_LENGTH, Action, ActionError, Conflict, Context, Id, Invalid,
                          NotFound, Role, bounded, encoded_size)
from host.api import AppliedAction, HostAPI, ImportStep
from host.plugins import hookimpl
from plugins.simulation import hookspecs
from host.topics import UNSUBSCRIBED, Topic, argument, family, rate_of, split_rate
from plugins import map as map_plugin
from plugins.routing import Router
from state.slices import KeyedSlice, SliceSpec

log = logging.getLogger("worldhost.simulation")

AGENT = "agent:"
PACKAGE = "package:"
STATUSES = ("waiting", "in_transit", "delivered")


class Settings(msgspec.Struct, forbid_unknown_fields=True):
    plans_per_tick: int = 1  # idle agents that may plan routes in one tick (each costs a search)
    max_step_ticks: int = 100_000
    max_agents: int = 10_000
    max_packages: int = 100_000
    max_agent_bytes: int = 64 * 1024  # an agent as a client sends it (add_agent, import)


# The ranges of the world's settings (metadata), kept where ticks cannot overflow them.
Tick = Annotated[int, msgspec.Meta(ge=0, le=2**53)]
DtS = Annotated[float, msgspec.Meta(gt=0, le=3600)]
FuelPrice = Annotated[float, msgspec.Meta(ge=0, le=1e6)]
TicksPerDay = Annotated[int, msgspec.Meta(ge=1, le=10**9)]
TickHz = Annotated[float, msgspec.Meta(gt=0, le=1000)]


def default_meta() -> dict[str, Any]:
    return {"tick": 0, "dt_s": 1.0, "global_fuel_price": 1.5, "current_day": 0,
            "ticks_per_day": 1440, "running": False, "tick_hz": 20.0, "rng_state": 1,
            "dropped_ticks": 0}


class Metadata(msgspec.Struct, forbid_unknown_fields=True):
    """Imported metadata: the four fields the protocol names are required, the rest
    take the defaults of ``default_meta``."""

    tick: Tick
    dt_s: DtS
    global_fuel_price: FuelPrice
    current_day: Tick
    ticks_per_day: TicksPerDay = 1440
    running: bool = False
    tick_hz: TickHz = 20.0
    rng_state: Annotated[int, msgspec.Meta(ge=0, lt=2**48)] = 1
    dropped_ticks: Tick = 0


@dataclass(frozen=True)
class AgentKind:
    """A kind of simulation agent.

    ``from_plain(data, path, tick)`` validates plain data and returns the full
    record (defaults filled), raising Invalid naming the bad field;
    ``step(sim, agent, dt)`` returns the agent's new record, or None when it did
    not change; ``to_plain(record)`` gives the exported form.
    """

    name: str
    from_plain: Callable[[Any, dict[str, Any], str], dict[str, Any]]
    step: Callable[[Any, dict[str, Any], float], dict[str, Any] | None]
    to_plain: Callable[[dict[str, Any]], dict[str, Any]] = lambda record: record


def bad(path: str, message: str) -> Invalid:
    return Invalid(f"{message} at {path}", details={"path": path, "message": message})


def number(data: dict[str, Any], field: str, path: str, default: float,
            minimum: float | None = 0.0, positive: bool = False,
            maximum: float | None = None) -> float:
    value = data.get(field, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise bad(f"{path}.{field}", f"{field} must be a finite number")
    if positive and value <= 0:
        raise bad(f"{path}.{field}", f"{field} must be positive")
    if minimum is not None and value < minimum:
        raise bad(f"{path}.{field}", f"{field} must be at least {minimum:g}")
    if maximum is not None and value > maximum:
        raise bad(f"{path}.{field}", f"{field} must be at most {maximum:g}")
    return float(value)


def _finite(agent: dict[str, Any], tick: int) -> None:
    """Refuse a tick that would store a non-finite number in an agent: whatever a
    kind computes, the world keeps only finite numbers (its export must import)."""
    for field, value in agent.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise Conflict(f"tick {tick} would give agent {agent.get('id')!r} a non-finite "
                           f"{field}; the tick is refused and the world is unchanged",
                           details={"agent": agent.get("id"), "field": field,
                                    "reason": "non_finite"})


@dataclass
class Index:
    """What ticks derive from the simulation slice, carried from one tick to the next.

    An action that changes the simulation slice offers its updated copy
    (``keep_index``); it is promoted once the action commits, and an action that
    changes the slice without offering one drops it (see ``action_applied``).
    Kept exactly equal to what a rebuild would give, so replay does not depend on it.
    """

    tick: int
    agent_keys: list[str]
    waiting: list[dict[str, Any]]  # oldest first: (created_tick, id)
    targeted: Counter[str]  # package id -> agents heading for it


def _age(package: dict[str, Any]) -> tuple[int, str]:
    return package["created_tick"], package["id"]


class Sim:
    """One action's view of the simulation: records, graph, routing and events."""

    def __init__(self, ctx: Context, rt: SimRuntime) -> None:
        self.ctx = ctx
        self.rt = rt
        self.slice: KeyedSlice = ctx.keyed("simulation")
        self.map: KeyedSlice = ctx.keyed("map")
        self.kinds = rt.kinds
        self.router = rt.router
        self.settings: Settings = ctx.settings
        meta = self.slice.get("meta")
        self.meta = dict(meta) if meta is not None else default_meta()
        self.moved: dict[str, dict[str, Any]] = {}
        self.package_events: dict[str, dict[str, Any]] = {}
        self.plans_left = self.settings.plans_per_tick
        self._agent_keys: list[str] | None = None
        self._waiting: list[dict[str, Any]] | None = None
        self._targeted: Counter[str] | None = None
        index = rt.index
        if index is not None and index.tick == self.meta["tick"]:
            self._agent_keys, self._waiting = index.agent_keys, index.waiting
            self._targeted = Counter(index.targeted)  # this action's own copy to change
        self._routes = {(start, goal): path for start, goal, path in ctx.memo.get("routes", ())}

    # graph ---------------------------------------------------------------
    def node(self, node_id: str) -> dict[str, Any] | None:
        return self.map.get(map_plugin.NODE + node_id)

    def edge(self, edge_id: str) -> dict[str, Any] | None:
        return self.map.get(map_plugin.EDGE + edge_id)

    def route(self, start: str, goal: str) -> list[str] | None:
        """Edge ids from start to goal by least travel time (None: unreachable).

        Every route an action looks up goes into its journal memo, so replaying
        the action finds them there instead of searching again."""
        key = (start, goal)
        if key in self._routes:
            path = self._routes[key]
        else:
            path = self.router.route(self.map, start, goal)
            self._routes[key] = path = None if path is None else list(path)
            self.ctx.memo.setdefault("routes", []).append([start, goal, path])
        return None if path is None else list(path)

    # packages --------------------------------------------------------------
    def package(self, package_id: str) -> dict[str, Any] | None:
        return self.slice.get(PACKAGE + package_id)

    def put_package(self, record: dict[str, Any]) -> None:
        self.slice.put(PACKAGE + record["id"], record)
        self.package_events[record["id"]] = {
            "id": record["id"], "status": record["status"], "carried_by": record["carried_by"]}
        if self._waiting is not None:
            self.drop_waiting(record["id"])
            if record["status"] == "waiting":
                bisect.insort(self._waiting, record, key=_age)

    def drop_waiting(self, package_id: str) -> None:
        """Take a package off the waiting list (a new list: the index may share the old)."""
        if self._waiting is not None:
            self._waiting = [p for p in self._waiting if p["id"] != package_id]

    def waiting(self) -> list[dict[str, Any]]:
        """Waiting packages, oldest first (created tick, then id)."""
        if self._waiting is None:
            packages = [p for k, p in self.slice.items()
                        if k.startswith(PACKAGE) and p["status"] == "waiting"]
            packages.sort(key=_age)
            self._waiting = packages
        return self._waiting

    def targeted(self) -> Counter[str]:
        """Package ids agents are heading for (with how many agents head for each)."""
        if self._targeted is None:
            self._targeted = Counter(a["target"] for a in self.agents() if a.get("target"))
        return self._targeted

    def agent_keys(self) -> list[str]:
        if self._agent_keys is None:
            self._agent_keys = sorted(k for k in self.slice.keys() if k.startswith(AGENT))
        return self._agent_keys

    def agents(self) -> list[dict[str, Any]]:
        return [self.slice[key] for key in self.agent_keys()]

    # ticking ---------------------------------------------------------------
    def tick(self) -> None:
        meta = self.meta
        meta["tick"] += 1
        meta["current_day"] = meta["tick"] // max(1, meta["ticks_per_day"])
        meta["rng_state"] = (meta["rng_state"] * 0x5DEECE66D + 11) % 2**48  # stays JSON-exact
        self.plans_left = self.settings.plans_per_tick
        targeted = self.targeted()  # built before this tick's first change
        self.waiting()
        dt = meta["dt_s"]
        get, put, kinds = self.slice.get, self.slice.put, self.kinds
        for key in self.agent_keys():
            agent = get(key)
            kind = kinds.get(agent["kind"])
            if kind is None:
                continue
            new = kind.step(self, agent, dt)
            if new is not None and new != agent:
                _finite(new, meta["tick"])
                put(key, new)
                self.moved[new["id"]] = {"id": new["id"], "node": new.get("node"),
                                         "edge": new.get("edge"),
                                         "progress": new.get("progress", 0.0)}
                old_target, new_target = agent.get("target"), new.get("target")
                if old_target != new_target:
                    if old_target:
                        targeted[old_target] -= 1
                        if targeted[old_target] <= 0:
                            del targeted[old_target]
                    if new_target:
                        targeted[new_target] += 1

    def save_meta(self) -> None:
        self.slice.put("meta", self.meta)

    def keep_index(self) -> None:
        """Offer this action's index to the next one; promoted only if this one commits."""
        self.rt.pending_index = Index(self.meta["tick"], self.agent_keys(), self.waiting(),
                                      self.targeted())

    def changes(self) -> dict[str, Any]:
        return {"tick": self.meta["tick"], "current_day": self.meta["current_day"],
                "moved": list(self.moved.values()),
                "packages": list(self.package_events.values())}


# --- topics and deltas -------------------------------------------------------------

TICKS, AGENT_TOPIC, VIEW_TOPIC = "simulation.ticks", "simulation.agent", "simulation.view"
MAX_RATE = 1000.0
"""The most deltas a second a topic may ask for (``...@<rate>``): the highest tick_hz.
A rate at or above the simulation's tick_hz gets every tick."""


def parse_view(arg: str) -> tuple[float, float, float, float]:
    """``x0,y0,x1,y1`` of ``simulation.view:x0,y0,x1,y1``: a rectangle of map coordinates."""
    parts = arg.split(",")
    if len(parts) != 4:
        raise ValueError("a view is x0,y0,x1,y1: four numbers")
    try:
        x0, y0, x1, y1 = (float(p) for p in parts)
    except ValueError:
        raise ValueError("a view is x0,y0,x1,y1: four numbers") from None
    if not all(math.isfinite(v) for v in (x0, y0, x1, y1)):
        raise ValueError("a view's coordinates are finite numbers")
    if x0 > x1 or y0 > y1:
        raise ValueError("a view needs x0 <= x1 and y0 <= y1")
    return x0, y0, x1, y1


def _agent_id(arg: str) -> str:
    if len(arg) > MAX_ID_LENGTH:
        raise ValueError(f"an agent id is at most {MAX_ID_LENGTH} characters")
    return arg


def position(graph: Any, agent: dict[str, Any]) -> tuple[float, float] | None:
    """Where an agent is on the map: at its node, or along its edge by its progress."""
    node = graph.get(map_plugin.NODE + agent["node"])
    if node is None:
        return None
    edge = graph.get(map_plugin.EDGE + agent["edge"]) if agent.get("edge") else None
    to = graph.get(map_plugin.NODE + edge["to"]) if edge is not None else None
    if edge is None or to is None:
        return node["x"], node["y"]
    f = min(1.0, agent.get("progress", 0.0) / edge["length"])
    return node["x"] + (to["x"] - node["x"]) * f, node["y"] + (to["y"] - node["y"]) * f


def _where(graph: Any, agent: dict[str, Any] | None) -> tuple[float, float] | None:
    """Where an agent is (None: nowhere, or no agent)."""
    return position(graph, agent) if agent is not None else None


def _inside(view: tuple[float, float, float, float], at: tuple[float, float] | None) -> bool:
    return at is not None and view[0] <= at[0] <= view[2] and view[1] <= at[1] <= view[3]


def _announce(ctx: Context, signal: str, data: dict[str, Any], others: bool = True) -> None:
    """A change of the simulation: its signal to the sessions that never subscribed
    (as before topics), and its deltas to the subscribers of the simulation's topics."""
    ctx.broadcast(signal, data, others=others, topic=UNSUBSCRIBED)
    publish(ctx)


@dataclass
class Pending:
    """What a rate-limited topic (``simulation.agent:t1@2``) has gathered since it last
    sent a delta, merged so that its next delta brings a subscriber from
    ``last_sent`` to now in one step.

    Every value in it is the latest, so applied to any state the topic had between
    ``last_sent`` and now it gives now: a subscriber whose snapshot falls in between
    converges too. It holds at most one entry per record the topic covered at
    ``last_sent`` or covers now. Never changed once stored in the runtime: an
    action merges into a copy (``copy``), swapped in at the end of ``publish``."""

    last_sent: int | None  # None: nothing sent since the world loaded: a reset is due
    reset: bool = False
    sets: dict[str, Any] = dataclass_field(default_factory=dict)
    patches: dict[str, dict[str, Any]] = dataclass_field(default_factory=dict)
    dels: dict[str, None] = dataclass_field(default_factory=dict)  # a dict: a fixed order
    born: set[str] = dataclass_field(default_factory=set)  # first set here: no subscriber holds it
    graph: dict[str, Any] | None = None

    def copy(self) -> Pending:
        return Pending(self.last_sent, self.reset, dict(self.sets), dict(self.patches),
                       dict(self.dels), set(self.born), self.graph)

    def merge(self, items: list[tuple[str, str, Any]], reset: bool,
              graph: dict[str, Any] | None) -> None:
        """One action's delta on top: a reset starts over from its sets; a set replaces
        what was pending for its key; a patch updates a pending set or merges into a
        pending patch (latest wins); a del drops what was pending for its key, and is
        sent only if a subscriber may hold the key."""
        if reset:
            self.reset = True
            self.sets, self.patches, self.dels, self.born = {}, {}, {}, set()
        for key, how, value in items:
            if how in ("set", "new"):
                if how == "new" and key not in self.patches and key not in self.dels:
                    self.born.add(key)
                self.sets[key] = value
                self.patches.pop(key, None)
                self.dels.pop(key, None)
            elif how == "patch":
                if not value:
                    continue
                if key in self.sets:
                    self.sets[key] = {**self.sets[key], **value}
                else:
                    self.patches[key] = {**self.patches.get(key, {}), **value}
            else:
                self.sets.pop(key, None)
                self.patches.pop(key, None)
                if key in self.born:
                    self.born.discard(key)
                elif not self.reset:  # after a reset a subscriber holds only what is set
                    self.dels[key] = None
        if graph is not None:
            self.graph = graph

    def empty(self) -> bool:
        return not (self.reset or self.sets or self.patches or self.dels or self.graph is not None)

    def delta(self, topic: str, tick: int) -> dict[str, Any]:
        data: dict[str, Any] = {"topic": topic, "tick": tick}
        if self.reset:
            data["reset"] = True
        if self.dels:
            data["del"] = list(self.dels)
        if self.sets:
            data["set"] = self.sets
        if self.patches:
            data["patch"] = self.patches
        if self.graph is not None:
            data["graph"] = self.graph
        return data


def publish(ctx: Context) -> None:
    """Send this action's changes of the simulation slice as ``simulation.delta``, one
    signal per subscribed topic (encoded once for all its subscribers): only the
    records that changed, and of those only the fields that changed.

    Applied in order to a snapshot (``simulation.export_state``), the deltas of
    ``simulation.ticks`` give exactly the export after each action; those of
    ``simulation.agent:<id>`` the one agent, of ``simulation.view:<x0>,<y0>,<x1>,<y1>``
    the agents inside the rectangle.

    A topic with a rate (``...@2``) gathers its deltas in a ``Pending`` and sends
    them merged once ``tick_hz / rate`` ticks have passed since it last sent, or at
    once while the simulation is not running (so stopping flushes it). The pending
    state lives in the world's runtime: the first delta of such a topic after the
    world loads (or after the topic gains its first subscriber) is a reset with the
    topic's records, so a subscriber never diverges. ``publish`` is the last thing
    an action does, and swaps the new pending state in only at its end."""
    interest = ctx.host.interest
    rt = _runtime(ctx.host)
    ticks, agents, views = (interest.subscribed(TICKS), interest.subscribed(AGENT_TOPIC),
                            interest.subscribed(VIEW_TOPIC))
    if not (ticks or agents or views) or ctx.host.replaying:
        rt.coalesce = {}  # nobody to gather for: a later subscriber starts afresh
        return
    records = ctx.keyed("simulation")
    graph = ctx.keyed("map")
    kinds = rt.kinds
    reset = records.replacing
    meta = records.get("meta") or default_meta()
    tick_now = meta["tick"]
    gathered = rt.coalesce
    staged: dict[str, Pending] = {}

    def plain(key: str, record: dict[str, Any]) -> dict[str, Any]:
        kind = kinds.get(record.get("kind", "")) if key.startswith(AGENT) else None
        return kind.to_plain(record) if kind is not None else record

    changes = []  # (key, old plain or None, new plain or None)
    for key, old, new in records.changes():
        changes.append((key, None if old is None else plain(key, old),
                        None if new is None else plain(key, new)))

    def entry(key: str, old: dict[str, Any] | None,
              new: dict[str, Any] | None) -> tuple[str, str, Any]:
        if new is None:
            return key, "del", None
        if reset or (old is not None and not old.keys() <= new.keys()):
            return key, "set", new
        if old is None:
            return key, "new", new  # a set no subscriber held before
        return key, "patch", {f: v for f, v in new.items() if f not in old or old[f] != v}

    def send(topic: str, items: list[tuple[str, str, Any]],
             everything: Callable[[], list[tuple[str, str, Any]]], **extra: Any) -> None:
        """One topic's delta, if it has anything to say; after a reset the client
        holds only what is set, so nothing is deleted. For a topic with a rate: into
        its pending state, sent when due; ``everything`` gives the topic's records,
        for its first delta (a reset)."""
        rate = rate_of(topic)
        if rate is not None:
            pending = gathered.get(topic)
            if pending is None:
                pending = Pending(None)
                whole = family(topic) == TICKS
                pending.merge(everything(), True,
                              map_plugin.export_graph(dict(graph.items())) if whole else None)
            elif items or reset or extra:
                pending = pending.copy()
                pending.merge(items, reset, extra.get("graph"))
            due = (pending.last_sent is None or not meta["running"]
                   or tick_now - pending.last_sent >= meta["tick_hz"] / rate)
            if due and not pending.empty():
                ctx.broadcast("simulation.delta", pending.delta(topic, tick_now), topic=topic)
                pending = Pending(tick_now)
            staged[topic] = pending
            return
        data: dict[str, Any] = {"topic": topic, "tick": tick_now}
        if reset:
            data["reset"] = True
        for key, how, value in items:
            if how in ("set", "new"):
                data.setdefault("set", {})[key] = value
            elif how == "patch" and value:
                data.setdefault("patch", {})[key] = value
            elif how == "del" and not reset:
                data.setdefault("del", []).append(key)
        if len(data) > 2 or extra:
            ctx.broadcast("simulation.delta", {**data, **extra}, topic=topic)

    if ticks:
        graph_now = {"graph": map_plugin.export_graph(dict(graph.items()))} if graph.pending \
            else {}
        items = [entry(*change) for change in changes]
        for topic in sorted(ticks):
            send(topic, items, lambda: [(k, "set", plain(k, r)) for k, r in records.items()],
                 **graph_now)
    if agents:
        by_key = {key: (old, new) for key, old, new in changes}
        for topic in sorted(agents):
            key = AGENT + argument(split_rate(topic)[0])

            def the_agent(key: str = key) -> list[tuple[str, str, Any]]:
                record = records.get(key)
                return [] if record is None else [(key, "set", plain(key, record))]
            send(topic, [entry(key, *by_key[key])] if key in by_key else [], the_agent)
    if views:
        old_graph = graph.data()
        moved = [(key, old, new) for key, old, new in changes if key.startswith(AGENT)]
        if reset:  # every agent is new: the view holds those inside
            moved = [(key, None, plain(key, rec)) for key, rec in records.items()
                     if key.startswith(AGENT)]
        placed = [(key, old, new, _where(old_graph, old), _where(graph, new))
                  for key, old, new in moved]
        for topic in sorted(views):
            view = parse_view(argument(split_rate(topic)[0]))
            items = []
            for key, old, new, was_at, now_at in placed:
                was, now = _inside(view, was_at), _inside(view, now_at)
                if now:
                    items.append(entry(key, old if was else None, new))
                elif was:
                    items.append((key, "del", None))

            def inside_now(view: tuple[float, float, float, float] = view
                           ) -> list[tuple[str, str, Any]]:
                agents_now = ((key, plain(key, rec)) for key, rec in records.items()
                              if key.startswith(AGENT))
                return [(key, "set", rec) for key, rec in agents_now
                        if _inside(view, _where(graph, rec))]
            send(topic, items, inside_now)
    rt.coalesce = staged


# --- per-world runtime: agent kinds, router, the index, what coalesces ---------------

@dataclass
class SimRuntime:
    """What the simulation keeps for a world while it is loaded; never saved (all of
    it is rebuilt from the world, or only saves work)."""

    kinds: dict[str, AgentKind]  # every plugin's, by name
    router: Router  # routes, cached until the map changes
    index: Index | None = None  # agents and waiting packages as of the last commit
    pending_index: Index | None = None  # the action under way's: kept if it commits
    coalesce: dict[str, Pending] = dataclass_field(default_factory=dict)  # by topic


def _runtime(host: HostAPI) -> SimRuntime:
    rt = host.runtime("simulation")
    found: SimRuntime | None = rt.get("state")
    if found is None:
        kinds: dict[str, AgentKind] = {}
        owners: dict[str, str] = {}
        for plugin, registered in host.collect("register_agent_kinds"):
            for kind in registered:
                if kind.name in kinds:
                    raise RuntimeError(f"agent kind {kind.name!r} is registered by both plugin "
                                       f"{owners[kind.name]!r} and plugin {plugin!r}")
                kinds[kind.name] = kind
                owners[kind.name] = plugin
        found = rt["state"] = SimRuntime(kinds, Router())
    return found


def _sim(ctx: Context) -> Sim:
    return Sim(ctx, _runtime(ctx.host))


# --- actions ---------------------------------------------------------------------

class StartParams(msgspec.Struct, forbid_unknown_fields=True):
    tick_hz: float = 20.0  # checked by hand: its error predates TickHz


class StepParams(msgspec.Struct, forbid_unknown_fields=True):
    ticks: int = 1


class TickParams(msgspec.Struct, forbid_unknown_fields=True):
    dropped: int = 0


class SetParams(msgspec.Struct, forbid_unknown_fields=True):
    dt_s: DtS | None = None
    global_fuel_price: FuelPrice | None = None
    ticks_per_day: TicksPerDay | None = None


class IdParams(msgspec.Struct, forbid_unknown_fields=True):
    id: Id


class StateParams(msgspec.Struct, forbid_unknown_fields=True):
    state_data: dict[str, Any]


def start(ctx: Context, p: StartParams) -> dict[str, Any]:
    if not (math.isfinite(p.tick_hz) and 0 < p.tick_hz <= 1000):
        raise bad("params.tick_hz", "tick_hz must be above 0 and at most 1000")
    sim = _sim(ctx)
    if sim.meta["running"]:
        raise Conflict("the simulation is already running")
    sim.meta.update(running=True, tick_hz=float(p.tick_hz))
    sim.save_meta()
    sim.keep_index()  # built now, if need be, rather than in the first tick
    data = {"tick": sim.meta["tick"], "tick_hz": sim.meta["tick_hz"]}
    _announce(ctx, "simulation.started", data)
    return data


def stop(ctx: Context, p: None) -> dict[str, Any]:
    sim = _sim(ctx)
    if not sim.meta["running"]:
        raise Conflict("the simulation is not running")
    sim.meta["running"] = False
    sim.save_meta()
    sim.keep_index()
    data = {"tick": sim.meta["tick"]}
    _announce(ctx, "simulation.stopped", data)
    return data


def tick(ctx: Context, p: TickParams) -> dict[str, Any]:
    if ctx.host.replaying and "writes" in ctx.memo:
        records = ctx.keyed("simulation")
        _replay_writes(records, ctx.memo["writes"])
        return {"tick": records.get("meta")["tick"]}
    sim = _sim(ctx)
    if not sim.meta["running"]:
        raise Conflict("the simulation is not running")
    sim.meta["dropped_ticks"] += p.dropped
    sim.tick()
    sim.save_meta()
    sim.keep_index()
    # what the tick wrote, rather than the routes it looked up: replay writes it again
    # instead of stepping every agent (a tick is a pure function of the world, so the
    # two agree; replaying 10 s of ticks of 1,000 trucks took longer than they did)
    ctx.memo.pop("routes", None)
    ctx.memo["writes"] = _writes(ctx.keyed("simulation"))
    if ctx.host.interest.anyone_unsubscribed():
        ctx.broadcast("simulation.ticked", {**sim.changes(), "dropped": p.dropped, "at": ctx.now},
                      topic=UNSUBSCRIBED)
    publish(ctx)
    return {"tick": sim.meta["tick"]}


def _writes(records: Any) -> list[list[Any]]:
    """Every record an action changed, as a tick's journal memo keeps it: ``[key]`` for
    one it deleted, ``[key, record]`` for one it added, ``[key, fields, gone]`` for one
    it changed (the fields whose value changed, and the fields it lost). A moving
    truck is three numbers."""
    writes: list[list[Any]] = []
    for key, old, new in records.changes():
        if new is None:
            writes.append([key])
        elif old is None:
            writes.append([key, new])
        else:
            fields = {f: v for f, v in new.items() if f not in old or not _same(old[f], v)}
            writes.append([key, fields, [f for f in old if f not in new]])
    return writes


def _same(a: Any, b: Any) -> bool:
    """Whether a field kept its value exactly, so that replay may leave it: the same
    object, or an equal string or number of the same type (and sign, for a zero)."""
    if a is b:
        return True
    kind = type(a)
    if kind is not type(b) or kind not in (str, int, float, bool) or a != b:
        return False
    return kind is not float or math.copysign(1.0, a) == math.copysign(1.0, b)


def _replay_writes(records: Any, writes: list[list[Any]]) -> None:
    """Write again what a tick wrote (``_writes``)."""
    for write in writes:
        key = write[0]
        if len(write) == 1:
            records.delete(key)
        elif len(write) == 2:
            records.put(key, write[1])
        else:
            record = {**records[key], **write[1]}
            for field_name in write[2]:
                del record[field_name]
            records.put(key, record)


def step(ctx: Context, p: StepParams) -> dict[str, Any]:
    sim = _sim(ctx)
    if not 1 <= p.ticks <= sim.settings.max_step_ticks:
        raise bad("params.ticks", f"ticks must be from 1 to {sim.settings.max_step_ticks}")
    if sim.meta["running"]:
        raise Conflict("simulation.step works only while the simulation is stopped")
    for _ in range(p.ticks):
        sim.tick()
    sim.save_meta()
    sim.keep_index()
    _announce(ctx, "simulation.ticked", {**sim.changes(), "ticks": p.ticks, "dropped": 0,
                                         "at": ctx.now}, others=False)
    return {"tick": sim.meta["tick"]}


def set_(ctx: Context, p: SetParams) -> dict[str, Any]:
    sim = _sim(ctx)  # the ranges are the params' types: a value outside is refused before
    if p.dt_s is not None:
        sim.meta["dt_s"] = float(p.dt_s)
    if p.global_fuel_price is not None:
        sim.meta["global_fuel_price"] = float(p.global_fuel_price)
    if p.ticks_per_day is not None:
        sim.meta["ticks_per_day"] = p.ticks_per_day
        sim.meta["current_day"] = sim.meta["tick"] // p.ticks_per_day
    sim.save_meta()
    data = {"metadata": sim.meta}
    _announce(ctx, "simulation.updated", data)
    return data


def _agent_record(sim: Sim, data: Any, path: str, has_node: Callable[[str], bool]) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise bad(path, "an agent must be an object")
    for field in ("id", "kind", "node"):
        if not isinstance(data.get(field), str) or not data[field]:
            raise bad(f"{path}.{field}", f"agent {field} must be a non-empty string")
        bounded(data[field], f"{path}.{field}")
    kind = sim.kinds.get(data["kind"])
    if kind is None:
        raise bad(f"{path}.kind", f"no plugin registered agent kind {data['kind']!r}")
    if not has_node(data["node"]):
        raise bad(f"{path}.node", f"agent {data['id']!r} names missing node {data['node']!r}")
    size = encoded_size(data)
    if size > sim.settings.max_agent_bytes:
        raise bad(path, f"agent {data['id']!r} is {size} bytes; max_agent_bytes is "
                        f"{sim.settings.max_agent_bytes}")
    return kind.from_plain(sim, data, path)


def add_agent(ctx: Context, data: dict[str, Any]) -> dict[str, Any]:
    sim = _sim(ctx)
    record = _agent_record(sim, data, "params", lambda n: sim.node(n) is not None)
    if record.get("cargo"):
        raise bad("params.cargo", "a new agent starts empty; add packages separately")
    if AGENT + record["id"] in sim.slice:
        raise bad("params.id", f"duplicate agent id {record['id']!r}")
    if len(sim.agent_keys()) >= sim.settings.max_agents:
        raise Conflict(f"the simulation is full: max_agents is {sim.settings.max_agents}",
                       details={"budget": "max_agents", "limit": sim.settings.max_agents})
    sim.slice.put(AGENT + record["id"], record)
    out = {"agent": sim.kinds[record["kind"]].to_plain(record)}
    _announce(ctx, "simulation.agent_added", out)
    return out


def remove_agent(ctx: Context, p: IdParams) -> dict[str, Any]:
    sim = _sim(ctx)
    agent = sim.slice.get(AGENT + p.id)
    if agent is None:
        raise NotFound(f"no agent {p.id!r}")
    if agent.get("cargo"):
        raise Conflict(f"agent {p.id!r} carries packages {agent['cargo']}; "
                       f"it can be removed once they are delivered")
    sim.slice.delete(AGENT + p.id)
    ctx.host.hook.agent_removed(ctx=ctx, agent_id=p.id)
    _announce(ctx, "simulation.agent_removed", {"id": p.id})
    return {"id": p.id}


def package_record(data: Any, path: str, tick_now: int, has_node: Callable[[str], bool],
                   full: bool = False) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise bad(path, "a package must be an object")
    allowed = {"id", "origin", "destination", "weight", "status", "created_tick",
               "deadline_tick", "carried_by", "delivered_tick"}
    extra = sorted(set(data) - allowed)
    if extra:
        raise bad(f"{path}.{extra[0]}", f"unknown package field {extra[0]!r}")
    for field in ("id", "origin", "destination"):
        if not isinstance(data.get(field), str) or not data[field]:
            raise bad(f"{path}.{field}", f"package {field} must be a non-empty string")
        bounded(data[field], f"{path}.{field}")
        if field != "id" and not has_node(data[field]):
            raise bad(f"{path}.{field}", f"package {data['id']!r} names missing node "
                                         f"{data[field]!r}")
    status = data.get("status", "waiting") if full else "waiting"
    if status not in STATUSES:
        raise bad(f"{path}.status", f"status must be one of {', '.join(STATUSES)}")
    record = {
        "id": data["id"], "origin": data["origin"], "destination": data["destination"],
        "weight": number(data, "weight", path, 1.0, positive=True, maximum=MAX_WEIGHT),
        "status": status,
        "created_tick": _int(data, "created_tick", path, tick_now) if full else tick_now,
        "deadline_tick": _int(data, "deadline_tick", path, None),
        "carried_by": data.get("carried_by") if full else None,
        "delivered_tick": _int(data, "delivered_tick", path, None) if full else None,
    }
    carried = record["carried_by"]
    if carried is not None and not isinstance(carried, str):
        raise bad(f"{path}.carried_by", "carried_by must be an agent id or null")
    bounded(carried, f"{path}.carried_by")
    if (status == "in_transit") != (carried is not None):
        raise bad(f"{path}.carried_by", "a package is carried exactly when it is in_transit")
    if status == "delivered" and record["delivered_tick"] is None:
        record["delivered_tick"] = record["created_tick"]
    return record


MAX_WEIGHT = 1e6


def _int(data: dict[str, Any], field: str, path: str, default: int | None) -> int | None:
    value = data.get(field, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 2**53:
        raise bad(f"{path}.{field}", f"{field} must be a whole number from 0 to 2**53")
    return value


def add_package(ctx: Context, data: dict[str, Any]) -> dict[str, Any]:
    sim = _sim(ctx)
    if "status" in data or "carried_by" in data:
        raise bad("params.status", "a new package is always waiting at its origin")
    record = package_record(data, "params", sim.meta["tick"], lambda n: sim.node(n) is not None)
    if PACKAGE + record["id"] in sim.slice:
        raise bad("params.id", f"duplicate package id {record['id']!r}")
    packages = len(sim.slice.data()) - len(sim.agent_keys()) - 1  # less the meta record
    if packages >= sim.settings.max_packages:
        raise Conflict(f"the simulation is full: max_packages is {sim.settings.max_packages}",
                       details={"budget": "max_packages", "limit": sim.settings.max_packages})
    sim.put_package(record)
    sim.keep_index()
    _announce(ctx, "simulation.package_added", {"package": record})
    return {"package": record}


def cancel_package(ctx: Context, p: IdParams) -> dict[str, Any]:
    sim = _sim(ctx)
    package = sim.package(p.id)
    if package is None:
        raise NotFound(f"no package {p.id!r}")
    if package["status"] != "waiting":
        raise Conflict(f"package {p.id!r} is {package['status']}; only a waiting package "
                       f"can be cancelled")
    sim.waiting()
    sim.slice.delete(PACKAGE + p.id)
    sim.drop_waiting(p.id)
    sim.keep_index()
    _announce(ctx, "simulation.package_cancelled", {"id": p.id})
    return {"id": p.id}


def export_state(ctx: Context, p: None) -> dict[str, Any]:
    sim = _sim(ctx)
    agents, packages = [], []
    for key in sorted(sim.slice.keys()):
        record = sim.slice[key]
        if key.startswith(AGENT):
            kind = sim.kinds.get(record["kind"])
            agents.append(kind.to_plain(record) if kind else record)
        elif key.startswith(PACKAGE):
            packages.append(record)
    return {"state_data": {"graph": map_plugin.export_graph(sim.map.data()),
                           "agents": agents, "packages": packages, "metadata": sim.meta}}


def import_state(ctx: Context, p: StateParams) -> dict[str, Any]:
    sim = _sim(ctx)
    if sim.meta["running"]:
        raise Conflict("the simulation is running; stop it before importing a state")
    records, graph, skipped = build_state(sim, p.state_data, ctx.host.settings("map"))
    sim.map.replace_all(graph)
    sim.slice.replace_all(records)
    agents = sum(1 for k in records if k.startswith(AGENT))
    packages = sum(1 for k in records if k.startswith(PACKAGE))
    if skipped:
        log.warning("import skipped agents of kinds no plugin registered: %s", skipped)
    data = {"agents": agents, "packages": packages, "skipped_agents": skipped}
    _announce(ctx, "simulation.state_imported", data)
    return data


def build_state(sim: Sim, state: Any, map_settings: Any,
                path: str = "params.state_data") -> tuple[dict[str, Any], dict[str, Any], list[str]]:
    """Validate a whole state_data; the new simulation and map records, and skipped agents."""
    for part in ("graph", "agents", "packages", "metadata"):
        if part not in state:
            raise bad(f"{path}.{part}", f"state_data is missing its {part!r} part")
    extra = sorted(set(state) - {"graph", "agents", "packages", "metadata"})
    if extra:
        raise bad(f"{path}.{extra[0]}", f"unknown state_data part {extra[0]!r}")
    graph = map_plugin.build_graph(state["graph"], map_settings or map_plugin.Settings(),
                                   f"{path}.graph")
    has_node = lambda n: map_plugin.NODE + n in graph  # noqa: E731
    if not isinstance(state["metadata"], dict):
        raise bad(f"{path}.metadata", "metadata must be an object")
    try:
        meta = msgspec.to_builtins(msgspec.convert(state["metadata"], Metadata))
    except msgspec.ValidationError as exc:
        raise map_plugin.invalid(exc, f"{path}.metadata") from None
    meta["running"] = False
    records: dict[str, Any] = {"meta": meta}
    skipped: list[str] = []
    for name, budget in (("agents", "max_agents"), ("packages", "max_packages")):
        if not isinstance(state[name], list):
            raise bad(f"{path}.{name}", f"{name} must be a list")
        limit = getattr(sim.settings, budget)
        if len(state[name]) > limit:
            raise bad(f"{path}.{name}", f"{len(state[name])} {name} is more than {budget}, "
                                        f"{limit}")
    for i, data in enumerate(state["agents"]):
        where = f"{path}.agents[{i}]"
        if isinstance(data, dict) and isinstance(data.get("kind"), str) \
                and data["kind"] not in sim.kinds:
            skipped.append(str(data.get("id")))
            continue
        record = _agent_record(sim, data, where, has_node)
        if AGENT + record["id"] in records:
            raise bad(f"{where}.id", f"duplicate agent id {record['id']!r}")
        records[AGENT + record["id"]] = record
    for i, data in enumerate(state["packages"]):
        where = f"{path}.packages[{i}]"
        record = package_record(data, where, meta["tick"], has_node, full=True)
        if PACKAGE + record["id"] in records:
            raise bad(f"{where}.id", f"duplicate package id {record['id']!r}")
        carrier = record["carried_by"]
        if carrier is not None:
            agent = records.get(AGENT + carrier)
            if agent is None:
                why = "was skipped (unknown kind)" if carrier in skipped else "does not exist"
                raise bad(f"{where}.carried_by", f"package {record['id']!r} is carried by agent "
                                                 f"{carrier!r}, which {why}")
            if record["id"] not in agent.get("cargo", []):
                raise bad(f"{where}.carried_by", f"agent {carrier!r} does not list package "
                                                 f"{record['id']!r} in its cargo")
        records[PACKAGE + record["id"]] = record
    for key, agent in records.items():
        if key.startswith(AGENT):
            for package_id in agent.get("cargo", []):
                package = records.get(PACKAGE + package_id)
                if package is None or package["carried_by"] != agent["id"]:
                    raise bad(f"{path}.agents", f"agent {agent['id']!r} lists package "
                                                f"{package_id!r} in its cargo, but that package "
                                                f"is not in transit with it")
            for edge_id in ([agent["edge"]] if agent.get("edge") else []) + agent.get("route", []):
                if map_plugin.EDGE + edge_id not in graph:
                    raise bad(f"{path}.agents", f"agent {agent['id']!r} routes over missing "
                                                f"edge {edge_id!r}")
    return records, graph, skipped


# --- the tick loop -------------------------------------------------------------------

async def tick_loop(host: HostAPI) -> None:
    """Submit one ``simulation.tick`` per period while the world says it runs.

    If the host falls behind it does not queue ticks up: it skips to the present
    and reports the ticks it dropped in the next tick.
    """
    next_at: float | None = None
    refused = ""
    while True:
        meta = host.read("simulation").get("meta") or default_meta()
        if not meta["running"]:
            next_at = None
            await host.wait_changed({"simulation"})  # a start, an import
            continue
        period = 1.0 / meta["tick_hz"]
        now = trio.current_time()
        if next_at is None:
            next_at = now + period
        if now < next_at:
            await host.wait_changed({"simulation"}, deadline=next_at)  # or a stop, a new rate
            continue
        dropped = int((now - next_at) // period)
        next_at += (dropped + 1) * period
        try:
            await host.submit("simulation.tick", {"dropped": dropped})
        except ActionError as exc:  # stopped in between: the loop sees it on the next turn
            non_finite = isinstance(exc.details, dict) and exc.details.get("reason") == "non_finite"
            if non_finite and exc.message != refused:
                log.warning("%s", exc.message)  # once, not at every period
            refused = exc.message


# --- hooks -----------------------------------------------------------------------------

@hookimpl
def add_hookspecs(pluginmanager: pluggy.PluginManager) -> None:
    pluginmanager.add_hookspecs(hookspecs)


@hookimpl
def register_actions() -> list[Action]:
    return [
        Action("simulation.start", start, StartParams, Role.player, reply="simulation.started"),
        Action("simulation.stop", stop, None, Role.player, reply="simulation.stopped"),
        Action("simulation.step", step, StepParams, Role.player, reply="simulation.stepped"),
        Action("simulation.tick", tick, TickParams, Role.admin, internal=True,
               reply="simulation.ticked"),
        Action("simulation.set", set_, SetParams, Role.player, reply="simulation.updated"),
        Action("simulation.add_agent", add_agent, dict[str, Any], Role.player,
               reply="simulation.agent_added"),
        Action("simulation.remove_agent", remove_agent, IdParams, Role.player,
               reply="simulation.agent_removed"),
        Action("simulation.add_package", add_package, dict[str, Any], Role.player,
               reply="simulation.package_added"),
        Action("simulation.cancel_package", cancel_package, IdParams, Role.player,
               reply="simulation.package_cancelled"),
        Action("simulation.export_state", export_state, None, Role.viewer, changes_world=False,
               reply="simulation.state_exported"),
        Action("simulation.import_state", import_state, StateParams, Role.admin,
               reply="simulation.state_imported"),
    ]


@hookimpl
def register_topics() -> list[Topic]:
    return [
        Topic(TICKS, description="simulation.delta of every change of the simulation",
              max_rate=MAX_RATE),
        Topic(AGENT_TOPIC, parse=_agent_id, description="simulation.delta of one agent",
              max_rate=MAX_RATE),
        Topic(VIEW_TOPIC, parse=parse_view, max_rate=MAX_RATE,
              description="simulation.delta of the agents inside a rectangle x0,y0,x1,y1"),
    ]


@hookimpl
def register_slices() -> list[SliceSpec]:
    return [SliceSpec("simulation", lambda: {"meta": default_meta()}, version=1, keyed=True)]


@hookimpl
def map_change_blocked(ctx: Context, nodes: list[str], edges: list[str],
                       replace: bool) -> str | None:
    """The map may not lose a node an agent stands on or a package starts or ends
    at, nor an edge an agent drives on; nor be replaced while the simulation runs."""
    sim = ctx.world.slices.get("simulation")
    if sim is None:
        return None
    if replace:
        if (sim.get("meta") or {}).get("running"):
            return "the simulation is running; stop it before importing a map"
        gone = set(nodes)
        for key, rec in sim.items():
            for field in ("node", "origin", "destination"):
                ref = rec.get(field) if isinstance(rec, dict) else None
                if ref is not None and ref in gone:
                    return (f"{key} refers to node {ref!r}, which the new map lacks; "
                            f"remove it or import a full state instead")
        return None
    for node_id in nodes:
        for key, rec in sim.items():
            if key.startswith(AGENT) and rec.get("node") == node_id:
                return f"cannot remove node {node_id!r}: agent {rec['id']!r} stands on it"
            if key.startswith(PACKAGE) and node_id in (rec.get("origin"), rec.get("destination")):
                return (f"cannot remove node {node_id!r}: package {rec['id']!r} starts or "
                        f"ends there")
    for edge_id in edges:
        for key, rec in sim.items():
            if key.startswith(AGENT) and rec.get("edge") == edge_id:
                return f"cannot remove edge {edge_id!r}: agent {rec['id']!r} is driving on it"
    return None


@hookimpl(tryfirst=True)  # before the map's: this import takes the map with it
def world_import(slices: dict[str, Any]) -> ImportStep | None:
    if "simulation" not in slices or "map" not in slices:
        return None
    records = slices["simulation"]["data"]
    state = {"graph": map_plugin.export_graph(slices["map"]["data"]),
             "agents": [r for k, r in sorted(records.items()) if k.startswith(AGENT)],
             "packages": [r for k, r in sorted(records.items()) if k.startswith(PACKAGE)],
             "metadata": records.get("meta", {})}
    return ImportStep("simulation.import_state", {"state_data": state}, ("map", "simulation"))


@hookimpl
def register_agent_kinds() -> list[AgentKind]:
    from plugins.trucks import TRUCK
    return [TRUCK]


@hookimpl
def startup(host: HostAPI) -> None:
    _runtime(host)


@hookimpl
def background_tasks(host: HostAPI) -> list[Callable[[], Any]]:
    return [lambda: tick_loop(host)]


@hookimpl
def server_info(host: HostAPI) -> dict[str, Any]:
    records = host.read("simulation")
    meta = records.get("meta") or default_meta()
    agents = sum(1 for k in records if k.startswith(AGENT))  # called rarely: see hookspecs
    return {"simulation": {"running": meta["running"], "tick": meta["tick"],
                           "tick_hz": meta["tick_hz"], "current_day": meta["current_day"],
                           "agents": agents, "packages": len(records) - agents - 1}}


@hookimpl
def world_running(host: HostAPI) -> str | None:
    meta = host.read("simulation").get("meta") or default_meta()
    return "simulation" if meta["running"] else None


@hookimpl
def action_applied(host: HostAPI, applied: AppliedAction) -> None:
    rt = _runtime(host)
    pending, rt.pending_index = rt.pending_index, None
    if "simulation" in applied.slices:
        rt.index = pending
    if "map" in applied.slices:
        rt.router.map_changed(applied.name, applied.reply)
