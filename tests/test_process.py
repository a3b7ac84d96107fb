"""The process controller: templates, turns, stages, timers, and resume after a crash."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from host.client import CallError, connect
from host.plugins import hookimpl
from host.testing import open_harness
from plugins.process_controller import STANDARD_BRAINSTORM
from serverproc import ServerProcess, free_port

AGENTS = ["ann", "ben", "cat"]


async def start(client: Any, template: str = "STANDARD_BRAINSTORM", **extra: Any) -> str:
    started = await client.call("process.start", template_id=template,
                                problem_statement="How do we ship faster?", agents=AGENTS,
                                **extra)
    return started["process_id"]


async def test_templates_are_listed(worldhost: Any) -> None:
    h = await worldhost.start()
    async with h.client("ada") as ada:
        templates = {t["id"]: t for t in (await ada.call("process.templates"))["templates"]}
    assert {"STANDARD_BRAINSTORM", "QUICK_POLL"} <= set(templates)
    assert [s["id"] for s in templates["STANDARD_BRAINSTORM"]["stages"]] == \
        ["diverge", "cluster", "converge", "summarize"]


async def test_a_brainstorm_runs_from_start_to_completion(worldhost: Any) -> None:
    h = await worldhost.start()
    async with h.client("ada") as ada, h.client("watcher") as watcher:
        pid = await start(ada)
        assert (await watcher.next_signal("process.started"))["data"]["process_id"] == pid
        for turn in range(3):
            for agent in AGENTS:
                await ada.call("process.turn", process_id=pid, agent_id=agent,
                               artifact={"idea": f"{agent}-{turn}"})
        advanced = await watcher.next_signal("process.stage_advanced")
        assert advanced["data"]["from"] == "diverge" and advanced["data"]["to"] == "cluster"
        assert advanced["data"]["agents"] == [{"agent_id": "ann"}]
        with pytest.raises(CallError) as err:  # only the first agent clusters
            await ada.call("process.turn", process_id=pid, agent_id="ben")
        assert err.value.code == "conflict"
        await ada.call("process.turn", process_id=pid, agent_id="ann", artifact=["groups"])
        for agent in AGENTS:
            await ada.call("process.turn", process_id=pid, agent_id=agent, artifact=agent)
        advanced = [await watcher.next_signal("process.stage_advanced") for _ in range(2)]
        assert advanced[-1]["data"]["to"] == "summarize"
        assert advanced[-1]["data"]["agents"] == [{"agent_id": "ann", "role": "summarizer"}]
        await ada.call("process.turn", process_id=pid, agent_id="ann", artifact="summary")
        completed = await watcher.next_signal("process.completed")
        artifacts = completed["data"]["collected_artifacts"]
        assert len(artifacts["diverge"]) == 9 and artifacts["summarize"][0]["artifact"] == "summary"
        status = await ada.call("process.status", process_id=pid)
        assert status["status"] == "completed"
        with pytest.raises(CallError) as err:
            await ada.call("process.turn", process_id=pid, agent_id="ann")
        assert err.value.code == "conflict"


async def test_every_transition_and_refusal(worldhost: Any) -> None:
    h = await worldhost.start()
    async with h.client("ada") as ada:
        pid = await start(ada)
        with pytest.raises(CallError) as err:
            await ada.call("process.resume", process_id=pid)  # it is running
        assert err.value.code == "conflict"
        assert (await ada.call("process.pause", process_id=pid))["status"] == "paused"
        for action, params in (("process.pause", {}), ("process.advance", {}),
                               ("process.turn", {"agent_id": "ann"})):
            with pytest.raises(CallError) as err:
                await ada.call(action, process_id=pid, **params)
            assert err.value.code == "conflict", action
        assert (await ada.call("process.resume", process_id=pid))["status"] == "running"
        advanced = await ada.call("process.advance", process_id=pid)
        assert advanced["to"] == "cluster" and advanced["reason"] == "manual"
        assert (await ada.call("process.cancel", process_id=pid))["status"] == "cancelled"
        for action in ("process.pause", "process.resume", "process.cancel", "process.advance"):
            with pytest.raises(CallError) as err:
                await ada.call(action, process_id=pid)
            assert err.value.code == "conflict", action
        with pytest.raises(CallError) as err:
            await ada.call("process.turn", process_id=pid, agent_id="stranger")
        assert err.value.code == "conflict"
        with pytest.raises(CallError) as err:
            await ada.call("process.status", process_id="nope")
        assert err.value.code == "not_found"
        history = [h["event"] for h in (await ada.call("process.status",
                                                       process_id=pid))["history"]]
        assert history == ["started", "paused", "running", "stage_advanced", "cancelled"]


async def test_turn_limits_and_artifact_size(worldhost: Any) -> None:
    h = await worldhost.start(config={"plugins": {"process_controller": {
        "max_artifact_bytes": 100}}})
    async with h.client("ada") as ada:
        pid = await start(ada)
        for _ in range(3):
            await ada.call("process.turn", process_id=pid, agent_id="ann")
        with pytest.raises(CallError) as err:
            await ada.call("process.turn", process_id=pid, agent_id="ann")
        assert err.value.code == "conflict" and "3 turns" in err.value.message
        with pytest.raises(CallError) as err:
            await ada.call("process.turn", process_id=pid, agent_id="ben", artifact="x" * 200)
        assert err.value.code == "validation_error"


async def test_several_processes_and_the_phase(worldhost: Any) -> None:
    h = await worldhost.start()
    async with h.client("ada") as ada:
        assert ada.server_info["phase"] == "onboarding"
        one = await start(ada)
        two = await start(ada, template="QUICK_POLL")
        listed = (await ada.call("process.list"))["processes"]
        assert {p["process_id"] for p in listed} == {one, two}
    async with h.client("bob") as bob:
        assert bob.server_info["phase"] == "playing"
        assert {p["process_id"] for p in bob.server_info["processes"]} == {one, two}


async def test_a_stage_times_out_and_pause_does_not_count(worldhost: Any,
                                                         autojump_clock: Any) -> None:
    h = await worldhost.start()
    async with h.client("ada") as ada:
        pid = await start(ada, template="QUICK_POLL")  # vote: 60 s
        await trio.sleep(30)
        await ada.call("process.pause", process_id=pid)
        await trio.sleep(600)  # paused: the clock stands still
        assert (await ada.call("process.status", process_id=pid))["current_stage_index"] == 0
        await ada.call("process.resume", process_id=pid)
        await trio.sleep(29)
        assert (await ada.call("process.status", process_id=pid))["status"] == "running"
        completed = await ada.next_signal("process.completed", timeout=5)
        assert completed["data"]["reason"] == "timeout"


async def test_a_timer_keeps_its_remaining_time_across_a_crash(worldhost: Any,
                                                               autojump_clock: Any) -> None:
    h = await worldhost.start()
    async with h.client("ada", reconnect=False) as ada:
        pid = await start(ada, template="QUICK_POLL")  # 60 s
    await trio.sleep(50)
    await h.crash()
    await h.restart()
    async with h.client("bob") as bob:
        status = await bob.call("process.status", process_id=pid)
        assert status["status"] == "running" and 49 <= status["stage_elapsed_s"] <= 51
        await trio.sleep(8)
        assert (await bob.call("process.status", process_id=pid))["status"] == "running"
        await trio.sleep(4)
        assert (await bob.call("process.status", process_id=pid))["status"] == "completed"


THREE_SECONDS = {"id": "THREE_SECONDS", "name": "One 3 s stage",
                 "stages": [{"id": "only", "max_duration_s": 3, "advance": "manual"}]}


@hookimpl
def register_process_templates() -> list[dict[str, Any]]:
    """This module is also a plugin (``module = "test_process"``) for the serve test below."""
    return [THREE_SECONDS]


async def test_a_clean_stop_keeps_the_exact_time_left(tmp_path: Path) -> None:
    """A real ``worldhost serve``: SIGTERM 1.9 s into a 3 s stage; after the restart
    the stage ends about 1.1 s later, not 2 s (the last once-a-second clock record)."""
    config = tmp_path / "w.toml"
    config.write_text('[plugins.timed]\nmodule = "test_process"\n')
    tests = str(Path(__file__).parent)
    server = ServerProcess(tmp_path / "w.db", config, port=free_port(),
                           env={"PYTHONPATH": tests}).start()
    async with connect(server.url, name="ada", reconnect=False) as ada:
        pid = (await ada.call("process.start", template_id="THREE_SECONDS",
                              problem_statement="time", agents=["ann"]))["process_id"]
        started = trio.current_time()
    await trio.sleep_until(started + 1.9)
    assert server.stop() == 0
    server.start()
    restarted = trio.current_time()
    try:
        async with connect(server.url, name="bob") as bob:
            while (await bob.call("process.status", process_id=pid))["status"] == "running":
                assert trio.current_time() - restarted < 3, "the stage did not end"
                await trio.sleep(0.02)
            ended = trio.current_time() - restarted
    finally:
        assert server.stop() == 0
    assert 0.6 < ended < 1.6, ended


@pytest.mark.parametrize("stage", range(len(STANDARD_BRAINSTORM["stages"])))
async def test_a_crash_in_each_stage_resumes_with_identical_counts(worldhost: Any,
                                                                   stage: int) -> None:
    h = await worldhost.start()
    async with h.client("ada", reconnect=False) as ada:
        pid = await start(ada)
        for _ in range(stage):
            await ada.call("process.advance", process_id=pid)
        await ada.call("process.turn", process_id=pid, agent_id="ann", artifact={"n": stage})
        before = await ada.call("process.status", process_id=pid)
    await h.crash()
    await h.restart()
    async with h.client("bob") as bob:
        after = await bob.call("process.status", process_id=pid)
    before.pop("stage_elapsed_s"), after.pop("stage_elapsed_s")
    assert after == before
    assert after["collected_artifacts"][STANDARD_BRAINSTORM["stages"][stage]["id"]][0][
        "artifact"] == {"n": stage}


async def test_paused_stays_paused_and_completed_stays_completed(worldhost: Any) -> None:
    h = await worldhost.start()
    async with h.client("ada", reconnect=False) as ada:
        paused = await start(ada)
        await ada.call("process.pause", process_id=paused)
        done = await start(ada, template="QUICK_POLL")
        for agent in AGENTS:
            await ada.call("process.turn", process_id=done, agent_id=agent, artifact=1)
    await h.crash()
    await h.restart()
    async with h.client("bob") as bob:
        assert (await bob.call("process.status", process_id=paused))["status"] == "paused"
        assert (await bob.call("process.status", process_id=done))["status"] == "completed"
        await bob.call("process.resume", process_id=paused)


async def test_a_process_record_from_an_older_version_gets_defaults(worldhost: Any) -> None:
    h = await worldhost.start()
    async with h.client("ada") as ada:
        pid = await start(ada)
    await h.stop()
    import sqlite3
    from state.codec import canonical, load_stored
    conn = sqlite3.connect(h.db)
    value = load_stored(conn.execute("SELECT value FROM records WHERE slice='process'")
                        .fetchone()[0])
    for field in ("history", "stage_elapsed_s", "collected_artifacts"):
        del value[field]
    conn.execute("UPDATE records SET value=? WHERE slice='process'", (canonical(value),))
    conn.commit()
    conn.close()
    await h.start()
    async with h.client("ada") as ada:
        status = await ada.call("process.status", process_id=pid)
    assert status["history"] == [] and status["collected_artifacts"] == {}


ops = st.lists(st.tuples(st.sampled_from(["turn", "advance", "pause", "resume", "cancel",
                                          "push", "pop", "goto"]),
                         st.sampled_from(AGENTS + ["zed"]),
                         st.sampled_from(["/a", "/a/b", "/a/../c", "/..", "rel"])),
               max_size=40)


@given(ops)
@settings(max_examples=20, deadline=None, suppress_health_check=[
    HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
async def test_random_process_and_navigation_sequences(tmp_path: Path, steps: list) -> None:
    async with open_harness(tmp_path) as harness:
        h = await harness.start(db=tmp_path / f"{uuid.uuid4().hex}.db")
        async with h.client("ada") as ada:
            pid = await start(ada)
            turns = 0
            for op, agent, path in steps:
                try:
                    if op == "turn":
                        await ada.call("process.turn", process_id=pid, agent_id=agent,
                                       artifact=turns)
                        turns += 1
                    elif op in ("advance", "pause", "resume", "cancel"):
                        await ada.call(f"process.{op}", process_id=pid)
                    elif op == "pop":
                        await ada.call("nav.pop", agent_id=agent)
                    else:
                        await ada.call(f"nav.{op}", agent_id=agent, path=path)
                except CallError as err:
                    assert err.code in ("conflict", "validation_error")
                status = await ada.call("process.status", process_id=pid)
                recorded = sum(len(v) for v in status["collected_artifacts"].values())
                assert recorded == turns == sum(status["stage_turn_counts"].values()) \
                    == sum(status["agent_turn_counts"].values())
                assert 0 <= status["current_stage_index"] < len(STANDARD_BRAINSTORM["stages"])
                for record in h.world()["navigation"].values():
                    assert record["current_path"].startswith("/")
                    assert len(record["stack"]) >= 0
