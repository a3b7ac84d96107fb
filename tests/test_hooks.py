"""Plugins: every hook is documented, and each one is exercised by a real plugin."""

from __future__ import annotations

import inspect
import re
from pathlib import Path
from typing import Any

import pytest
import trio

from host import ImportStep, hookspec, hookspecs
from host.actions import Action, ActionError, Conflict, Context, Invalid, Role
from host.client import CallError
from host.offline import apply_document, world_document
from host.plugins import hookimpl
from host.server import Host, StartupError
from host import config as config_mod
from plugins.map import hookspecs as map_hookspecs
from plugins.process_controller import hookspecs as process_hookspecs
from plugins.simulation import hookspecs as simulation_hookspecs
from state.slices import SliceSpec
from worlds import grid_map

DOCS = Path(__file__).parents[1] / "docs" / "plugins.md"
# the host's hooks, and those the built-in plugins add (``add_hookspecs``)
SPECS = [(name, fn) for module in (hookspecs, map_hookspecs, simulation_hookspecs,
                                    process_hookspecs)
         for name, fn in inspect.getmembers(module, inspect.isfunction)
         if hasattr(fn, "worldhost_spec") and fn.__module__ == module.__name__]
HOOKS = [name for name, _ in SPECS]


def test_there_are_hooks() -> None:
    assert {"register_actions", "register_slices", "startup", "shutdown", "background_tasks",
            "session_opened", "session_closed", "action_applied", "add_hookspecs",
            "register_agent_kinds", "register_process_templates", "process_resumed",
            "map_change_blocked"} <= set(HOOKS)


@pytest.mark.parametrize("hook, spec", SPECS, ids=HOOKS)
def test_every_hook_is_documented_with_signature_and_example(hook: str, spec: Any) -> None:
    text = DOCS.read_text()
    heading = re.search(rf"^### `{hook}\((.*?)\)", text, re.M)
    assert heading, f"docs/plugins.md has no heading for {hook}"
    params = list(inspect.signature(spec).parameters)
    for name in params:
        assert name in heading.group(1), f"{hook}: parameter {name} missing from the docs"
    section = text[heading.end():].split("\n### ", 1)[0]
    assert "```python" in section and f"def {hook}(" in section, f"{hook}: no example"
    assert spec.__doc__, f"{hook} has no docstring"


@pytest.mark.parametrize("hook, spec", SPECS, ids=HOOKS)
def test_every_hookspec_is_typed_and_says_what_each_parameter_is(hook: str, spec: Any) -> None:
    """As pytest's hookspecs: annotations on every parameter and the return, and a
    ``:param name:`` line in the docstring for each parameter."""
    signature = inspect.signature(spec)
    assert signature.return_annotation is not inspect.Signature.empty, f"{hook}: no return type"
    for name, param in signature.parameters.items():
        assert param.annotation is not inspect.Parameter.empty, f"{hook}: {name} is not typed"
        assert f":param {name}:" in spec.__doc__, f"{hook}: no ':param {name}:' in its docstring"


class DroneSpecs:
    """What a third-party plugin offers other plugins: one hook of its own."""

    @staticmethod
    @hookspec
    def register_drone_routes() -> list[dict[str, Any]]:
        """Return routes for drones.

        :return: the routes.
        """


class Drones:
    """Adds ``register_drone_routes`` and serves what the other plugins answer."""

    __name__ = "drones"

    @hookimpl
    def add_hookspecs(self, pluginmanager: Any) -> None:
        pluginmanager.add_hookspecs(DroneSpecs)

    @hookimpl
    def register_actions(self) -> list[Action]:
        def routes(ctx: Context, p: Any) -> dict[str, Any]:
            found = ctx.host.collect("register_drone_routes")
            return {"routes": sorted(r["id"] for _, answer in found for r in answer)}
        return [Action("drones.routes", routes, None, Role.viewer, changes_world=False)]


