"""Subscriptions: a session gets the signals of the topics it watches (world.subscribe),
through the real server, store and transport; they survive resume and restart."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from host import config as config_mod
from host import plugins
from host.actions import Invalid
from host.client import CallError, connect
from host.sessions import SessionTable
from host.topics import UNSUBSCRIBED, TopicForms
from serverproc import ServerProcess, free_port

QUIET = ("sync_state",)  # sent to everyone on some changes, whatever they watch


async def next_event(client: Any, timeout: float = 10) -> dict[str, Any]:
    """The next signal that is not a ``sync_state``."""
    while True:
        sig = await client.next_signal(timeout=timeout)
        if sig["signal"] not in QUIET:
            return sig


async def test_a_subscriber_gets_its_topics_and_a_session_that_never_subscribed_gets_all(
        worldhost: Any) -> None:
    h = await worldhost.start(listen=True)
    async with h.client("ada") as ada, h.client("bob") as bob, h.client("cy") as cy:
        assert (await ada.call("world.subscribe", topics=["chat"]))["topics"] == ["chat"]
        await bob.call("map.add_node", id="n1", x=0, y=0)
        await bob.call("chat.say", text="hello")
        # cy never subscribed: both, in order; ada only the chat
        assert (await next_event(cy))["signal"] == "map.node_added"
        assert (await next_event(cy))["signal"] == "chat.message"
        sig = await next_event(ada)
        assert sig["signal"] == "chat.message" and sig["data"]["text"] == "hello"
        # adding a topic, then removing one
        assert (await ada.call("world.subscribe", topics=["map"]))["topics"] == ["chat", "map"]
        assert (await ada.call("world.unsubscribe", topics=["chat"]))["topics"] == ["map"]
        await bob.call("chat.say", text="unseen")
        await bob.call("map.add_node", id="n2", x=1, y=1)
        sig = await next_event(ada)
        assert sig["signal"] == "map.node_added" and sig["data"]["node"]["id"] == "n2"


@pytest.mark.parametrize("topics, path, words", [
    (["nonsense"], "params.topics[0]", "unknown topic 'nonsense'"),
    (["chat", "simulation.agent"], "params.topics[1]", "needs an argument"),
    (["chat:x"], "params.topics[0]", "takes no argument"),
    (["simulation.view:1,2,3"], "params.topics[0]", "four numbers"),
    (["simulation.view:0,0,nan,1"], "params.topics[0]", "finite"),
    (["simulation.view:5,0,1,1"], "params.topics[0]", "x0 <= x1"),
    ([7], "params.topics[0]", "a topic is a string"),
    (["process:" + "p" * 400], "params.topics[0]", "max_topic_length (300)"),
    (["simulation.agent:" + "t" * 270], "params.topics[0]", "at most 256 characters"),
    ([f"process:p{i}" for i in range(65)], "params.topics", "max_topics (64)"),
])
async def test_a_bad_topic_is_refused_naming_it_and_nothing_changes(
        worldhost: Any, topics: list[Any], path: str, words: str) -> None:
    h = await worldhost.start(listen=True)
    async with h.client("ada") as ada:
        await ada.call("world.subscribe", topics=["map"])
        with pytest.raises(CallError) as err:
            await ada.call("world.subscribe", topics=topics)
        assert err.value.code == "validation_error"
        assert err.value.details["path"] == path and words in err.value.message
        # nothing half-applied: still just "map", and the connection works
        assert (await ada.call("world.subscribe", topics=[]))["topics"] == ["map"]
        assert h.sessions()[ada.session_id]["topics"] == ["map"]


async def test_max_topics_counts_what_a_session_already_watches(worldhost: Any) -> None:
    h = await worldhost.start(listen=True, config={"sessions": {"max_topics": 2}})
    async with h.client("ada") as ada:
        await ada.call("world.subscribe", topics=["chat", "map"])
        with pytest.raises(CallError) as err:
            await ada.call("world.subscribe", topics=["sessions"])
        assert err.value.code == "validation_error" and "max_topics (2)" in err.value.message
        await ada.call("world.subscribe", topics=["map"])  # already held: still two


FORMS = TopicForms.of(plugins.load(config_mod.from_dict({}, "<test>"), entry_points=False))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(topic=st.one_of(st.text(max_size=40), st.sampled_from(sorted(FORMS.forms)).flatmap(
    lambda name: st.text(max_size=30).map(lambda arg: f"{name}:{arg}"))))
def test_any_topic_string_is_taken_or_refused_as_validation_error(topic: str) -> None:
    forms = FORMS
    try:
        assert forms.check(topic, "params.topics[0]") == topic
    except Invalid as exc:
        assert exc.details["path"] == "params.topics[0]"


async def test_participants_of_a_process_get_its_signals_without_subscribing(
        worldhost: Any) -> None:
    h = await worldhost.start(listen=True)
    async with h.client("ann") as ann, h.client("ben") as ben, h.client("cy") as cy, \
            h.client("dee") as dee:
        pid = "p1"
        for c in (ann, ben, cy):
            await c.call("world.subscribe", topics=["chat"])
        await dee.call("world.subscribe", topics=[f"process:{pid}"])
        await ann.call("process.start", template_id="STANDARD_BRAINSTORM", process_id=pid,
                       problem_statement="x", agents=["a", "b"])
        assert (await next_event(dee))["signal"] == "process.started"
        await ann.call("process.turn", process_id=pid, agent_id="a", artifact=1)  # ann: a seat
        await ben.call("process.turn", process_id=pid, agent_id="b", artifact=2)
        await ben.call("chat.say", text="marker")
        turn = await next_event(ann)  # a participant, though it watches only chat
        assert turn["signal"] == "process.turn_taken" and turn["data"]["agent_id"] == "b"
        assert (await next_event(ann))["signal"] == "chat.message"
        # cy is no participant and watches chat only: the marker is all it gets
        assert (await next_event(cy))["data"]["text"] == "marker"
        # dee subscribed to the process: both turns, not the chat
        assert (await next_event(dee))["data"]["agent_id"] == "a"
        assert (await next_event(dee))["data"]["agent_id"] == "b"
        await ann.call("process.turn", process_id=pid, agent_id="a", artifact=3)
        assert (await next_event(dee))["data"]["turn"] == 2


async def test_subscriptions_survive_resume_and_a_crash_in_process(worldhost: Any) -> None:
    h = await worldhost.start(listen=True)
    async with h.client("ada") as ada, h.client("bob") as bob:
        await ada.call("world.subscribe", topics=["chat"])
        await ada.drop()  # resumes by itself
        await bob.call("map.add_node", id="n1", x=0, y=0)
        await bob.call("chat.say", text="after resume")
        sig = await next_event(ada)
        assert sig["signal"] == "chat.message" and sig["data"]["text"] == "after resume"
        assert ada.resumes == 1
    sid = ada.session_id
    await h.crash()
    h = await h.restart()
    assert h.sessions()[sid]["topics"] == ["chat"]
    session = h.host.sessions.get(sid)
    assert session is not None and session.topics == {"chat"}
    interest = h.host.sessions.interest_in(session.world)
    assert interest.by_topic["chat"] == {sid: session} and sid not in interest.everything


async def test_subscriptions_survive_kill_9(tmp_path: Path) -> None:
    tests = str(Path(__file__).parent)
    server = ServerProcess(tmp_path / "w.db", port=free_port(),
                           env={"PYTHONPATH": os.pathsep.join([tests, os.environ.get(
                               "PYTHONPATH", "")])}).start()
    try:
        async with connect(server.url, name="ada") as ada, \
                connect(server.url, name="bob", reconnect=False) as bob:
            await ada.call("world.subscribe", topics=["chat"])
            await bob.call("map.add_node", id="n0", x=0, y=0)
            server.kill9()
            server.start()
            with trio.fail_after(15):
                while ada.resumes == 0 or ada.state != "open":
                    await trio.sleep(0.05)
            async with connect(server.url, name="cy") as cy:
                await cy.call("map.add_node", id="n1", x=0, y=0)
                await cy.call("chat.say", text="after the crash")
            sig = await next_event(ada)
            assert sig["signal"] == "chat.message", sig
            assert sig["data"]["text"] == "after the crash"
    finally:
        server.stop()


def test_the_index_holds_each_topic_s_subscribers_and_forgets_empty_topics() -> None:
    """Routing costs the audience: the index answers a topic with its subscribers and
    the sessions that never subscribed, kept in step as records change."""
    table = SessionTable()

    def record(sid: str, world: str | None, topics: list[str] | None) -> dict[str, Any]:
        return {"id": sid, "name": sid, "role": "player", "state": "open", "world": world,
                "topics": topics}

    records = {f"s{i}": record(f"s{i}", "main", [f"process:p{i}"]) for i in range(500)}
    records["all"] = record("all", "main", None)
    records["other"] = record("other", "elsewhere", ["chat"])
    table.sync(records)
    main = table.interest_in("main")
    members = table.members("main")
    assert sorted(s.id for s in main.audience("process:p7", members)) == ["all", "s7"]
    assert [s.id for s in main.audience("chat", members)] == ["all"]
    assert [s.id for s in main.audience("process:p7", members, ["s9"])] == ["all", "s7", "s9"]
    assert [s.id for s in main.audience(UNSUBSCRIBED, members)] == ["all"]
    assert main.subscribed("process") == {f"process:p{i}" for i in range(500)}
    records["s7"] = record("s7", "main", [])
    records["other"] = record("other", "main", ["chat"])
    del records["s8"]
    table.sync(records)
    assert "process:p7" not in main.by_topic and "process:p8" not in main.by_topic
    assert [s.id for s in main.audience("chat", members)] == ["all", "other"]
    assert table.interest_in("elsewhere").by_topic == {}
