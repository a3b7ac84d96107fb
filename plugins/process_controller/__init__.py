"""Processes: groups of agents taken through the stages of a template (slice ``process``).

Each process counts turns, collects artifacts and advances by its stages'
rules. Stage time limits are kept as active time (``stage_elapsed_s``): a
background task submits ``process.clock`` every second while a timed stage
runs, so elapsed time is journaled, time spent paused does not count, and after
a restart or crash a stage has the time it had left, not a fresh limit.
"""

from __future__ import annotations

import datetime as dt
import math
import operator
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated, Any

import msgspec
import pluggy
import trio

from host.actions import (MAX_ID_LENGTH, Action, ActionError, Conflict, Context, Id, Invalid,
                          NotFound, Role, encoded_size, resized)
from host.api import HostAPI
from host.plugins import PluginError, hookimpl
from host.topics import Topic
from plugins.process_controller import hookspecs
from state.codec import encode_json
from state.slices import SliceSpec

ADVANCE = ("manual", "when_all_agents_done", "after_turns")
ACTIVE = ("running", "paused")
CLOCK_PERIOD_S = 1.0


MAX_PROBLEM_STATEMENT = 16_384  # characters


class Settings(msgspec.Struct, forbid_unknown_fields=True):
    max_artifact_bytes: int = 64 * 1024
    max_agents: int = 100
    max_processes: int = 1_000  # records kept, finished ones too
    max_process_bytes: int = 1024 * 1024  # one process's record: artifacts and history


STANDARD_BRAINSTORM = {
    "id": "STANDARD_BRAINSTORM",
    "name": "Standard brainstorm",
    "stages": [
        {"id": "diverge", "name": "Diverge: every agent proposes ideas",
         "max_turns_per_agent": 3, "max_duration_s": 600, "advance": "when_all_agents_done"},
        {"id": "cluster", "name": "Cluster: group the ideas", "agent_count": 1,
         "max_turns": 1, "max_duration_s": 300, "advance": "after_turns"},
        {"id": "converge", "name": "Converge: every agent picks a favourite",
         "max_turns_per_agent": 1, "max_duration_s": 300, "advance": "when_all_agents_done"},
        {"id": "summarize", "name": "Summarize", "roles": ["summarizer"],
         "max_turns": 1, "advance": "after_turns"},
    ],
}

QUICK_POLL = {
    "id": "QUICK_POLL",
    "name": "Quick poll",
    "stages": [
        {"id": "vote", "name": "Every agent votes once", "max_turns_per_agent": 1,
         "max_duration_s": 60, "advance": "when_all_agents_done"},
    ],
}


def validate_template(template: Any, plugin: str) -> dict[str, Any]:
    """Check a template from a plugin; raises PluginError naming the plugin."""
    def fail(why: str) -> PluginError:
        tid = template.get("id") if isinstance(template, dict) else None
        return PluginError(f"plugin {plugin!r}: process template {tid!r}: {why}")

    if not isinstance(template, dict) or not isinstance(template.get("id"), str) \
            or not template["id"]:
        raise fail("needs a string id")
    if not isinstance(template.get("name"), str):
        raise fail("needs a string name")
    stages = template.get("stages")
    if not isinstance(stages, list) or not stages:
        raise fail("needs at least one stage")
    seen: set[str] = set()
    for i, stage in enumerate(stages):
        if not isinstance(stage, dict) or not isinstance(stage.get("id"), str):
            raise fail(f"stage {i} needs a string id")
        if stage["id"] in seen:
            raise fail(f"stage id {stage['id']!r} is used twice")
        seen.add(stage["id"])
        advance = stage.get("advance", "manual")
        if advance not in ADVANCE:
            raise fail(f"stage {stage['id']!r}: advance must be one of {', '.join(ADVANCE)}")
        for limit in ("max_turns_per_agent", "max_turns", "agent_count"):
            value = stage.get(limit)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or value <= 0):
                raise fail(f"stage {stage['id']!r}: {limit} must be a positive whole number")
        duration = stage.get("max_duration_s")
        if duration is not None and (isinstance(duration, bool)
                                     or not isinstance(duration, (int, float))
                                     or not math.isfinite(duration) or duration <= 0):
            raise fail(f"stage {stage['id']!r}: max_duration_s must be a positive number")
        roles = stage.get("roles")
        if roles is not None and (not isinstance(roles, list) or not roles
                                  or not all(isinstance(r, str) for r in roles)):
            raise fail(f"stage {stage['id']!r}: roles must be a non-empty list of names")
        if advance == "after_turns" and stage.get("max_turns") is None:
            raise fail(f"stage {stage['id']!r}: advance after_turns needs max_turns")
        if advance == "when_all_agents_done" and stage.get("max_turns_per_agent") is None:
            raise fail(f"stage {stage['id']!r}: advance when_all_agents_done needs "
                       f"max_turns_per_agent")
    return template


