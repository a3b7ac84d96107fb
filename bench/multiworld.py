"""Several worlds on one host: throughput spread over worlds, and one world's latency
while another imports a big map.

    python bench/multiworld.py [--seconds 3] [--worlds 20] [--clients 10] [--procs 2] [--nodes 100000]

1. Throughput. ``--worlds`` x ``--clients`` connections (bench/rawclient.py, the cheap
   client of bench/roundtrip.py, in ``--procs`` processes), each joined to one of
   ``--worlds`` worlds, make round trips back to back: ``host.ping``, then
   ``bench.touch`` (bench/bench_plugin.py: one record written, journaled and answered
   once durable). The same number of connections all joined to one world is measured
   in the same run; ``ratio`` is the many-worlds round trips/s over the one-world's.
2. Latency while another world imports. ``--clients`` connections in one world make
   round trips while an admin in another world imports a map of ``--nodes`` nodes (a
   grid, one-way edges right and down; tests/worlds.py), against the same load with
   no import. p99 counts round trips, so a stall of the whole host shows less in it
   than in ``max`` (each connection has one request outstanding: a stall of S seconds
   is one round trip of S per connection); both are printed. Each window is 1.5 times
   as long as the import took with nothing else running, so the import (slower under
   load) ends inside it; a round trip still waiting at the end is waited for (up to
   10 minutes) and counted.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from common import ADMIN, ServerProcess, config_file, open_conns, percentile, run, workdir
from host.client import connect
from roundtrip import RawClients, process_cpu
from worlds import grid_map  # tests/worlds.py: common puts tests/ first on the path

HERE = Path(__file__).parent
ACTIONS = ("host.ping", "bench.touch")


@dataclass
class Result:
    """One window: round trips/s, latency, and the server's CPU per round trip."""

    rate: float
    p50: float
    p99: float
    worst: float
    server_cpu: float


class Load:
    """``count`` rawclient connections over ``procs`` processes, each joined to one of
    ``worlds`` in turn; ``go()`` starts their window, ``result()`` waits for its end."""

    def __init__(self, url: str, server_pid: int, count: int, action: str, seconds: float,
                 worlds: list[str], procs: int) -> None:
        self.server_pid = server_pid
        self.clients = RawClients(url, count, procs, [
            "--action", action, "--seconds", str(seconds), "--session",
            "--join", ",".join(worlds), "--grace", "600"]).clients
        for client in self.clients:
            assert client.stdout is not None
            if client.stdout.readline().strip() != "ready":
                raise RuntimeError(f"client failed: {client.wait()}")

    def go(self) -> None:
        self.cpu = process_cpu(self.server_pid)
        for client in self.clients:
            assert client.stdin is not None
            client.stdin.write("go\n")
            client.stdin.flush()

    def result(self) -> Result:
        reports = []
        for client in self.clients:
            assert client.stdout is not None
            line = client.stdout.readline()
            if not line:
                raise RuntimeError(f"client failed: {client.wait()}")
            reports.append(json.loads(line))
            client.wait()
        cpu = process_cpu(self.server_pid) - self.cpu
        wall = max(r["wall"] for r in reports)
        times = [us / 1e6 for r in reports for us in r["us"]]
        return Result(len(times) / wall, percentile(times, 0.5), percentile(times, 0.99),
                      max(times), cpu / len(times))


def measure(url: str, pid: int, count: int, action: str, seconds: float, worlds: list[str],
            procs: int) -> Result:
    load = Load(url, pid, count, action, seconds, worlds, procs)
    load.go()
    return load.result()


def create_worlds(url: str, ids: list[str]) -> None:
    """Create the worlds and load each (an admin joins it): the windows measure worlds
    being served, not being opened, and the clients' joins stay within auth_timeout_s."""
    async def create() -> None:
        async with trio.open_nursery() as nursery:
            admin = (await open_conns(nursery, url, 1, True, admin=True))[0]
            for world_id in ids:
                reply = await admin.call("world.create", {"world_id": world_id})
                if reply["signal"] != "world.created":
                    raise RuntimeError(f"world.create {world_id}: {reply['data']}")
                reply = await admin.call("world.join", {"world_id": world_id})
                if reply["signal"] != "world.joined":
                    raise RuntimeError(f"world.join {world_id}: {reply['data']}")
            await admin.ws.aclose()
            nursery.cancel_scope.cancel()
    run(create)


