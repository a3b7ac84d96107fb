"""How close the host comes to the cheapest servers that do the same job.

    python bench/floor.py [--seconds 3] [--counts 10] [--rounds 3]

Measured in the same run, in turn, each in a process of its own, with the
same raw client (bench/rawclient.py) and the same payloads:

- ``echo``: the bare echo on the ``websockets`` library's trio server
  (bench/echo.py), bench/roundtrip.py's baseline;
- ``durable echo``: the same echo answering each message only once a SQLite
  commit holds it, group-committed (bench/durable_echo.py), in the event loop,
  on a writer thread, or on a writer thread waited for briefly as the host's
  are: the floor under any durable round trip in Python on this machine;
- the host (``[host] websocket = "websockets"``): ``host.ping``, and
  ``bench.touch`` with its journal commits on the thread (the default) and in
  the loop.

Each row gives round trips/s, its ratio to the echo's and to the floor it is
held to (the echo for a ping, the durable echo that commits the same way for
a durable action: the one committing in the loop for the host's loop commits,
the cheaper of the two on a thread for its thread commits), and the server's
CPU per round trip. Every ratio is the
median over ``--rounds`` rounds of the ratio within a round (a machine this
noisy moves one run's ratio by a quarter), with the lowest and highest.
"""

from __future__ import annotations

import argparse
import statistics

from common import host_process, spawn_server, workdir
from roundtrip import Result, measure_raw

# name, action, the server it is measured on, and the server its floor is measured on
ROWS = [
    ("echo", "host.ping", "echo", "echo"),
    ("durable echo (loop)", "bench.touch", "durable-loop", "echo"),
    ("durable echo (thread)", "bench.touch", "durable-thread", "echo"),
    ("durable echo (thread-wait)", "bench.touch", "durable-thread-wait", "echo"),
    ("host host.ping", "host.ping", "host", "echo"),
    ("host bench.touch (thread)", "bench.touch", "host", "durable-thread"),
    ("host bench.touch (loop)", "bench.touch", "host-loop", "durable-loop"),
]


def spread(rounds: list[dict[str, Result]], name: str, base: str) -> str:
    """The median of the rounds' ratios of ``name`` to ``base``, lowest-highest."""
    ratios = sorted(r[name].rate / r[base].rate for r in rounds)
    return f"{statistics.median(ratios):.2f} ({ratios[0]:.2f}-{ratios[-1]:.2f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--counts", default="10", help="connection counts")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    host = host_process(workdir(), host='websocket = "websockets"\n').start()
    host_loop = host_process(workdir(), '[store]\njournal_commits = "loop"\n',
                             host='websocket = "websockets"\n').start()
    echoes = {"echo": spawn_server("echo.py", "--websockets"),
              **{f"durable-{mode}": spawn_server("durable_echo.py", mode)
                 for mode in ("loop", "thread", "thread-wait")}}
    servers = {  # name -> (url, pid, whether the client opens a session)
        "host": (host.url, host.proc.pid, True),  # type: ignore[union-attr]
        "host-loop": (host_loop.url, host_loop.proc.pid, True),  # type: ignore[union-attr]
        **{name: (f"ws://127.0.0.1:{port}/", proc.pid, False)
           for name, (proc, port) in echoes.items()},
    }
    print(f"raw client, 1 process; {args.seconds:g} s a measurement, {args.rounds} rounds; "
          f"ratios: the median of the rounds' (lowest-highest); cpu: the server's µs a round trip")
    print(f"{'server':<27} {'conns':>5} {'rt/s':>7} {'vs echo':>16} {'vs its floor':>17} "
          f"{'floor':<26} {'cpu':>5}")
    try:
        for count in [int(c) for c in args.counts.split(",")]:
            rounds: list[dict[str, Result]] = []
            for _ in range(max(1, args.rounds)):
                measured: dict[str, Result] = {}
                for name, action, server, _floor in ROWS:
                    url, pid, session = servers[server]
                    measured[name] = measure_raw(url, pid, count, args.seconds, action,
                                                 session, False, 1)
                rounds.append(measured)
            names = {server: name for name, _, server, _ in ROWS[:4]}
            cheaper = max(("durable-thread", "durable-thread-wait"),
                          key=lambda s: statistics.median(r[names[s]].rate for r in rounds))
            for name, _action, _server, floor in ROWS:
                floor = cheaper if floor == "durable-thread" else floor
                rate = statistics.median(r[name].rate for r in rounds)
                cpu = statistics.median(r[name].server_cpu for r in rounds) * 1e6
                print(f"{name:<27} {count:>5} {rate:>7.0f} {spread(rounds, name, 'echo'):>16} "
                      f"{spread(rounds, name, names[floor]):>17} {names[floor]:<26} "
                      f"{cpu:>5.0f}", flush=True)
    finally:
        host.stop()
        host_loop.stop()
        for proc, _ in echoes.values():
            proc.kill()
            proc.wait()


if __name__ == "__main__":
    main()