@dataclass
class ControllerRuntime:
    """What the controller keeps for a world while it is loaded; never saved."""

    templates: dict[str, dict[str, Any]]  # every plugin's, by id, validated
    # a record's encoded size, by process id, kept with the record it measured
    sizes: dict[str, tuple[dict[str, Any], int]] = field(default_factory=dict)
    # the summaries server_info last made: (templates, ids, records, summaries)
    summaries: tuple[Any, list[str], list[Any], list[dict[str, Any]]] | None = None


def _runtime(host: HostAPI) -> ControllerRuntime:
    rt = host.runtime("process_controller")
    found: ControllerRuntime | None = rt.get("state")
    if found is None:
        templates: dict[str, dict[str, Any]] = {}
        owners: dict[str, str] = {}
        for plugin, registered in host.collect("register_process_templates"):
            for template in registered:
                validate_template(template, plugin)
                if template["id"] in templates:
                    raise PluginError(f"process template {template['id']!r} is registered by "
                                      f"both plugin {owners[template['id']]!r} and {plugin!r}")
                templates[template["id"]] = template
                owners[template["id"]] = plugin
        found = rt["state"] = ControllerRuntime(templates)
    return found


def _templates(host: HostAPI) -> dict[str, dict[str, Any]]:
    return _runtime(host).templates


def iso(at: float) -> str:
    return dt.datetime.fromtimestamp(at, dt.timezone.utc).isoformat()


# --- process records ------------------------------------------------------------------

def stage_agents(process: dict[str, Any], stage: dict[str, Any]) -> list[dict[str, Any]]:
    """The agents a stage expects, with their role when the stage names roles."""
    agents = process["agents"]
    if stage.get("roles"):
        return [{"agent_id": a, "role": r} for a, r in zip(agents, stage["roles"])]
    if stage.get("agent_count"):
        return [{"agent_id": a} for a in agents[:stage["agent_count"]]]
    return [{"agent_id": a} for a in agents]


def _stage(ctx: Context, process: dict[str, Any]) -> dict[str, Any]:
    template = _templates(ctx.host)[process["template_id"]]
    return template["stages"][process["current_stage_index"]]


def _get(ctx: Context, process_id: str) -> dict[str, Any]:
    process = ctx.keyed("process").get(process_id)
    if process is None:
        raise NotFound(f"no process {process_id!r}")
    return process


def _history(process: dict[str, Any], at: float, event: str, **extra: Any) -> None:
    process["history"] = [*process["history"], {"at": iso(at), "event": event,
                                                 "status": process["status"],
                                                 "stage_index": process["current_stage_index"],
                                                 **extra}]


def _tick_clock(process: dict[str, Any], now: float) -> None:
    if process["status"] == "running" and process["stage_clock_at"] is not None:
        process["stage_elapsed_s"] += max(0.0, now - process["stage_clock_at"])
        process["stage_clock_at"] = now


