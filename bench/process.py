"""Processes under load: 100 processes of 5 agents each taking turns as fast as they can.

    python bench/process.py [--seconds 5] [--procs 2] [--websocket trio-websocket|websockets]

Prints acknowledged turns/s and their p99 latency next to ``host.ping`` round
trips measured in the same run with the same clients (the same 500 connections,
pings first): the cost of a durable turn over a bare round trip (target: turns/s
at least 0.5 of pings/s). Each agent subscribes to its own process's topic
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
import subprocess
import sys
import time
from pathlib import Path

import trio

from common import host_process, open_conns, percentile, run, workdir
from rawclient import run_wait_seconds
from roundtrip import process_cpu

HERE = Path(__file__).parent
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
        total = PROCESSES * AGENTS
        clients = []
        for p in range(args.procs):
            share = total // args.procs + (p < total % args.procs)
            first = p * (total // args.procs) + min(p, total % args.procs)
            clients.append(subprocess.Popen(
                [sys.executable, str(HERE / "rawclient.py"), server.url, "--conns", str(share),
                 "--first", str(first), "--session", "--action", "host.ping,plan",
                 "--plan", str(plan), "--seconds", str(args.seconds), "--grace", "60"],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True))
        results = {}
        for phase in ("host.ping", "process.turn"):
            for client in clients:
                assert client.stdout is not None
                if client.stdout.readline().strip() != "ready":
                    raise RuntimeError(f"client failed: {client.wait()}")
            cpu_before, busy_before = process_cpu(pid), sum(run_wait_seconds(pid))
            started = time.perf_counter()
            for client in clients:
                assert client.stdin is not None
                client.stdin.write("go\n")
                client.stdin.flush()
            reports = []
            for client in clients:
                assert client.stdout is not None
                reports.append(json.loads(client.stdout.readline()))
            window = time.perf_counter() - started
            server_cpu = process_cpu(pid) - cpu_before
            server_busy = sum(run_wait_seconds(pid)) - busy_before
            times = [us / 1e6 for r in reports for us in r["us"]]
            wall = max(r["wall"] for r in reports)
            results[phase] = (len(times) / wall, times, server_cpu / len(times),
                              sum(r["cpu"] for r in reports) / len(times),
                              server_busy / window, sum(r["busy"] for r in reports) / wall)
        for client in clients:
            client.wait()
    finally:
        server.stop()
    print(f"{PROCESSES} processes x {AGENTS} agents ({PROCESSES * AGENTS} connections), "
          f"raw client in {args.procs} process(es); cost = µs of CPU per acknowledged request, "
          f"server/client; busy = share of the time running or waiting for a core")
    for phase, label in (("process.turn", "acknowledged turns/s"), ("host.ping", "round trips/s")):
        rate, times, s_cpu, c_cpu, s_busy, c_busy = results[phase]
        print(f"{phase:<13} {rate:8.0f} {label:<21} p50 {percentile(times, 0.5) * 1000:6.1f} ms"
              f"  p99 {percentile(times, 0.99) * 1000:6.1f} ms  cost {s_cpu * 1e6:5.0f}/"
              f"{c_cpu * 1e6:<5.0f} busy {s_busy * 100:3.0f}%/{c_busy * 100:.0f}%")
    t_rate, turns = results["process.turn"][:2]
    p_rate, pings = results["host.ping"][:2]
    print(f"durable turn vs bare round trip: throughput ratio {t_rate / p_rate:.2f}, "
          f"p99 ratio {percentile(turns, 0.99) / percentile(pings, 0.99):.2f}, "
          f"server CPU ratio {results['host.ping'][2] / results['process.turn'][2]:.2f}")


if __name__ == "__main__":
    main()
