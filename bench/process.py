"""Processes under load: 100 processes of 5 agents each taking turns as fast as they can.

    python bench/process.py [--seconds 5] [--procs 2] [--rounds 3]
                            [--websocket trio-websocket|websockets]

Prints acknowledged turns/s and their p99 latency next to ``host.ping`` round
trips measured in the same run with the same clients (the same 500 connections,
pings first, then turns, ``--rounds`` times: the round with the median ratio is
shown): the cost of a durable turn over a bare round trip (target: turns/s at
least 0.5 of pings/s). Each agent subscribes to its own process's topic
(``process:<id>``), so a turn is sent to the 5 agents of its process (the reply
to the one that took it, ``process.turn_taken`` to the other four) rather than
to all 500 sessions.

The clients are bench/rawclient.py in ``--procs`` processes (plain sockets,
epoll; a reply is found by a byte search, the other agents' signals are skipped
unread), so the host, not the load generator, sets the pace: each row shows the
CPU either side spends per acknowledged request and the share of its time each
was busy (running or waiting for a core). (The trio client this benchmark used
before costs as much per message as the host and was the limit: with it the
ratio measured the client's cost of five signals against one.)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import trio

from common import host_process, open_conns, run, workdir
from roundtrip import RawClients

PROCESSES = 100
AGENTS = 5


def start_processes(url: str) -> list[str]:
    """The 100 processes, started before the agents connect (so the agents do not
    begin with 100 ``process.started`` broadcasts each to work through)."""
    pids: list[str] = []

    async def start() -> None:
        async with trio.open_nursery() as nursery:
            (lead,) = await open_conns(nursery, url, 1, True)
            for p in range(PROCESSES):
                reply = await lead.call("process.start", {
                    "template_id": "BENCH_ENDLESS", "problem_statement": f"bench {p}",
                    "agents": [f"p{p}a{a}" for a in range(AGENTS)]})
                assert reply["signal"] == "process.started", reply
                pids.append(reply["data"]["process_id"])
            await lead.ws.aclose()
            nursery.cancel_scope.cancel()
    run(start)
    return pids


def write_plan(folder: Path, pids: list[str]) -> Path:
    """Connection i is agent i % 5 of process i // 5, watching that process."""
    conns = []
    for index in range(PROCESSES * AGENTS):
        p, a = divmod(index, AGENTS)
        conns.append({"subscribe": [f"process:{pids[p]}"], "request": {
            "action": "process.turn",
            "params": {"process_id": pids[p], "agent_id": f"p{p}a{a}",
                       "artifact": {"idea": index}}}})
    path = folder / "plan.json"
    path.write_text(json.dumps({"conns": conns}))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--procs", type=int, default=2, help="client processes")
    parser.add_argument("--rounds", type=int, default=3,
                        help="pings and turns measured in turn this many times; the round "
                             "with the median ratio is shown, with the range of the ratios")
    parser.add_argument("--websocket", choices=("trio-websocket", "websockets"), default=None,
                        help="the host's [host] websocket (default: the host's own)")
    args = parser.parse_args()
    folder = workdir()
    # a client that falls behind is not dropped: what is measured is the host
    host = f'websocket = "{args.websocket}"\n' if args.websocket else ""
    server = host_process(folder, host=host).start()
    try:
        assert server.proc is not None
        pid = server.proc.pid
        plan = write_plan(folder, start_processes(server.url))
        rounds = max(1, args.rounds)
        clients = RawClients(server.url, PROCESSES * AGENTS, args.procs, [
            "--session", "--action", ",".join(["host.ping,plan"] * rounds), "--plan", str(plan),
            "--seconds", str(args.seconds), "--grace", "60"])
        measured = sorted(({phase: clients.phase(pid) for phase in ("host.ping", "process.turn")}
                           for _ in range(rounds)),
                          key=lambda r: r["process.turn"].rate / r["host.ping"].rate)
        clients.wait()
    finally:
        server.stop()
    print(f"{PROCESSES} processes x {AGENTS} agents ({PROCESSES * AGENTS} connections), "
          f"raw client in {args.procs} process(es); cost = µs of CPU per acknowledged request, "
          f"server/client; busy = share of the time running or waiting for a core")
    results = measured[len(measured) // 2]
    low, high = (r["process.turn"].rate / r["host.ping"].rate for r in (measured[0], measured[-1]))
    for phase, label in (("process.turn", "acknowledged turns/s"), ("host.ping", "round trips/s")):
        r = results[phase]
        print(f"{phase:<13} {r.rate:8.0f} {label:<21} p50 {r.p50 * 1000:6.1f} ms"
              f"  p99 {r.p99 * 1000:6.1f} ms  cost {r.server_cpu * 1e6:5.0f}/"
              f"{r.client_cpu * 1e6:<5.0f} busy {r.server_busy * 100:3.0f}%/"
              f"{r.client_busy * 100:.0f}%")
    turns, pings = results["process.turn"], results["host.ping"]
    print(f"durable turn vs bare round trip: throughput ratio {turns.rate / pings.rate:.2f}, "
          f"p99 ratio {turns.p99 / pings.p99:.2f}, "
          f"server CPU ratio {pings.server_cpu / turns.server_cpu:.2f} "
          f"(the median of {len(measured)} rounds; ratios {low:.2f}-{high:.2f})")


if __name__ == "__main__":
    main()