def status_of(process: dict[str, Any]) -> dict[str, Any]:
    fields = ("process_id", "template_id", "status", "current_stage_index", "stage_turn_counts",
              "agent_turn_counts", "collected_artifacts", "problem_statement", "stage_started_at",
              "agents", "stage_elapsed_s", "history")
    return {f: process[f] for f in fields}


def summary_of(process: dict[str, Any], template: dict[str, Any] | None) -> dict[str, Any]:
    stages = template["stages"] if template else []
    index = process["current_stage_index"]
    return {"process_id": process["process_id"], "template_id": process["template_id"],
            "status": process["status"], "current_stage_index": index,
            "stage_id": stages[index]["id"] if index < len(stages) else None,
            "agents": process["agents"]}


def _advance(ctx: Context, process: dict[str, Any], reason: str) -> dict[str, Any]:
    """Move to the next stage, or complete; emits the signals. Returns the event data."""
    template = _templates(ctx.host)[process["template_id"]]
    stages = template["stages"]
    old = stages[process["current_stage_index"]]
    _tick_clock(process, ctx.now)
    if process["current_stage_index"] + 1 >= len(stages):
        process["status"] = "completed"
        process["stage_clock_at"] = None
        _history(process, ctx.now, "completed", reason=reason)
        # the shape of a stage_advanced (process.advance answers with it), to no stage
        data = {"process_id": process["process_id"], "from": old["id"], "to": None,
                "stage_index": process["current_stage_index"], "reason": reason, "agents": [],
                "collected_artifacts": process["collected_artifacts"]}
        _emit(ctx, "process.completed", process, data)
        _agents_gone(ctx, process)
        return data
    process["current_stage_index"] += 1
    new = stages[process["current_stage_index"]]
    process["stage_started_at"] = iso(ctx.now)
    process["stage_elapsed_s"] = 0.0
    process["stage_clock_at"] = ctx.now if process["status"] == "running" else None
    _history(process, ctx.now, "stage_advanced", reason=reason, stage=new["id"])
    data = {"process_id": process["process_id"], "from": old["id"], "to": new["id"],
            "stage_index": process["current_stage_index"], "reason": reason,
            "agents": stage_agents(process, new)}
    _emit(ctx, "process.stage_advanced", process, data)
    return data


def _emit(ctx: Context, signal: str, process: dict[str, Any], data: dict[str, Any],
          others: bool = False) -> None:
    """A process's signal goes to its topic, ``process:<id>``, and to its participants
    (the session that last took a turn for each of its agents: its ``seats``),
    whether or not they subscribed."""
    ctx.broadcast(signal, data, others=others, topic=f"process:{process['process_id']}",
                  participants=tuple(process["seats"].values()))


def _agents_gone(ctx: Context, process: dict[str, Any]) -> None:
    """Agents of an ended process that are in no other active process leave the world."""
    still = set()
    for pid, other in ctx.keyed("process").items():
        if pid != process["process_id"] and other["status"] in ACTIVE:
            still.update(other["agents"])
    for agent_id in process["agents"]:
        if agent_id not in still:
            ctx.host.hook.agent_removed(ctx=ctx, agent_id=agent_id)


def _done(process: dict[str, Any], stage: dict[str, Any]) -> bool:
    sid = stage["id"]
    if stage.get("advance") == "after_turns":
        return process["stage_turn_counts"].get(sid, 0) >= stage["max_turns"]
    if stage.get("advance") == "when_all_agents_done":
        per = stage["max_turns_per_agent"]
        return all(process["agent_turn_counts"].get(f"{sid}:{a['agent_id']}", 0) >= per
                   for a in stage_agents(process, stage))
    return False


# --- actions ------------------------------------------------------------------------------

class StartParams(msgspec.Struct, forbid_unknown_fields=True):
    template_id: Id
    problem_statement: Annotated[str, msgspec.Meta(max_length=MAX_PROBLEM_STATEMENT)]
    agents: list[Id]
    process_id: Id | None = None


