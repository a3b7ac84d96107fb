"""Round trips: the host against a bare echo server of the same transport, same client.

Both servers run in processes of their own (bench/echo.py for the echo), so
both pay the same process hops and have a core to themselves.

    python bench/roundtrip.py [--seconds 3] [--quick] [--procs 1] [--client raw|trio]
                              [--transports trio-websocket,websockets,tcp] [--counts 1,10,100]
                              [--rounds 3]

For each transport: the host serving WebSocket with ``[host] websocket =
"trio-websocket"`` against a bare trio-websocket echo; with ``"websockets"``
against a bare echo on the ``websockets`` library's trio server; and its line
JSON over TCP (``[transports.tcp]``) against a bare trio TCP line echo. At 1,
10 and 100 connections: round trips/s, p50 and p99, for ``host.ping`` and for
the most trivial world-changing action (``bench.touch`` from
bench/bench_plugin.py: one record, journaled, answered once durable), each as a
ratio of the echo server's figures measured in the same run. Targets at 10
connections: ping >= 0.8 of echo, the durable action >= 0.6. ``cpu ratio`` is
the echo server's CPU per round trip over the host's: what the ratio would be
if each server had a core to itself and nothing else limited it, a steadier
figure on a loaded machine. Host and echo are measured in turn ``--rounds``
times (3): the row is the round with the median ratio, and ``ratios`` the
lowest and highest (a machine this noisy moves one run's ratio by a quarter).

The client is bench/rawclient.py (plain sockets, epoll, hand-rolled frames or
lines) in ``--procs`` processes, cheap enough that the server is the
bottleneck; each row shows the CPU both sides spend per round trip, the share
of a core each uses (the server's from /proc/PID/stat, the client's from its
getrusage) and the share of the time each was busy, running or waiting for a
core (from /proc/PID/schedstat): on a loaded machine neither may get a whole
core, but the bottleneck is the side that is busy all the time. ``--client
trio`` drives the WebSocket servers with the trio client of the other
benchmarks instead (about 100 µs of CPU a round trip: there the client is the
limit).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import trio

from common import drive, host_process, open_conns, percentile, run, spawn_server, workdir
from rawclient import cpu_seconds, run_wait_seconds
from serverproc import free_port

HERE = Path(__file__).parent
TICKS = os.sysconf("SC_CLK_TCK")


def process_cpu(pid: int) -> float:
    """A process's user and system CPU seconds, all its threads (from /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


@dataclass
class Result:
    """One measurement: throughput, latency and what it cost each side."""

    rate: float
    p50: float
    p99: float
    server_cpu: float  # seconds of server CPU per round trip
    server_share: float  # of one core, over the window
    client_cpu: float
    client_share: float  # of one core, all client processes together
    server_busy: float  # share of the window running or waiting for a core
    client_busy: float


