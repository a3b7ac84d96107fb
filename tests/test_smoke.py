from host.client import CallError
import pytest


async def test_open_ping_snapshot(worldhost):
    h = await worldhost.start()
    async with h.client("ada") as ada:
        assert ada.role == "player"
        assert await ada.call("host.ping", x=1) == {"x": 1}
        snap = await ada.call("world.snapshot")
        assert ada.session_id in snap["slices"]["sessions"]
        with pytest.raises(CallError) as err:
            await ada.call("nope.nope")
        assert err.value.code == "unknown_action"
    await h.crash()
    await h.restart()
    async with h.client("bob") as bob:
        snap = await bob.call("world.snapshot")
        assert len(snap["slices"]["sessions"]) == 2