class EarlyRoutes:
    __name__ = "early_routes"

    @hookimpl
    def register_drone_routes(self) -> list[dict[str, Any]]:
        return [{"id": "early"}]


class LateRoutes:
    __name__ = "late_routes"

    @hookimpl
    def register_drone_routes(self) -> list[dict[str, Any]]:
        return [{"id": "late"}]


async def test_a_plugin_adds_a_hook_that_plugins_before_and_after_it_implement(
        worldhost: Any) -> None:
    h = await worldhost.start(EarlyRoutes(), Drones(), LateRoutes())
    async with h.client("ada") as ada:
        assert (await ada.call("drones.routes"))["routes"] == ["early", "late"]


class WrongRoutes:
    __name__ = "wrong_routes"

    @hookimpl
    def register_drone_routes(self, speed: int) -> list[dict[str, Any]]:
        return []


@pytest.mark.parametrize("plugins", [[WrongRoutes(), Drones()], [Drones(), WrongRoutes()]],
                         ids=["implemented before the spec", "after it"])
def test_an_implementation_that_does_not_match_a_plugins_hook_stops_startup(
        plugins: list[Any]) -> None:
    with pytest.raises(StartupError) as err:
        Host(config_mod.Config(), plugins, entry_points=False, db=":memory:")
    assert "wrong_routes" in str(err.value) and "speed" in str(err.value)


@pytest.mark.parametrize("loaded", [True, False])
def test_a_plugins_hook_is_there_only_where_the_plugin_is_loaded(loaded: bool) -> None:
    """The simulation offers ``register_agent_kinds``; without it a plugin that
    implements the hook still loads, and nothing calls it."""
    cfg = config_mod.from_dict({"plugins": {"simulation": {"enabled": loaded}}})
    host = Host(cfg, [Recorder()], entry_points=False, db=":memory:")
    assert ("simulation" in host.registry.plugin_names) is loaded
    spec = host.registry.pm.hook.register_agent_kinds.spec
    assert (spec is not None and spec.namespace is simulation_hookspecs) is loaded


class Recorder:
    """A plugin that implements every hook and records what the host did."""

    __name__ = "recorder"

    def __init__(self, fail_once: bool = False) -> None:
        self.calls: list[tuple[str, Any]] = []
        self.ticks = 0
        self.fail_once = fail_once
        self.full = False
        self.busy: set[str] = set()  # worlds this plugin says keep running

    @hookimpl
    def register_actions(self) -> list[Action]:
        def touch(ctx: Context, p: Any) -> dict[str, Any]:
            ctx.value("recorder").set({"touched": ctx.value("recorder").value["touched"] + 1})
            return {"ok": True}
        return [Action("recorder.touch", touch, None, Role.player)]

    @hookimpl
    def register_slices(self) -> list[SliceSpec]:
        return [SliceSpec("recorder", lambda: {"touched": 0})]

    @hookimpl
    async def startup(self, host: Any) -> None:
        await trio.sleep(0)
        self.calls.append(("startup", host.world_id))

    @hookimpl
    async def shutdown(self, host: Any) -> None:
        self.calls.append(("shutdown", host.read("recorder")["touched"]))

    @hookimpl
    def background_tasks(self, host: Any) -> list[Any]:
        async def task() -> None:
            self.ticks += 1
            if self.ticks == 1 and self.fail_once:
                raise RuntimeError("first run fails; the host restarts it")
            await host.submit("recorder.touch")
            await trio.sleep_forever()
        return [task]

    @hookimpl
    def session_opened(self, host: Any, session: Any) -> None:
        self.calls.append(("opened", session.name, session.resumed))

    @hookimpl
    def session_closed(self, host: Any, session: Any, reason: str) -> None:
        self.calls.append(("closed", session.name, reason))

    @hookimpl
    def action_applied(self, host: Any, applied: Any) -> None:
        self.calls.append(("applied", applied.name, applied.slices))

    @hookimpl
    def server_info(self, host: Any) -> dict[str, Any]:
        return {"recorder": "here"}

    @hookimpl
    def session_limit(self, host: Any) -> Any:
        return Conflict("server full") if self.full else None

    @hookimpl
    def register_agent_kinds(self) -> list[Any]:
        from plugins.simulation import AgentKind
        def from_plain(sim: Any, data: dict[str, Any], path: str) -> dict[str, Any]:
            return {"id": data["id"], "kind": "rock", "node": data["node"]}
        return [AgentKind("rock", from_plain, lambda sim, agent, dt: None)]

    @hookimpl
    def register_process_templates(self) -> list[dict[str, Any]]:
        return [{"id": "ONE", "name": "One turn", "stages": [
            {"id": "only", "name": "Only", "max_turns": 1, "advance": "after_turns"}]}]

    @hookimpl
    def agent_removed(self, ctx: Context, agent_id: str) -> None:
        self.calls.append(("agent_removed", agent_id))

    @hookimpl
    def process_resumed(self, host: Any, process: dict[str, Any]) -> None:
        self.calls.append(("process_resumed", process["process_id"]))

    @hookimpl
    def world_running(self, host: Any) -> str | None:
        return "recorder" if host.world_id in self.busy else None


