"""The plugin author's side: the harness's config and task failures, settings without
a name, the ``host`` package's exports, params errors naming the field."""

from __future__ import annotations

import errno
import os
import importlib
import socket
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from host import Action, Context, Role, SliceSpec, hookimpl
from host.actions import encoded_size, resized
from host.client import CallError
from host.testing import BackgroundTaskFailed, open_harness

SCOREBOARD = '''
"""A plugin that reads its settings without knowing the name it is registered under."""
import msgspec
import trio

from host import Action, Role, SliceSpec, hookimpl


class Settings(msgspec.Struct, forbid_unknown_fields=True):
    step: int = 2


class BumpParams(msgspec.Struct, forbid_unknown_fields=True):
    n: int


def bump(ctx, p):
    ctx.value("scoreboard").set({"score": ctx.value("scoreboard").value["score"] + p.n})
    return {"score": ctx.value("scoreboard").value["score"]}


async def bumper(host):
    await host.submit("scoreboard.bump", {"n": host.settings().step})
    await trio.sleep_forever()


@hookimpl
def register_actions():
    return [Action("scoreboard.bump", bump, BumpParams, Role.player)]


@hookimpl
def register_slices():
    return [SliceSpec("scoreboard", lambda: {"score": 0})]


@hookimpl
def startup(host):
    host.runtime("seen")["step at startup"] = host.settings().step


@hookimpl
def background_tasks(host):
    return [lambda: bumper(host)]
'''


@pytest.fixture
def scoreboard(tmp_path: Path) -> Iterator[Any]:
    """``worldhost_scoreboard``, a real module on sys.path, imported as a test would."""
    (tmp_path / "worldhost_scoreboard.py").write_text(SCOREBOARD)
    sys.path.insert(0, str(tmp_path))
    try:
        yield importlib.import_module("worldhost_scoreboard")
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("worldhost_scoreboard", None)


async def test_a_host_table_keeps_the_harness_port(worldhost: Any) -> None:
    """#11.6: a ``[host]`` table used to replace the harness's ``port = 0``, so the
    host listened on 8765 (and failed when that port was taken)."""
    taken = socket.socket()
    try:
        taken.bind(("127.0.0.1", 8765))
        taken.listen()
    except OSError as exc:  # someone else holds it: taken all the same
        assert exc.errno == errno.EADDRINUSE
    try:
        h = await worldhost.start(listen=True, config={"host": {
            "admin_token": "adm", "limits": {"rate_burst": 50}}})
        assert h.host.port not in (None, 8765)
        assert h.host.config.host.admin_token == "adm"
        assert h.host.config.host.limits.rate_burst == 50
        assert h.host.config.host.limits.rate_per_s == 100.0  # nested tables merge too
        async with h.client("ada") as ada:
            assert await ada.call("host.ping", hello="world") == {"hello": "world"}
    finally:
        taken.close()


async def test_a_module_plugin_gets_its_own_settings_without_its_name(
        worldhost: Any, scoreboard: Any) -> None:
    """#11.7: registered through the harness, the module is named
    ``worldhost_scoreboard``; ``host.settings()`` finds its settings anyway."""
    h = await worldhost.start(scoreboard, builtins=False)
    assert "worldhost_scoreboard" in h.host.registry.plugin_names
    with trio.fail_after(5):
        while h.world()["scoreboard"]["score"] == 0:
            await trio.sleep(0.01)
    assert h.world()["scoreboard"] == {"score": 2}
    assert h.host.world().api.runtime("seen") == {"step at startup": 2}


async def test_a_module_plugin_named_in_the_config_gets_that_table(
        worldhost: Any, scoreboard: Any) -> None:
    """Settings for a module the test registers: its table, under its module name."""
    h = await worldhost.start(scoreboard, builtins=False,
                              config={"plugins": {"worldhost_scoreboard": {"step": 7}}})
    with trio.fail_after(5):
        while h.world()["scoreboard"]["score"] == 0:
            await trio.sleep(0.01)
    assert h.world()["scoreboard"] == {"score": 7}