class TurnParams(msgspec.Struct, forbid_unknown_fields=True):
    process_id: Id
    agent_id: Id
    artifact: Any = None


class ProcessParams(msgspec.Struct, forbid_unknown_fields=True):
    process_id: Id


class TimeoutParams(msgspec.Struct, forbid_unknown_fields=True):
    process_id: str
    stage_index: int


def templates(ctx: Context, p: None) -> dict[str, Any]:
    return {"templates": list(_templates(ctx.host).values())}


def start(ctx: Context, p: StartParams) -> dict[str, Any]:
    template = _templates(ctx.host).get(p.template_id)
    if template is None:
        raise NotFound(f"no process template {p.template_id!r}")
    if not p.agents or len(set(p.agents)) != len(p.agents) or not all(p.agents):
        raise Invalid("agents must be a non-empty list of distinct ids",
                      details={"path": "params.agents", "message": "empty or repeated ids"})
    if len(p.agents) > ctx.settings.max_agents:
        raise Invalid(f"at most {ctx.settings.max_agents} agents",
                      details={"path": "params.agents", "message": "too many agents"})
    process_id = p.process_id or f"p-{ctx.random.getrandbits(48):012x}"
    if process_id in ctx.keyed("process"):
        raise Invalid(f"duplicate process id {process_id!r}",
                      details={"path": "params.process_id", "message": "duplicate"})
    if len(ctx.keyed("process").data()) >= ctx.settings.max_processes:
        raise Conflict(f"the world holds its max_processes ({ctx.settings.max_processes}) "
                       f"processes", details={"budget": "max_processes",
                                              "limit": ctx.settings.max_processes})
    process = {
        "process_id": process_id, "template_id": template["id"],
        "problem_statement": p.problem_statement, "agents": list(p.agents),
        "status": "running", "current_stage_index": 0, "stage_turn_counts": {},
        "agent_turn_counts": {}, "collected_artifacts": {}, "stage_started_at": iso(ctx.now),
        "stage_elapsed_s": 0.0, "stage_clock_at": ctx.now, "history": [],
        "created_at": iso(ctx.now), "seats": {},
    }
    _history(process, ctx.now, "started")
    ctx.keyed("process").put(process_id, process)
    first = template["stages"][0]
    data = {**status_of(process), "stage_id": first["id"],
            "expected_agents": stage_agents(process, first)}
    _emit(ctx, "process.started", process, data, others=True)
    return data


def turn(ctx: Context, p: TurnParams) -> dict[str, Any]:
    process = _get(ctx, p.process_id)
    if process["status"] != "running":
        raise Conflict(f"process {p.process_id!r} is {process['status']}, not running")
    stage = _stage(ctx, process)
    expected = {a["agent_id"] for a in stage_agents(process, stage)}
    if p.agent_id not in process["agents"]:
        raise Conflict(f"agent {p.agent_id!r} is not in process {p.process_id!r}")
    if p.agent_id not in expected:
        raise Conflict(f"agent {p.agent_id!r} takes no turns in stage {stage['id']!r}")
    sid = stage["id"]
    agent_key = f"{sid}:{p.agent_id}"
    stage_turns = process["stage_turn_counts"].get(sid, 0)
    agent_turns = process["agent_turn_counts"].get(agent_key, 0)
    if stage.get("max_turns") is not None and stage_turns >= stage["max_turns"]:
        raise Conflict(f"stage {sid!r} has had its {stage['max_turns']} turns")
    per = stage.get("max_turns_per_agent")
    if per is not None and agent_turns >= per:
        raise Conflict(f"agent {p.agent_id!r} has used its {per} turns in stage {sid!r}")
    size = len(encode_json(p.artifact))
    if size > ctx.settings.max_artifact_bytes:
        raise Invalid(f"artifact is {size} bytes; the limit is {ctx.settings.max_artifact_bytes}",
                      details={"path": "params.artifact", "message": "too large"})
    # A new record sharing what the turn leaves alone (records are never changed in
    # place), not edit()'s deep copy: a turn then costs what it adds, not a copy of
    # every artifact collected so far.
    artifacts = process["collected_artifacts"]
    old, process = process, {**process,
               "stage_turn_counts": {**process["stage_turn_counts"], sid: stage_turns + 1},
               "agent_turn_counts": {**process["agent_turn_counts"], agent_key: agent_turns + 1},
               "collected_artifacts": {**artifacts, sid: [
                   *artifacts.get(sid, ()),
                   {"agent_id": p.agent_id, "artifact": p.artifact, "at": iso(ctx.now)}]}}
    _tick_clock(process, ctx.now)
    if ctx.session is not None and process["seats"].get(p.agent_id) != ctx.session.id:
        process["seats"] = {**process["seats"], p.agent_id: ctx.session.id}
    ctx.keyed("process").put(p.process_id, process)
    data = {"process_id": p.process_id, "agent_id": p.agent_id, "stage_id": sid,
            "turn": agent_turns + 1, "stage_turns": stage_turns + 1}
    _emit(ctx, "process.turn_taken", process, data, others=True)
    if _done(process, stage):
        data["advanced"] = _advance(ctx, process, "turns")
    _within_budget(ctx, process, old)
    return data