async def test_each_hook_is_called(worldhost: Any, autojump_clock: Any) -> None:
    rec = Recorder(fail_once=True)
    h = await worldhost.start(rec)
    assert rec.calls[0][0] == "startup"
    await trio.sleep(2)  # the background task failed once, was restarted, and ran
    assert rec.ticks == 2 and ("applied", "recorder.touch", ("recorder",)) in rec.calls
    assert [f.plugin for f in h.task_failures()] == ["recorder"]  # expected: not a test failure
    async with h.client("ada") as ada:
        assert ("opened", "ada", False) in rec.calls
        assert ada.server_info["recorder"] == "here"
        await ada.call("map.add_node", id="n", x=0, y=0)
        await ada.call("simulation.add_agent", id="r1", kind="rock", node="n")
        await ada.call("simulation.remove_agent", id="r1")
        assert ("agent_removed", "r1") in rec.calls
        started = await ada.call("process.start", template_id="ONE", problem_statement="?",
                                 agents=["x"], process_id="p1")
        assert started["status"] == "running"
    await h.stop()
    assert ("shutdown", 1) in rec.calls
    await h.start()
    assert ("process_resumed", "p1") in rec.calls


async def test_world_running_keeps_a_world_loaded_and_brings_it_back(
        worldhost: Any, autojump_clock: Any) -> None:
    """A world whose plugin says it runs stays loaded with nobody in it, is listed
    with what runs, and is loaded again at startup without anyone joining; a world
    with nothing running unloads after idle_unload_s."""
    rec = Recorder()
    rec.busy.add("busy")
    h = await worldhost.start(rec, config={"host": {"admin_token": "adm"},
                                           "worlds": {"idle_unload_s": 10}})

    async def listed() -> dict[str, Any]:
        async with h.client("ada", token="adm") as ada:
            return {w["world_id"]: w for w in (await ada.call("world.list"))["worlds"]}

    async with h.client("ada", token="adm") as ada:
        for world_id in ("calm", "busy"):
            await ada.call("world.create", world_id=world_id)
            await ada.call("world.join", world_id=world_id)
        await ada.call("world.leave")
    await trio.sleep(60)
    worlds = await listed()
    assert worlds["busy"]["loaded"] and worlds["busy"]["running"] == ["recorder"]
    assert not worlds["calm"]["loaded"] and worlds["calm"]["running"] == []
    await h.stop()
    rec.calls.clear()
    await h.start()
    assert ("startup", "busy") in rec.calls and ("startup", "calm") not in rec.calls
    rec.busy.clear()  # nothing runs there any more: it unloads like any idle world
    await trio.sleep(60)
    assert not (await listed())["busy"]["loaded"]


async def test_session_limit_hook_refuses_new_sessions(worldhost: Any) -> None:
    rec = Recorder()
    rec.full = True
    h = await worldhost.start(rec)
    with pytest.raises(CallError) as err:
        async with h.client("bob"):
            pass
    assert err.value.code == "conflict" and "full" in err.value.message


