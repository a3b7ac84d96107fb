"""Sessions: memory per idle session, time to open 500, and the cost of the gate.

    python bench/sessions.py [--sessions 500]

Prints the host's resident memory growth per idle connected session at N
(the best-known peer uses about 45 KB per idle client), the time to open N
sessions, and the cost of the rate limiter and role check as a ratio of
``host.ping`` round-trip time with them on vs off (the gate's own cost measured
in the same run, over the same round trips).
"""

from __future__ import annotations

import argparse
import time

import trio

from common import drive, host_process, open_conns, percentile, run, workdir
from host.actions import Role
from host.gateway import Gateway
from host.limits import TokenBucket


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def gate_cost_s(rounds: int = 200_000) -> float:
    """Seconds per request spent in the token bucket and the role check."""
    bucket = TokenBucket(1e9, 10**9)

    class S:
        role = "player"

    class A:
        name = "host.ping"
        role = Role.viewer

    check = Gateway.check
    started = time.perf_counter()
    for i in range(rounds):
        bucket.take(i * 1e-6)
        check(None, None, A, S)  # type: ignore[arg-type]
    return (time.perf_counter() - started) / rounds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", type=int, default=500)
    args = parser.parse_args()
    folder = workdir()
    server = host_process(folder).start()

    async def bench() -> None:
        async with trio.open_nursery() as nursery:
            await trio.sleep(0.5)
            before = rss_kb(server.proc.pid)
            started = time.perf_counter()
            conns = await open_conns(nursery, server.url, args.sessions, True)
            opened = time.perf_counter() - started
            await trio.sleep(1.0)
            after = rss_kb(server.proc.pid)
            per = (after - before) / args.sessions
            print(f"{args.sessions} idle sessions: {per:.1f} KB resident each "
                  f"(best-known peer: about 45 KB)")
            print(f"opening {args.sessions} sessions took {opened:.2f} s "
                  f"({opened / args.sessions * 1000:.2f} ms each)")
            pings = await drive(conns[:10], 3.0, lambda index, i: ("host.ping", {"i": i}))
            nursery.cancel_scope.cancel()
        rtt = percentile(pings, 0.5)
        cost = gate_cost_s()
        print(f"gate (rate limiter + role check): {cost * 1e6:.2f} us per request; "
              f"host.ping p50 {rtt * 1000:.3f} ms with it, ratio on/off "
              f"{rtt / (rtt - cost):.3f}")

    try:
        run(bench)
    finally:
        server.stop()


if __name__ == "__main__":
    main()
