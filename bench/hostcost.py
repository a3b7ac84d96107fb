"""The host's own cost per request: no socket, no WebSocket, no client process.

    python bench/hostcost.py [--requests 20000] [--actions host.ping,bench.touch]

A connection of the real transport, session gate, dispatcher, saver and store
(the harness, host/testing.py, with the bench plugin) reads its requests from
a channel that costs nothing: each is a JSON text already in memory, handed
over after one turn of the scheduler, and what the host sends is counted and
dropped. The baseline, measured in the same run, is the same channel driven by
a bare echo loop (read one, send it back): the scheduler's turn and the
channel's own calls. What the host adds over it is its own work per request:
decode, envelope and limits, routing, the action, the reply's seq, replay
buffer and outbound log, the write.

The figure is CPU per request over 500-request stretches, the cheapest
stretch of the run (the machines are noisy: a stretch that was interrupted
only costs more), and the quarter point of them; ``ratio`` is the echo
loop's over the host's, as bench/roundtrip.py shows its ratios. A world-changing
action includes its commit on the writer thread (CPU of the whole process).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import trio

import bench_plugin
from host.testing import open_harness

STRETCH = 500


class MemoryChannel:
    """Requests from memory, one a scheduler turn; what is sent is counted."""

    pings = False
    writable_now = True
    backlog = False
    closed = False
    pending = False  # one a turn: never read together

    def __init__(self, messages: list[str]) -> None:
        self.messages = messages
        self.read = 0
        self.sent = 0
        self.marks: list[float] = []  # process CPU time at every STRETCH-th request
        self.done = trio.Event()

    async def receive(self) -> str:
        await trio.lowlevel.checkpoint()
        if self.read == len(self.messages):
            self.done.set()
            await trio.sleep_forever()
        message = self.messages[self.read]
        self.read += 1
        if self.read % STRETCH == 0:
            self.marks.append(time.process_time())
        return message

    async def send(self, frame: str | bytes) -> None:
        await self.send_many([frame])

    async def send_many(self, frames: list[str | bytes]) -> None:
        self.sent += len(frames)
        await trio.lowlevel.checkpoint()

    def send_now(self, frames: list[str | bytes]) -> None:
        self.sent += len(frames)

    async def ping(self) -> None:
        pass

    async def close(self, code: int, reason: str) -> None:
        self.closed = True

    def per_request(self) -> tuple[float, float]:
        """µs of CPU per request: the cheapest stretch, and the quarter point."""
        costs = sorted((b - a) / STRETCH * 1e6 for a, b in zip(self.marks[2:], self.marks[3:]))
        return costs[0], costs[len(costs) // 4]


def requests(action: str, count: int) -> list[str]:
    params = '"key":"k","n":%d' if action == "bench.touch" else '"n":%d'
    return [('{"id":%d,"action":"%s","params":{' + params + '}}') % (i + 1, action, i)
            for i in range(count)]


async def echo(count: int) -> tuple[float, float]:
    channel = MemoryChannel(requests("host.ping", count))
    for _ in range(count):
        channel.send_now([await channel.receive()])
    return channel.per_request()


async def host(action: str, count: int) -> tuple[float, float]:
    opening = json.dumps({"id": 0, "action": "session.open", "params": {"name": "bench"}})
    channel = MemoryChannel([opening, *requests(action, count)])
    with tempfile.TemporaryDirectory() as folder:
        async with open_harness(Path(folder)) as harness:
            h = await harness.start(bench_plugin, config={"host": {"limits": {
                "rate_per_s": 1e9, "rate_burst": 10**9}}})
            conn = h.host.transport.connection(channel, "local", None)  # type: ignore[arg-type]
            async with trio.open_nursery() as nursery:
                nursery.start_soon(h.host.transport.run, conn)
                await channel.done.wait()
                while channel.sent < count + 2:  # server.info, the session, every reply
                    await trio.sleep(0.001)
                conn.abort(1000, "done")
    return channel.per_request()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--actions", default="host.ping,bench.touch")
    args = parser.parse_args()
    print(f"µs of CPU per request (cheapest / quarter-point {STRETCH}-request stretch), "
          f"{args.requests} requests")
    base = trio.run(echo, args.requests)
    print(f"{'echo loop':<12} {base[0]:7.1f} {base[1]:7.1f}")
    for action in args.actions.split(","):
        cost: Any = trio.run(host, action, args.requests)
        print(f"{action:<12} {cost[0]:7.1f} {cost[1]:7.1f}   ratio {base[0] / cost[0]:.2f}")


if __name__ == "__main__":
    main()