async def test_settings_by_name_still_work(worldhost: Any, scoreboard: Any) -> None:
    h = await worldhost.start(scoreboard, config={"plugins": {
        "scores": {"module": "worldhost_scoreboard", "step": 3}}}, builtins=False)
    assert h.host.world().api.settings("scores").step == 3
    assert h.host.world().api.plugin_of("worldhost_scoreboard") == "scores"
    with pytest.raises(LookupError, match="no registered plugin"):
        h.host.world().api.settings()  # called from this test module, which is no plugin


class Crasher:
    """A plugin whose background task fails at once, twice (the host restarts it),
    then runs quietly."""

    __name__ = "crasher"

    def __init__(self) -> None:
        self.runs = 0

    @hookimpl
    def background_tasks(self, host: Any) -> list[Any]:
        async def doomed() -> None:
            self.runs += 1
            if self.runs <= 2:
                raise ZeroDivisionError("the task's own bug")
            await trio.sleep_forever()
        return [doomed]


async def test_a_failing_background_task_fails_the_next_harness_call(
        worldhost: Any, autojump_clock: Any) -> None:
    """#11.7: the host restarts a failing task, which hid the bug from the test."""
    h = await worldhost.start(Crasher(), builtins=False)
    await trio.sleep(0.5)
    with pytest.raises(BackgroundTaskFailed, match="plugin 'crasher' raised ZeroDivision") as err:
        async with h.client("ada"):
            pass
    assert isinstance(err.value.__cause__, ZeroDivisionError)
    assert err.value.__cause__.__traceback__ is not None  # the task's own traceback
    await trio.sleep(2.5)  # restarted and failed again: taken, so not a failure
    assert [f.plugin for f in h.task_failures()] == ["crasher"]


async def test_a_failing_background_task_fails_the_test_at_teardown(
        tmp_path: Path, autojump_clock: Any) -> None:
    with pytest.raises(BackgroundTaskFailed) as err:
        async with open_harness(tmp_path) as harness:
            await harness.start(Crasher(), builtins=False)
            await trio.sleep(0.5)
    assert isinstance(err.value.__cause__, ZeroDivisionError)


class Inner(msgspec.Struct, forbid_unknown_fields=True):
    y: int


class Needy(msgspec.Struct, forbid_unknown_fields=True):
    x: int
    inner: Inner | None = None


class NeedyPlugin:
    __name__ = "needy"

    @hookimpl
    def register_actions(self) -> list[Action]:
        def need(ctx: Context, p: Needy) -> dict[str, Any]:
            return {"x": p.x}
        return [Action("needy.need", need, Needy, Role.viewer, changes_world=False)]

    @hookimpl
    def register_slices(self) -> list[SliceSpec]:
        return []


@pytest.mark.parametrize(("params", "path"), [
    ({}, "params.x"),
    ({"x": 1, "inner": {}}, "params.inner.y"),
    ({"x": "one"}, "params.x"),
    ({"x": 1, "z": 2}, "params.z"),
])
async def test_a_params_error_names_the_field(worldhost: Any, params: dict[str, Any],
                                              path: str) -> None:
    """#11.15: a missing field was reported at ``params``, not at the field."""
    h = await worldhost.start(NeedyPlugin(), builtins=False)
    async with h.client("ada") as ada:
        with pytest.raises(CallError) as err:
            await ada.call("needy.need", **params)
        assert err.value.code == "validation_error"
        assert err.value.details["path"] == path, err.value.details
        assert path in err.value.message
        assert await ada.call("needy.need", x=4) == {"x": 4}  # the connection is fine


def test_host_exports_the_plugin_api_and_old_paths_still_work() -> None:
    import host
    import host.actions
    import host.plugins
    import state.slices
    for name in host.__all__:
        assert getattr(host, name) is not None, name
    assert host.Action is host.actions.Action and host.SliceSpec is state.slices.SliceSpec
    assert host.Invalid is host.actions.Invalid

    @host.hookimpl
    def register_slices() -> list[SliceSpec]:
        return []

    @host.plugins.hookimpl
    def register_actions() -> list[Action]:
        return []
    assert register_slices.worldhost_impl == register_actions.worldhost_impl  # type: ignore


