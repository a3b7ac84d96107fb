"""Sessions: memory per idle session, time to open 500, and the cost of the gate.

    python bench/sessions.py [--sessions 500]

Prints the host's resident memory growth per idle connected session at N
(the best-known peer uses about 45 KB per idle client), the time to open N
sessions, and the cost of the rate limiter as a ratio of ``host.ping`` round
trips with it on vs off (``rate_per_s = 0``), alternating runs in the same
invocation, next to what the limiter and the role check cost per request.
"""

from __future__ import annotations

import argparse
import time

import trio

from common import drive, host_process, open_conns, percentile, run, workdir
from host.actions import Role
from host.config import Config
from host.gate import SessionGate
from host.limits import TokenBucket
from host.messages import Request


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

    check = SessionGate(Config(), None, None, time.time).check  # type: ignore[arg-type]
    request = Request("host.ping", {}, id=1, has_id=True)
    started = time.perf_counter()
    for i in range(rounds):
        bucket.take(i * 1e-6)
        check(request, A, S)  # type: ignore[arg-type]
    return (time.perf_counter() - started) / rounds


async def ping_p50(extra_config: str, seconds: float, rate: float = 1e6) -> float:
    folder = workdir()
    server = host_process(folder, extra_config, rate=rate).start()
    try:
        async with trio.open_nursery() as nursery:
            conns = await open_conns(nursery, server.url, 10, True)
            await drive(conns, 0.5, lambda index, i: ("host.ping", {"i": i}))
            pings = await drive(conns, seconds, lambda index, i: ("host.ping", {"i": i}))
            nursery.cancel_scope.cancel()
    finally:
        server.stop()
    return percentile(pings, 0.5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", type=int, default=500)
    parser.add_argument("--seconds", type=float, default=3.0)
    args = parser.parse_args()
    folder = workdir()
    server = host_process(folder).start()

    async def bench() -> None:
        async with trio.open_nursery() as nursery:
            await trio.sleep(0.5)
            before = rss_kb(server.proc.pid)
            started = time.perf_counter()
            await open_conns(nursery, server.url, args.sessions, True)
            opened = time.perf_counter() - started
            await trio.sleep(1.0)
            after = rss_kb(server.proc.pid)
            nursery.cancel_scope.cancel()
        server.stop()
        print(f"{args.sessions} idle sessions: {(after - before) / args.sessions:.1f} KB "
              f"resident each (best-known peer: about 45 KB)")
        print(f"opening {args.sessions} sessions took {opened:.2f} s "
              f"({opened / args.sessions * 1000:.2f} ms each)")
        # the rate limiter on (a limit no ping reaches) vs off (rate_per_s = 0), same clients
        ons, offs = [], []
        for _ in range(3):  # alternate, so drift on a noisy machine hits both alike
            ons.append(await ping_p50("", args.seconds))
            offs.append(await ping_p50("", args.seconds, rate=0.0))
        on, off = sorted(ons)[1], sorted(offs)[1]
        cost = gate_cost_s()
        print(f"host.ping p50 with the rate limiter on {on * 1000:.3f} ms, off "
              f"{off * 1000:.3f} ms: ratio {on / off:.3f}; the limiter and the role check "
              f"themselves take {cost * 1e6:.2f} us per request "
              f"({cost / on * 100:.2f}% of a round trip)")

    run(bench)


if __name__ == "__main__":
    main()