async def test_session_closed_hook_gets_the_reason(worldhost: Any) -> None:
    rec = Recorder()
    h = await worldhost.start(rec)
    async with h.client("cleo") as cleo:
        await cleo.close_session()
    assert ("closed", "cleo", "closed") in rec.calls


class Twin:
    __name__ = "twin"

    @hookimpl
    def register_actions(self) -> list[Action]:
        return [Action("map.export", lambda ctx, p: {}, None, Role.viewer)]


class SliceTwin:
    __name__ = "slice_twin"

    @hookimpl
    def register_slices(self) -> list[SliceSpec]:
        return [SliceSpec("chat")]


@pytest.mark.parametrize("plugin, words", [(Twin(), ["map.export", "map", "twin"]),
                                           (SliceTwin(), ["chat", "slice_twin"])])
def test_duplicate_names_stop_startup_naming_both(plugin: Any, words: list[str]) -> None:
    with pytest.raises(StartupError) as err:
        Host(config_mod.Config(), [plugin], entry_points=False, db=":memory:")
    for word in words:
        assert word in str(err.value)


def test_a_bad_process_template_stops_startup_naming_the_plugin(tmp_path: Path) -> None:
    class BadTemplates:
        __name__ = "bad_templates"

        @hookimpl
        def register_process_templates(self) -> list[dict[str, Any]]:
            return [{"id": "EMPTY", "name": "No stages", "stages": []}]

    host = Host(config_mod.Config(), [BadTemplates()], entry_points=False,
                db=str(tmp_path / "w.db"))

    async def main() -> None:
        await host.run(listen=False)

    with pytest.raises(BaseException) as err:
        trio.run(main)
    assert "bad_templates" in repr(err.value) and "EMPTY" in repr(err.value)


def test_disabled_builtin_is_not_loaded() -> None:
    cfg = config_mod.from_dict({"plugins": {"chat": {"enabled": False}}})
    host = Host(cfg, entry_points=False, db=":memory:")
    assert "chat" not in host.registry.plugin_names
    assert "chat.say" not in host.registry.actions


def test_a_hook_without_wrappers_is_called_as_pluggy_calls_it() -> None:
    """``ScopedHooks`` calls such a hook in a plain loop: the same implementations,
    in the same order (tryfirst, trylast, registration), the same results; one
    with a wrapper still goes through pluggy."""
    import pluggy

    from host.plugins import ScopedHooks

    calls: list[str] = []

    def plugin(name: str, **opts: Any) -> Any:
        class P:
            @hookimpl(**opts)
            def action_applied(self, applied: Any) -> Any:  # a subset of the arguments
                calls.append(name)
                return name if name != "quiet" else None
        P.__name__ = name
        return P()

    pm = pluggy.PluginManager("worldhost")
    pm.add_hookspecs(hookspecs)
    for name, opts in [("first", {"tryfirst": True}), ("a", {}), ("quiet", {}),
                       ("last", {"trylast": True}), ("b", {})]:
        pm.register(plugin(name, **opts), name=name)
    by_pluggy = pm.hook.action_applied(host=None, applied=None)
    order, calls[:] = list(calls), []
    plain = ScopedHooks(pm, []).action_applied
    assert plain is not pm.hook.action_applied
    assert plain(host=None, applied=None) == by_pluggy == ["first", "b", "a", "last"]
    assert calls == order == ["first", "b", "quiet", "a", "last"]

    class Wrapper:
        @hookimpl(wrapper=True)
        def action_applied(self) -> Any:
            return (yield)

    pm.register(Wrapper(), name="wrapper")
    assert ScopedHooks(pm, []).action_applied is pm.hook.action_applied


