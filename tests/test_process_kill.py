"""For real: SIGKILL in the middle of a process driven by three agent clients; they
resume their sessions, finish it, and every acknowledged turn is collected once."""

from __future__ import annotations

from pathlib import Path

import trio

from host.client import Disconnected, connect
from serverproc import ServerProcess, free_port

AGENTS = ["ann", "ben", "cat"]


async def test_agents_finish_a_process_across_a_kill(tmp_path: Path) -> None:
    server = ServerProcess(tmp_path / "w.db", port=free_port()).start()
    acknowledged: list[tuple[str, int]] = []
    async with connect(server.url, name="lead") as lead:
        pid = (await lead.call("process.start", template_id="STANDARD_BRAINSTORM",
                               problem_statement="kill me", agents=AGENTS))["process_id"]

    async def agent(name: str, killed: trio.Event) -> None:
        async with connect(server.url, name=name) as client:
            for turn in range(3):
                if name == "ann" and turn == 1:
                    killed.set()  # the host dies while this turn is on its way
                await client.call("process.turn", process_id=pid, agent_id=name,
                                  artifact={"agent": name, "turn": turn})
                acknowledged.append((name, turn))
            assert client.resumes >= 1 or name != "ann"

    killed = trio.Event()
    async with trio.open_nursery() as nursery:
        for name in AGENTS:
            nursery.start_soon(agent, name, killed)
        await killed.wait()
        server.kill9()
        await trio.sleep(0.3)
        server.start()
    try:
        async with connect(server.url, name="judge") as judge:
            status = await judge.call("process.status", process_id=pid)
    except Disconnected as exc:
        raise AssertionError(server.log()) from exc
    finally:
        assert server.stop() == 0
    collected = [(a["artifact"]["agent"], a["artifact"]["turn"])
                 for a in status["collected_artifacts"]["diverge"]]
    assert sorted(collected) == sorted(acknowledged)
    assert len(set(collected)) == 9
    assert status["current_stage_index"] == 1  # everyone used their turns: on to cluster