class RawClients:
    """``count`` connections spread over ``procs`` rawclient processes (``args`` more
    of its arguments), each phase (an ``--action`` of several) started together."""

    def __init__(self, url: str, count: int, procs: int, args: list[str]) -> None:
        procs = max(1, min(procs, count))
        self.clients = []
        for p in range(procs):
            share = count // procs + (p < count % procs)
            first = p * (count // procs) + min(p, count % procs)
            cmd = [sys.executable, str(HERE / "rawclient.py"), url, "--conns", str(share),
                   "--first", str(first), *args]
            self.clients.append(subprocess.Popen(cmd, stdin=subprocess.PIPE,
                                                 stdout=subprocess.PIPE, text=True))

    def phase(self, server_pid: int) -> Result:
        """Wait until every client is ready, start them, and measure both sides."""
        for client in self.clients:
            assert client.stdout is not None
            if client.stdout.readline().strip() != "ready":
                raise RuntimeError(f"client failed: {client.wait()}")
        server_before, busy_before = process_cpu(server_pid), sum(run_wait_seconds(server_pid))
        started = time.perf_counter()
        for client in self.clients:
            assert client.stdin is not None
            client.stdin.write("go\n")
            client.stdin.flush()
        reports = []
        for client in self.clients:
            assert client.stdout is not None
            reports.append(json.loads(client.stdout.readline()))
        server = process_cpu(server_pid) - server_before
        server_busy = sum(run_wait_seconds(server_pid)) - busy_before
        server_wall = time.perf_counter() - started  # the same window as the server's figures
        wall = max(r["wall"] for r in reports)
        times = [us / 1e6 for r in reports for us in r["us"]]
        cpu = sum(r["cpu"] for r in reports)
        return Result(len(times) / wall, percentile(times, 0.5), percentile(times, 0.99),
                      server / len(times), server / server_wall, cpu / len(times), cpu / wall,
                      server_busy / server_wall, sum(r["busy"] for r in reports) / wall)

    def wait(self) -> None:
        for client in self.clients:
            client.wait()


def measure_raw(url: str, server_pid: int, count: int, seconds: float, action: str,
                session: bool, line: bool, procs: int) -> Result:
    """``count`` connections spread over ``procs`` rawclient processes, started together."""
    clients = RawClients(url, count, procs, ["--action", action, "--seconds", str(seconds),
                                             *["--session"] * session, *["--line"] * line])
    result = clients.phase(server_pid)
    clients.wait()
    return result


def measure_trio(url: str, server_pid: int, count: int, seconds: float, action: str,
                 session: bool) -> Result:
    """The old way: the trio client of the other benchmarks, in this process."""
    def make(index: int, i: int) -> tuple[str, dict]:
        if action == "bench.touch":
            return "bench.touch", {"key": f"k{index}", "n": i}
        return "host.ping", {"n": i}

    async def bench() -> tuple[list[float], float, float, float, float, float]:
        async with trio.open_nursery() as nursery:
            conns = await open_conns(nursery, url, count, session)
            await drive(conns, 0.3, make)  # warm up
            server, client, started = process_cpu(server_pid), cpu_seconds(), time.perf_counter()
            server_busy, client_busy = sum(run_wait_seconds(server_pid)), sum(run_wait_seconds())
            latencies = await drive(conns, seconds, make)
            wall = time.perf_counter() - started
            server, client = process_cpu(server_pid) - server, cpu_seconds() - client
            server_busy = sum(run_wait_seconds(server_pid)) - server_busy
            client_busy = sum(run_wait_seconds()) - client_busy
            for conn in conns:
                await conn.ws.aclose()
            nursery.cancel_scope.cancel()
        return latencies, wall, server, client, server_busy, client_busy

    times: list[float] = []
    out: list[float] = []

    async def main() -> None:
        latencies, *rest = await bench()
        times.extend(latencies)
        out.extend(rest)
    run(main)
    wall, server, client, server_busy, client_busy = out
    return Result(len(times) / wall, percentile(times, 0.5), percentile(times, 0.99),
                  server / len(times), server / wall, client / len(times), client / wall,
                  server_busy / wall, client_busy / wall)


def cost(r: Result) -> str:
    """Server/client: µs of CPU per round trip, % of a core used, % of the time busy."""
    return (f"{r.server_cpu * 1e6:>4.0f}/{r.client_cpu * 1e6:<4.0f}"
            f"{r.server_share * 100:>4.0f}/{r.client_share * 100:<3.0f}"
            f"{r.server_busy * 100:>4.0f}/{r.client_busy * 100:<3.0f}")


ECHO_FLAGS = {"trio-websocket": (), "websockets": ("--websockets",), "tcp": ("--tcp",)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--quick", action="store_true", help="1 s a measurement")
    parser.add_argument("--procs", type=int, default=1, help="client processes (raw client)")
    parser.add_argument("--client", choices=("raw", "trio"), default="raw")
    parser.add_argument("--counts", default="1,10,100", help="connection counts")
    parser.add_argument("--transports", default="trio-websocket,websockets,tcp",
                        help="which of trio-websocket, websockets (the host's [host] "
                             "websocket, each against an echo of the same library) and tcp "
                             "(the host's [transports.tcp] against a bare TCP line echo)")
    parser.add_argument("--actions", default="host.ping,bench.touch")
    parser.add_argument("--rounds", type=int, default=3,
                        help="host and echo measured in turn this many times; the round "
                             "with the median ratio is shown, with the range of the ratios")
    parser.add_argument("--journal-commits", choices=("thread", "loop"), default=None,
                        help="the host's [store] journal_commits (default: the host's own)")
    args = parser.parse_args()
    seconds = 1.0 if args.quick else args.seconds
    counts = [int(c) for c in args.counts.split(",")]
    transports = args.transports.split(",")
    if args.client == "trio" and "tcp" in transports:
        transports.remove("tcp")  # the trio client speaks WebSocket only
    extra = (f'[store]\njournal_commits = "{args.journal_commits}"\n'
             if args.journal_commits else "")

    def measure(url: str, pid: int, count: int, action: str, session: bool,
                line: bool = False) -> Result:
        if args.client == "trio":
            return measure_trio(url, pid, count, seconds, action, session)
        return measure_raw(url, pid, count, seconds, action, session, line, args.procs)

    print(f"client: {args.client}" + (f", {args.procs} process(es)" if args.client == "raw" else "")
          + f", {seconds:g} s a measurement; cost = server/client: µs of CPU per round trip, "
          "% of a core used, % of the time busy (running or waiting for a core)", flush=True)
    print(f"{'transport':<14} {'action':<11} {'conns':>5} {'host rt/s':>10} {'echo rt/s':>10} "
          f"{'ratio':>6} {'cpu ratio':>9} {'host p50':>9} {'host p99':>9} {'echo p50':>9} "
          f"{'echo p99':>9}  {'host cost':<25} {'echo cost':<25} {'ratios':<9}", flush=True)
    for transport in transports:
        line = transport == "tcp"
        port = free_port()
        host = "" if line else f'websocket = "{transport}"\n'
        tcp = f"[transports.tcp]\nenabled = true\nport = {port}\n" if line else ""
        server = host_process(workdir(), extra + tcp, host=host).start()
        assert server.proc is not None
        echo, echo_port = spawn_server("echo.py", *ECHO_FLAGS[transport])
        if line:
            host_url, echo_url = f"tcp://127.0.0.1:{port}", f"tcp://127.0.0.1:{echo_port}"
        else:
            host_url, echo_url = server.url, f"ws://127.0.0.1:{echo_port}/"
        try:
            for action in args.actions.split(","):
                for count in counts:
                    rounds = sorted(
                        ((measure(host_url, server.proc.pid, count, action, True, line),
                          measure(echo_url, echo.pid, count, action, False, line))
                         for _ in range(max(1, args.rounds))),
                        key=lambda he: he[0].rate / he[1].rate)
                    h, e = rounds[len(rounds) // 2]
                    low, high = (r[0].rate / r[1].rate for r in (rounds[0], rounds[-1]))
                    print(f"{transport:<14} {action:<11} {count:>5} {h.rate:>10.0f} "
                          f"{e.rate:>10.0f} {h.rate / e.rate:>6.2f} "
                          f"{e.server_cpu / h.server_cpu:>9.2f} {h.p50 * 1000:>7.2f}ms "
                          f"{h.p99 * 1000:>7.2f}ms {e.p50 * 1000:>7.2f}ms "
                          f"{e.p99 * 1000:>7.2f}ms  {cost(h):<25} {cost(e):<25} "
                          f"{low:.2f}-{high:.2f}", flush=True)
        finally:
            server.stop()
            echo.kill()
            echo.wait()


if __name__ == "__main__":
    main()
