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

The same clients then do the same against two floors, bench/durable_echo.py
``--fanout`` on the ``websockets`` library's server: it answers a ping at
once, and sends each turn to the other four connections of its process as it
answers it, and does nothing else. The ``fan-out echo`` journals nothing;
the ``durable fan-out echo`` first commits the turn to SQLite on a thread.
Their turns/pings ratios are what the fan-out alone, and with durability,
leave of the ping rate in Python on this machine; the host's ratio is also
shown as a share of each.

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

from common import host_process, open_conns, run, spawn_server, workdir
from roundtrip import RawClients, Result

PROCESSES = 100
AGENTS = 5
FLOORS = {  # bench/durable_echo.py --fanout, by where it commits
    "none": "fan-out echo",  # no journal: what sending each turn to five costs alone
    "thread": "durable fan-out echo",
}


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


def measure(url: str, pid: int, plan: Path, args: argparse.Namespace,
            session: bool) -> tuple[dict[str, Result], float, float]:
    """Pings and turns from the same 500 connections, ``--rounds`` times: the round
    with the median ratio, and the lowest and highest ratio."""
    rounds = max(1, args.rounds)
    clients = RawClients(url, PROCESSES * AGENTS, args.procs, [
        *["--session"] * session, "--action", ",".join(["host.ping,plan"] * rounds),
        "--plan", str(plan), "--seconds", str(args.seconds), "--grace", "60"])
    measured = sorted(({phase: clients.phase(pid) for phase in ("host.ping", "process.turn")}
                       for _ in range(rounds)),
                      key=lambda r: r["process.turn"].rate / r["host.ping"].rate)
    clients.wait()
    low, high = (r["process.turn"].rate / r["host.ping"].rate for r in (measured[0], measured[-1]))
    return measured[len(measured) // 2], low, high


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
        plan = write_plan(folder, start_processes(server.url))
        results, low, high = measure(server.url, server.proc.pid, plan, args, True)
    finally:
        server.stop()
    floors = {mode: measure_floor(mode, plan, args) for mode in FLOORS}
    print(f"{PROCESSES} processes x {AGENTS} agents ({PROCESSES * AGENTS} connections), "
          f"raw client in {args.procs} process(es); cost = µs of CPU per acknowledged request, "
          f"server/client; busy = share of the time running or waiting for a core")
    for name, measured in (("host", results),
                           *((FLOORS[mode], floor[0]) for mode, floor in floors.items())):
        for phase, label in (("process.turn", "acknowledged turns/s"),
                             ("host.ping", "round trips/s")):
            r = measured[phase]
            print(f"{name + ' ' + phase:<36} {r.rate:8.0f} {label:<21} "
                  f"p50 {r.p50 * 1000:6.1f} ms  p99 {r.p99 * 1000:6.1f} ms  "
                  f"cost {r.server_cpu * 1e6:5.0f}/{r.client_cpu * 1e6:<5.0f} "
                  f"busy {r.server_busy * 100:3.0f}%/{r.client_busy * 100:.0f}%")
    turns, pings = results["process.turn"], results["host.ping"]
    ratio = turns.rate / pings.rate
    print(f"durable turn vs bare round trip: throughput ratio {ratio:.2f}, "
          f"p99 ratio {turns.p99 / pings.p99:.2f}, "
          f"server CPU ratio {pings.server_cpu / turns.server_cpu:.2f} "
          f"(the median of {args.rounds} rounds; ratios {low:.2f}-{high:.2f})")
    for mode, (floor, floor_low, floor_high) in floors.items():
        floor_ratio = floor["process.turn"].rate / floor["host.ping"].rate
        print(f"the same, {FLOORS[mode]}: {floor_ratio:.2f} "
              f"({floor_low:.2f}-{floor_high:.2f}); the host's is {ratio / floor_ratio:.2f} of it")


def measure_floor(mode: str, plan: Path, args: argparse.Namespace
                  ) -> tuple[dict[str, Result], float, float]:
    """``measure`` against bench/durable_echo.py ``--fanout``, committing as ``mode`` says."""
    echo, port = spawn_server("durable_echo.py", mode, "--fanout")
    try:
        return measure(f"ws://127.0.0.1:{port}/", echo.pid, plan, args, False)
    finally:
        echo.kill()
        echo.wait()


if __name__ == "__main__":
    main()