def import_map(url: str, world_id: str, map_data: dict[str, Any]) -> float:
    """Seconds from sending ``map.import`` (encoding and chunking included) to its reply."""
    took: list[float] = []

    async def send() -> None:
        async with connect(url, name="importer", token=ADMIN, reconnect=False,
                           timeout=600) as admin:
            await admin.call("world.join", world_id=world_id)
            started = time.perf_counter()
            reply = await admin.call("map.import", map_data=map_data)
            took.append(time.perf_counter() - started)
            if reply["nodes"] != len(map_data["nodes"]):
                raise RuntimeError(f"map.import: {reply}")
            await admin.call("session.close")
    run(send)
    return took[0]


def row(label: str, r: Result) -> str:
    return (f"{label:<26} {r.rate:>9.0f} {r.p50 * 1000:>8.2f}ms {r.p99 * 1000:>8.2f}ms "
            f"{r.worst * 1000:>9.1f}ms {r.server_cpu * 1e6:>7.0f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="each throughput window")
    parser.add_argument("--worlds", type=int, default=20)
    parser.add_argument("--clients", type=int, default=10, help="connections per world")
    parser.add_argument("--procs", type=int, default=2, help="rawclient processes")
    parser.add_argument("--nodes", type=int, default=100_000, help="nodes in the imported map")
    parser.add_argument("--quick", action="store_true", help="1 s windows, a 20,000-node map")
    args = parser.parse_args()
    if args.quick:
        args.seconds, args.nodes = 1.0, min(args.nodes, 20_000)
    folder = workdir()
    config = config_file(folder)  # common's, with time for 100 sessions a client process
    config.write_text(config.read_text().replace("[sessions]\n", "[sessions]\nauth_timeout_s = 120\n"))
    server = ServerProcess(folder / "bench.db", config=config,
                           env={"PYTHONPATH": str(HERE)}).start()
    assert server.proc is not None
    pid, url = server.proc.pid, server.url
    many = [f"w{i}" for i in range(args.worlds)]
    count = args.worlds * args.clients
    header = (f"{'':<26} {'rt/s':>9} {'p50':>10} {'p99':>10} {'max':>11} {'µs/rt':>7}")
    try:
        create_worlds(url, ["solo", *many, "quiet", "big"])
        print(f"{count} connections, {args.seconds:g} s a window, {args.procs} client "
              f"process(es); µs/rt: server CPU per round trip", flush=True)
        print(header, flush=True)
        for action in ACTIONS:
            one = measure(url, pid, count, action, args.seconds, ["solo"], args.procs)
            print(row(f"{action} 1 world", one), flush=True)
            spread = measure(url, pid, count, action, args.seconds, many, args.procs)
            print(row(f"{action} {args.worlds} worlds", spread) +
                  f"   ratio {spread.rate / one.rate:.2f}", flush=True)

        width = max(1, round((args.nodes * 2.5) ** 0.5))  # a 2.5:1 grid
        height = max(1, -(-args.nodes // width))
        map_data = grid_map(width, height, two_way=False)
        map_data["nodes"] = map_data["nodes"][:args.nodes]
        kept = {n["id"] for n in map_data["nodes"]}
        map_data["edges"] = [e for e in map_data["edges"] if {e["from"], e["to"]} <= kept]
        alone = import_map(url, "big", map_data)
        window = max(1.0, 1.5 * alone)  # the import is slower under load: let it end inside
        print(f"\n{args.clients} connections in one world while another imports a "
              f"{len(map_data['nodes'])}-node, {len(map_data['edges'])}-edge map "
              f"(the import alone: {alone:.2f} s, encoding and sending included; "
              f"windows of {window:.2f} s)", flush=True)
        print(header, flush=True)
        for action in ACTIONS:
            quiet = measure(url, pid, args.clients, action, window, ["quiet"], 1)
            print(row(f"{action} no import", quiet), flush=True)
            load = Load(url, pid, args.clients, action, window, ["quiet"], 1)
            load.go()
            took = import_map(url, "big", map_data)
            busy = load.result()
            print(row(f"{action} during import", busy) +
                  f"   p99 x{busy.p99 / quiet.p99:.1f}, max x{busy.worst / quiet.worst:.1f}"
                  f" (import {took:.2f} s)", flush=True)
    finally:
        server.stop(timeout=120)  # the shutdown checkpoints every loaded world, big ones too


if __name__ == "__main__":
    main()