def test_host_imports_first_in_a_fresh_interpreter() -> None:
    """``import host`` first (no other module loaded before it) has no import cycle."""
    import subprocess
    code = textwrap.dedent("""
        from host import hookimpl, Action, Context, Role, SliceSpec, Invalid, Conflict, NotFound
        import host.server, host.testing, plugins.map
    """)
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])


def test_the_worldhost_fixture_fails_a_test_whose_task_raised(tmp_path: Path) -> None:
    """A test that makes no harness call after the failure still fails, at the
    fixture's end (the test that passed although its plugin crash-looped)."""
    import subprocess
    (tmp_path / "test_quiet.py").write_text(textwrap.dedent('''
        import trio
        from host import hookimpl

        class Quiet:
            __name__ = "quiet"

            @hookimpl
            def background_tasks(self, host):
                async def oops():
                    raise KeyError("scoreboard")
                return [oops]

        async def test_looks_fine(worldhost):
            await worldhost.start(Quiet(), builtins=False)
            await trio.sleep(0.05)
    '''))
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}
    ran = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          "-o", "trio_mode=true", "test_quiet.py"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120, env=env)
    assert ran.returncode == 1, ran.stdout
    assert "BackgroundTaskFailed: background task" in ran.stdout
    assert "plugin 'quiet' raised KeyError" in ran.stdout
    assert "1 failed" in ran.stdout


async def test_settings_without_a_name_refuse_to_guess(worldhost: Any) -> None:
    """Two plugin objects from one module: ``host.settings()`` cannot tell which
    is calling, and says so instead of answering for the wrong one."""
    h = await worldhost.start(NeedyPlugin(), Recorderless(), builtins=False)
    with pytest.raises(LookupError, match=r"holds the plugins \['needy', 'recorderless'\]"):
        h.host.world().api.plugin_of(__name__)


class Recorderless:
    __name__ = "recorderless"

    @hookimpl
    def register_slices(self) -> list[SliceSpec]:
        return []


async def test_changing_what_world_returns_changes_nothing(worldhost: Any) -> None:
    """``h.world()`` used to hand out the live records: a test that popped a field
    before comparing broke the running host's process timer."""
    h = await worldhost.start()
    async with h.client("ada") as ada:
        await ada.call("map.add_node", id="a", x=0, y=0)
    before = h.encoded_world()
    h.world()["map"]["node:a"]["x"] = 99
    h.world()["map"].clear()
    assert h.encoded_world() == before


_scalars = st.none() | st.booleans() | st.integers(-10**12, 10**12) | \
    st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=8)
_values = st.recursive(_scalars, lambda inner: st.lists(inner, max_size=4)
                       | st.dictionaries(st.text(max_size=6), inner, max_size=4), max_leaves=20)


@st.composite
def _changed(draw: Any, old: Any) -> Any:
    """A value made from ``old`` as records change: new containers around the old
    values kept, lists grown at the end, items replaced, added or dropped."""
    if type(old) is dict and old and draw(st.booleans()):
        new = dict(old)
        for key in draw(st.lists(st.sampled_from(sorted(old)), max_size=3)):
            if draw(st.booleans()):
                new[key] = draw(_changed(old[key]))
            else:
                new.pop(key, None)
        for key, value in draw(st.dictionaries(st.text(max_size=6), _values, max_size=2)).items():
            new[key] = value
        return new
    if type(old) is list and draw(st.booleans()):
        return [*old, *draw(st.lists(_values, max_size=3))]
    return draw(_values) if draw(st.booleans()) else old


@given(st.data())
def test_resized_is_the_encoded_size_of_a_changed_record(data: Any) -> None:
    old = data.draw(_values)
    new = data.draw(_changed(old))
    assert resized(old, encoded_size(old), new) == encoded_size(new)
