"""The third-party plugin, tested only through the harness, as its author would."""

import pytest

from host.client import CallError


async def test_counter_loads_from_its_entry_point(worldhost):
    h = await worldhost.start(entry_points=True)
    assert "counter" in h.host.registry.plugin_names
    async with h.client("ada") as ada, h.client("bob") as bob:
        assert await ada.call("counter.add", n=2) == {"total": 2}
        assert (await bob.next_signal("counter.changed"))["data"] == {"total": 2}
        with pytest.raises(CallError) as err:
            await ada.call("counter.add", n=0)
        assert err.value.code == "validation_error"
        assert err.value.details["path"] == "params.n"


async def test_counter_survives_a_crash(worldhost):
    h = await worldhost.start(entry_points=True)
    async with h.client("ada") as ada:
        await ada.call("counter.add", n=5)
    await h.crash()
    await h.restart()
    async with h.client("ada") as ada:
        assert await ada.call("counter.get") == {"total": 5}


async def test_counter_can_be_disabled(worldhost):
    h = await worldhost.start(entry_points=True, config={"plugins": {"counter": {"enabled": False}}})
    assert "counter" not in h.host.registry.plugin_names
