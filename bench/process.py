"""Processes under load: 100 processes of 5 agents each taking turns as fast as they can.

    python bench/process.py [--seconds 5]

Prints acknowledged turns/s and their p99 latency next to ``host.ping`` round
trips measured in the same run with the same clients: the cost of a durable
turn over a bare round trip (target: turns/s at least 0.5 of pings/s). Each
agent subscribes to its own process's topic (``process:<id>``), so a turn is
sent to the 5 agents of its process rather than to all 500 sessions.
"""

from __future__ import annotations

import argparse

import trio

from common import drive, host_process, open_conns, percentile, run, workdir

PROCESSES = 100
AGENTS = 5
TEMPLATE = "STANDARD_BRAINSTORM"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()
    folder = workdir()
    # a client that falls behind is not dropped: what is measured is the host
    server = host_process(folder).start()

    async def bench() -> None:
        async with trio.open_nursery() as nursery:
            # the processes start before the agents connect, so the agents do not begin
            # with 100 process.started broadcasts each to work through
            (lead,) = await open_conns(nursery, server.url, 1, True)
            pids = []
            for p in range(PROCESSES):
                reply = await lead.call("process.start", {
                    "template_id": "BENCH_ENDLESS", "problem_statement": f"bench {p}",
                    "agents": [f"p{p}a{a}" for a in range(AGENTS)]})
                assert reply["signal"] == "process.started", reply
                pids.append(reply["data"]["process_id"])
            await lead.ws.aclose()
            conns = await open_conns(nursery, server.url, PROCESSES * AGENTS, True)
            for index, conn in enumerate(conns):  # each agent watches its own process
                reply = await conn.call("world.subscribe",
                                        {"topics": [f"process:{pids[index // AGENTS]}"]})
                assert reply["signal"] == "world.subscribed", reply

            def turn(index: int, i: int) -> tuple[str, dict]:
                p, a = divmod(index, AGENTS)
                return "process.turn", {"process_id": pids[p], "agent_id": f"p{p}a{a}",
                                        "artifact": {"idea": i}}

            def ping(index: int, i: int) -> tuple[str, dict]:
                return "host.ping", {"i": i}

            # pings first: after the turns, clients still have broadcasts to work through
            pings = await drive(conns, args.seconds, ping)
            turns = await drive(conns, args.seconds, turn)
            nursery.cancel_scope.cancel()
        t_rate, p_rate = len(turns) / args.seconds, len(pings) / args.seconds
        print(f"{PROCESSES} processes x {AGENTS} agents ({PROCESSES * AGENTS} connections)")
        print(f"process.turn: {t_rate:8.0f} acknowledged turns/s  p50 "
              f"{percentile(turns, 0.5) * 1000:6.1f} ms  p99 {percentile(turns, 0.99) * 1000:6.1f} ms")
        print(f"host.ping:    {p_rate:8.0f} round trips/s        p50 "
              f"{percentile(pings, 0.5) * 1000:6.1f} ms  p99 {percentile(pings, 0.99) * 1000:6.1f} ms")
        print(f"durable turn vs bare round trip: throughput ratio {t_rate / p_rate:.2f}, "
              f"p99 ratio {percentile(turns, 0.99) / percentile(pings, 0.99):.2f}")

    try:
        run(bench)
    finally:
        server.stop()


if __name__ == "__main__":
    main()
