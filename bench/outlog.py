"""The cost of the outbound log: durable round trips with it on versus off.

Two hosts in processes of their own, the same but for ``[sessions] outbound_log``,
measured in the same run, alternately (on, off, on, off, ...) so that a machine
busy with something else weighs on both alike:

    python bench/outlog.py [--seconds 3] [--counts 1,10] [--rounds 2]
                           [--journal-commits thread|loop]

For ``bench.touch`` (the most trivial world-changing action, answered once
durable; bench/bench_plugin.py) and ``host.ping``: round trips/s with the log on
and off, and their ratio (target for the durable action: >= 0.9); ``cpu ratio``
is the host's CPU per round trip with the log off over on, the steadier figure
on a loaded machine.
"""

from __future__ import annotations

import argparse

from common import host_process, workdir
from roundtrip import measure_raw


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--counts", default="1,10", help="connection counts")
    parser.add_argument("--rounds", type=int, default=2, help="measurements of each, alternated")
    parser.add_argument("--journal-commits", choices=("thread", "loop"), default="thread")
    args = parser.parse_args()
    hosts = {}
    for on in (True, False):
        server = host_process(workdir(), f'[store]\njournal_commits = "{args.journal_commits}"\n')
        assert server.config is not None
        text = server.config.read_text()  # (the bench config has a [sessions] table already)
        server.config.write_text(text.replace("[sessions]\n", f"[sessions]\noutbound_log = "
                                              f"{str(on).lower()}\n"))
        hosts[on] = server.start()
    print(f"journal commits: {args.journal_commits}; {args.seconds:g} s a measurement, "
          f"{args.rounds} of each, alternated")
    print(f"{'action':<11} {'conns':>5} {'log on rt/s':>12} {'log off rt/s':>13} {'ratio':>6} "
          f"{'cpu ratio':>9} {'on p50':>8} {'off p50':>8}")
    try:
        for action in ("bench.touch", "host.ping"):
            for count in [int(c) for c in args.counts.split(",")]:
                rates: dict[bool, list[float]] = {True: [], False: []}
                p50: dict[bool, list[float]] = {True: [], False: []}
                cpu: dict[bool, list[float]] = {True: [], False: []}
                for _ in range(args.rounds):
                    for on, server in hosts.items():
                        assert server.proc is not None
                        r = measure_raw(server.url, server.proc.pid, count, args.seconds,
                                        action, True, False, 1)
                        rates[on].append(r.rate)
                        p50[on].append(r.p50)
                        cpu[on].append(r.server_cpu)
                on_rate, off_rate = (sum(rates[k]) / len(rates[k]) for k in (True, False))
                print(f"{action:<11} {count:>5} {on_rate:>12.0f} {off_rate:>13.0f} "
                      f"{on_rate / off_rate:>6.2f} {min(cpu[False]) / min(cpu[True]):>9.2f} "
                      f"{min(p50[True]) * 1000:>6.2f}ms "
                      f"{min(p50[False]) * 1000:>6.2f}ms", flush=True)
    finally:
        for server in hosts.values():
            server.stop()


if __name__ == "__main__":
    main()