class Tally:
    """A third-party slice that goes back into a world through its own action."""

    __name__ = "tally"

    @hookimpl
    def register_slices(self) -> list[SliceSpec]:
        return [SliceSpec("tally", lambda: {"total": 0})]

    @hookimpl
    def register_actions(self) -> list[Action]:
        def set_total(ctx: Context, p: dict[str, Any]) -> dict[str, Any]:
            if not isinstance(p.get("total"), int) or p["total"] < 0:
                raise Invalid("total must be a whole number, not negative",
                              details={"path": "params.total", "message": "not negative"})
            ctx.value("tally").set({"total": p["total"]})
            return {"total": p["total"]}
        return [Action("tally.set", set_total, dict[str, Any], Role.admin)]

    @hookimpl
    def world_import(self, slices: dict[str, Any]) -> ImportStep | None:
        if "tally" not in slices:
            return None
        return ImportStep("tally.set", {"total": slices["tally"]["data"]["total"]}, ("tally",))


async def test_an_export_goes_back_through_each_plugins_import_action(worldhost: Any) -> None:
    """``world_import``: the simulation's import takes the map with it (it answers
    first), a third-party slice goes through its own action (checked as a client's
    would be), and what no plugin takes is written whole."""
    admin = {"host": {"admin_token": "adm"}}
    source = await worldhost.start(Tally(), config=admin)
    async with source.client("root", token="adm") as root:
        await root.call("map.import", map_data=grid_map(2, 1))
        await root.call("simulation.add_agent", id="t1", kind="truck", node="n0_0")
        await root.call("tally.set", total=7)
        await root.call("chat.say", text="hello")
    document = world_document(source.host.world(None))
    target = await worldhost.start(Tally(), config=admin)
    result = await apply_document(target.host, document)
    assert set(result) == {"simulation", "tally", "slices"}  # no map.import of its own
    world = target.world()
    assert world["tally"] == {"total": 7} and "agent:t1" in world["simulation"]
    assert world["map"] == source.world()["map"] and world["chat"] == source.world()["chat"]
    document["slices"]["tally"]["data"]["total"] = -1
    with pytest.raises(ActionError) as err:
        await apply_document(target.host, document)
    assert err.value.code == "validation_error" and "not negative" in err.value.message
    del document["slices"]["simulation"]
    assert "map" in await apply_document(target.host, {**document, "slices": {
        "map": document["slices"]["map"]}})  # the map alone goes through map.import


class Waiter:
    """A background task that sleeps until its slice changes, or ten seconds pass."""

    __name__ = "waiter"

    def __init__(self) -> None:
        self.woke: list[tuple[bool, float]] = []

    @hookimpl
    def register_slices(self) -> list[SliceSpec]:
        return [SliceSpec("watched", lambda: {"n": 0}), SliceSpec("other", lambda: {"n": 0})]

    @hookimpl
    def register_actions(self) -> list[Action]:
        def bump(name: str) -> Action:
            def handler(ctx: Context, p: Any) -> dict[str, Any]:
                ctx.value(name).set({"n": ctx.value(name).value["n"] + 1})
                return {}
            return Action(f"{name}.bump", handler, None, Role.player)
        return [bump("watched"), bump("other")]

    @hookimpl
    def background_tasks(self, host: Any) -> list[Any]:
        async def task() -> None:
            while True:
                started = trio.current_time()
                changed = await host.wait_changed({"watched"}, deadline=started + 10)
                self.woke.append((changed, round(trio.current_time() - started, 3)))
        return [task]


async def test_wait_changed_wakes_on_its_slices_or_at_the_deadline(
        worldhost: Any, autojump_clock: Any) -> None:
    waiter = Waiter()
    h = await worldhost.start(waiter)
    async with h.client("ada") as ada:
        await trio.sleep(1)
        await ada.call("other.bump")  # another slice: it sleeps on
        await trio.sleep(1)
        await ada.call("watched.bump")
        await trio.sleep(0.1)
        assert waiter.woke and waiter.woke[0][0] is True and 2 <= waiter.woke[0][1] < 3
        await trio.sleep(15)
    assert waiter.woke[1] == (False, 10.0)
