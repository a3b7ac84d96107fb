"""Navigation: stacks of paths per agent, validated and normalised."""

from __future__ import annotations

from typing import Any

import pytest

from host.client import CallError


async def test_push_pop_goto_get_reset(worldhost: Any) -> None:
    h = await worldhost.start()
    async with h.client("ada") as ada, h.client("bob") as bob:
        assert await ada.call("nav.get", agent_id="a1") == {
            "agent_id": "a1", "current_path": "/", "stack": []}
        pushed = await ada.call("nav.push", agent_id="a1", path="/a/./b/../c")
        assert pushed == {"agent_id": "a1", "current_path": "/a/c", "stack": ["/"]}
        assert (await bob.next_signal("nav.changed"))["data"] == pushed
        await ada.call("nav.push", agent_id="a1", path="/x")
        assert (await ada.call("nav.goto", agent_id="a1", path="/y//z/"))["current_path"] == "/y/z"
        popped = await ada.call("nav.pop", agent_id="a1")
        assert popped == {"agent_id": "a1", "current_path": "/a/c", "stack": ["/"]}
        assert (await ada.call("nav.reset", agent_id="a1"))["stack"] == []
        with pytest.raises(CallError) as err:
            await ada.call("nav.pop", agent_id="a1")
        assert err.value.code == "conflict"


@pytest.mark.parametrize("path, why", [
    ("a/b", "absolute"), ("/..", "above the root"), ("/a/../../b", "above the root"),
    ("/a\nb", "control"), ("/a\x00", "control"), ("/" + "x" * 2000, "longer"),
    ("/a" * 100, "deeper"),
])
async def test_invalid_paths_say_why(worldhost: Any, path: str, why: str) -> None:
    h = await worldhost.start()
    async with h.client("ada") as ada:
        before = h.encoded_world()
        with pytest.raises(CallError) as err:
            await ada.call("nav.push", agent_id="a1", path=path)
        assert err.value.code == "validation_error" and why in err.value.message
        assert err.value.details["path"] == "params.path"
        assert h.encoded_world() == before


async def test_a_removed_agent_loses_its_navigation(worldhost: Any) -> None:
    h = await worldhost.start()
    async with h.client("ada") as ada:
        await ada.call("map.add_node", id="n", x=0, y=0)
        await ada.call("simulation.add_agent", id="truck1", kind="truck", node="n")
        await ada.call("nav.push", agent_id="truck1", path="/depot")
        await ada.call("nav.push", agent_id="ann", path="/ideas")
        await ada.call("simulation.remove_agent", id="truck1")
        assert "truck1" not in h.world()["navigation"]
        started = await ada.call("process.start", template_id="QUICK_POLL",
                                 problem_statement="?", agents=["ann"])
        await ada.call("process.cancel", process_id=started["process_id"])
        assert "ann" not in h.world()["navigation"]