def _within_budget(ctx: Context, process: dict[str, Any],
                   old: dict[str, Any] | None = None) -> None:
    """Refuse (``conflict``, naming the budget) a change that makes a process's record
    larger than max_process_bytes; the action is rolled back. Given ``old``, the
    record it was made from, a size kept for that record is adjusted rather than
    measured again: a turn then costs what it adds, not the artifacts so far."""
    sizes = _runtime(ctx.host).sizes
    kept = sizes.get(process["process_id"])
    if old is not None and kept is not None and kept[0] is old:
        size = resized(old, kept[1], process)
    else:
        size = encoded_size(process)
    if kept is None and len(sizes) > 2 * len(ctx.keyed("process")) + 16:
        sizes.clear()  # of processes long gone
    sizes[process["process_id"]] = (process, size)  # (if it commits, the next one's old)
    if size > ctx.settings.max_process_bytes:
        raise Conflict(f"process {process['process_id']!r} would be {size} bytes; the budget "
                       f"max_process_bytes is {ctx.settings.max_process_bytes}",
                       details={"budget": "max_process_bytes",
                                "limit": ctx.settings.max_process_bytes})


def advance(ctx: Context, p: ProcessParams) -> dict[str, Any]:
    process = _get(ctx, p.process_id)
    if process["status"] != "running":
        raise Conflict(f"process {p.process_id!r} is {process['status']}; only a running "
                       f"process advances")
    return _advance(ctx, ctx.keyed("process").edit(p.process_id), "manual")


def _transition(ctx: Context, p: ProcessParams, allowed: tuple[str, ...], to: str,
                signal: str) -> dict[str, Any]:
    process = _get(ctx, p.process_id)
    if process["status"] not in allowed:
        raise Conflict(f"process {p.process_id!r} is {process['status']}; cannot go to {to}")
    process = ctx.keyed("process").edit(p.process_id)
    _tick_clock(process, ctx.now)
    process["status"] = to
    process["stage_clock_at"] = ctx.now if to == "running" else None
    _history(process, ctx.now, to)
    data = {"process_id": p.process_id, "status": to,
            "current_stage_index": process["current_stage_index"]}
    if to != "cancelled":  # a process can always be cancelled
        _within_budget(ctx, process)
    _emit(ctx, signal, process, data, others=True)
    if to == "cancelled":
        _agents_gone(ctx, process)
    return data


def pause(ctx: Context, p: ProcessParams) -> dict[str, Any]:
    return _transition(ctx, p, ("running",), "paused", "process.paused")


