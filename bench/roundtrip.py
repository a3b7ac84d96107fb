"""Round trips: the host against a bare trio-websocket echo server, same client.

Both servers run in processes of their own (bench/echo.py for the echo), so
both pay the same process hops and have a core to themselves.

    python bench/roundtrip.py [--seconds 3]

At 1, 10 and 100 connections: round trips/s, p50 and p99, for ``host.ping`` and
for the most trivial world-changing action (``bench.touch`` from
bench/bench_plugin.py: one record, journaled, answered once durable), each as a ratio of the echo server's figures measured in the same run.
Targets at 10 connections: ping >= 0.8 of echo, the durable action >= 0.7.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import trio

from common import drive, host_process, open_conns, percentile, run, workdir


async def measure(url: str, host: bool, count: int, seconds: float, action: str) -> tuple[float, float, float]:
    async with trio.open_nursery() as nursery:
        conns = await open_conns(nursery, url, count, host)

        def make(index: int, i: int) -> tuple[str, dict]:
            if action == "bench.touch":
                return "bench.touch", {"key": f"k{index}", "n": i}
            return "host.ping", {"n": i}
        await drive(conns, 0.3, make)  # warm up
        latencies = await drive(conns, seconds, make)
        for conn in conns:
            await conn.ws.aclose()
        nursery.cancel_scope.cancel()
    return len(latencies) / seconds, percentile(latencies, 0.5), percentile(latencies, 0.99)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    args = parser.parse_args()
    folder = workdir()
    server = host_process(folder).start()

    echo = subprocess.Popen([sys.executable, str(Path(__file__).parent / "echo.py")],
                            stdout=subprocess.PIPE, text=True)
    assert echo.stdout is not None
    echo_url = f"ws://127.0.0.1:{int(echo.stdout.readline())}/"

    async def bench() -> None:
        async with trio.open_nursery() as nursery:
            print(f"{'action':<11} {'conns':>5} {'host rt/s':>10} {'echo rt/s':>10} "
                  f"{'ratio':>6} {'host p50':>9} {'host p99':>9} {'echo p50':>9} {'echo p99':>9}")
            for action in ("host.ping", "bench.touch"):
                for count in (1, 10, 100):
                    h = await measure(server.url, True, count, args.seconds, action)
                    e = await measure(echo_url, False, count, args.seconds, action)
                    print(f"{action:<11} {count:>5} {h[0]:>10.0f} {e[0]:>10.0f} {h[0] / e[0]:>6.2f} "
                          f"{h[1] * 1000:>7.2f}ms {h[2] * 1000:>7.2f}ms "
                          f"{e[1] * 1000:>7.2f}ms {e[2] * 1000:>7.2f}ms", flush=True)
            nursery.cancel_scope.cancel()

    try:
        run(bench)
    finally:
        server.stop()
        echo.kill()


if __name__ == "__main__":
    main()