def resume(ctx: Context, p: ProcessParams) -> dict[str, Any]:
    return _transition(ctx, p, ("paused",), "running", "process.resumed")


def cancel(ctx: Context, p: ProcessParams) -> dict[str, Any]:
    return _transition(ctx, p, ("idle", "running", "paused"), "cancelled", "process.cancelled")


def status(ctx: Context, p: ProcessParams) -> dict[str, Any]:
    return status_of(_get(ctx, p.process_id))


def list_(ctx: Context, p: None) -> dict[str, Any]:
    known = _templates(ctx.host)
    return {"processes": [summary_of(proc, known.get(proc["template_id"]))
                          for _, proc in sorted(ctx.keyed("process").items())]}


def clock(ctx: Context, p: None) -> dict[str, Any]:
    """Internal: record active stage time; advance stages whose time ran out."""
    timed_out = []
    for pid, process in list(ctx.keyed("process").items()):
        if process["status"] != "running" or process["stage_clock_at"] is None:
            continue
        process = ctx.keyed("process").edit(pid)
        _tick_clock(process, ctx.now)
        limit = _stage(ctx, process).get("max_duration_s")
        if limit is not None and process["stage_elapsed_s"] >= limit - 1e-9:
            _advance(ctx, process, "timeout")
            timed_out.append(pid)
    return {"timed_out": timed_out}


def rebase(ctx: Context, p: None) -> dict[str, Any]:
    """Internal, at startup: running stages go on from the time they had left."""
    rebased = []
    for pid, process in list(ctx.keyed("process").items()):
        if process["status"] == "running":
            ctx.keyed("process").edit(pid)["stage_clock_at"] = ctx.now
            rebased.append(pid)
    return {"rebased": rebased}


def next_deadline(host: HostAPI) -> float | None:
    """Seconds until the next timed stage runs out (None when nothing is timed)."""
    known = _templates(host)
    best = None
    for process in host.read("process").values():
        if process["status"] != "running" or process["stage_clock_at"] is None:
            continue
        template = known.get(process["template_id"])
        if template is None:
            continue
        limit = template["stages"][process["current_stage_index"]].get("max_duration_s")
        if limit is None:
            continue
        left = limit - process["stage_elapsed_s"] - (host.now() - process["stage_clock_at"])
        best = left if best is None else min(best, left)
    return best


async def stage_timer(host: HostAPI) -> None:
    """While a timed stage runs, submit ``process.clock`` every second and at deadlines."""
    while True:
        left = next_deadline(host)
        if left is None:
            await host.wait_changed({"process"})  # a timed stage starts
            continue
        if await host.wait_changed({"process"},
                                   deadline=trio.current_time() + min(CLOCK_PERIOD_S, left)):
            continue  # a turn, a pause, an advance: the deadline may have moved
        try:
            await host.submit("process.clock")
        except ActionError:
            pass


@hookimpl
def add_hookspecs(pluginmanager: pluggy.PluginManager) -> None:
    pluginmanager.add_hookspecs(hookspecs)


@hookimpl
def register_actions() -> list[Action]:
    return [
        Action("process.templates", templates, None, Role.viewer, changes_world=False,
               reply="process.templates"),
        Action("process.start", start, StartParams, Role.player, reply="process.started"),
        Action("process.turn", turn, TurnParams, Role.player, reply="process.turn_taken"),
        Action("process.advance", advance, ProcessParams, Role.player,
               reply="process.stage_advanced"),
        Action("process.pause", pause, ProcessParams, Role.player, reply="process.paused"),
        Action("process.resume", resume, ProcessParams, Role.player, reply="process.resumed"),
        Action("process.cancel", cancel, ProcessParams, Role.player, reply="process.cancelled"),
        Action("process.status", status, ProcessParams, Role.viewer, changes_world=False,
               reply="process.status"),
        Action("process.list", list_, None, Role.viewer, changes_world=False,
               reply="process.list"),
        Action("process.clock", clock, None, Role.admin, internal=True, reply="process.clock"),
        Action("process.rebase", rebase, None, Role.admin, internal=True, reply="process.rebase"),
    ]


def _migrate(version: int, records: dict[str, Any]) -> dict[str, Any]:
    return records  # version 1 is the first; later shapes add a step here


@hookimpl
def register_topics() -> list[Topic]:
    return [Topic("process", parse=_process_id,
                  description="process:<id>: every process.* signal of one process")]


def _process_id(arg: str) -> str:
    if len(arg) > MAX_ID_LENGTH:
        raise ValueError(f"a process id is at most {MAX_ID_LENGTH} characters")
    return arg


@hookimpl
def register_slices() -> list[SliceSpec]:
    return [SliceSpec("process", dict, version=1, keyed=True, migrate=_migrate, defaults={
        "problem_statement": "", "agents": [], "status": "idle", "current_stage_index": 0,
        "stage_turn_counts": {}, "agent_turn_counts": {}, "collected_artifacts": {},
        "stage_started_at": None, "stage_elapsed_s": 0.0, "stage_clock_at": None,
        "history": [], "created_at": None, "seats": {}})]


@hookimpl
def register_process_templates() -> list[dict[str, Any]]:
    return [STANDARD_BRAINSTORM, QUICK_POLL]


@hookimpl
async def startup(host: HostAPI) -> None:
    _templates(host)
    for process in host.read("process").values():
        if process["template_id"] not in _templates(host) and process["status"] in ACTIVE:
            raise PluginError(f"process {process['process_id']!r} uses template "
                              f"{process['template_id']!r}, which no plugin registers")
    await host.submit("process.rebase")
    for process in host.read("process").values():
        if process["status"] in ACTIVE:
            host.hook.process_resumed(host=host, process=process)


@hookimpl
async def shutdown(host: HostAPI) -> None:
    """A clean stop journals the active time of running stages up to this moment,
    so after the restart they have exactly the time they had left (the clock's
    once-a-second record alone would give back up to a second)."""
    if any(p.get("status") == "running" and p.get("stage_clock_at") is not None
           for p in host.read("process").values()):
        try:
            await host.submit("process.clock")
        except ActionError as exc:  # the stop goes on: the clock's last record stands
            host.log.warning("could not record the stages' time at shutdown: %s", exc)


@hookimpl
def background_tasks(host: HostAPI) -> list[Callable[[], Any]]:
    return [lambda: stage_timer(host)]


@hookimpl
def world_running(host: HostAPI) -> str | None:
    active = any(p["status"] in ACTIVE for p in host.read("process").values())
    return "processes" if active else None


@hookimpl
def server_info(host: HostAPI) -> dict[str, Any]:
    """The phase and a summary of each process. The host asks after every action
    that changed a process (to re-send ``sync_state`` when the summary changed), so
    the summaries are kept, and only those of records that are new objects since
    (records are never changed in place) are made again: a turn in one of 100
    processes costs one summary and an identity check of the rest."""
    known = _templates(host)
    records = host.read("process")
    keys, values = list(records), list(records.values())
    rt = _runtime(host)
    kept = rt.summaries
    if kept is None or kept[0] is not known or kept[1] != keys:
        summaries = [summary_of(p, known.get(p["template_id"])) for p in values]
    else:
        summaries = list(kept[3])
        same = list(map(operator.is_, values, kept[2]))
        i = -1
        while (i := _next_false(same, i + 1)) >= 0:
            summaries[i] = summary_of(values[i], known.get(values[i]["template_id"]))
    rt.summaries = (known, keys, values, summaries)
    active = any(s["status"] in ACTIVE for s in summaries)
    return {"phase": "playing" if active else "onboarding", "processes": summaries}


def _next_false(flags: list[bool], start: int) -> int:
    try:
        return flags.index(False, start)
    except ValueError:
        return -1
