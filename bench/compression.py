"""permessage-deflate: what it does to the bytes and the server CPU of a 1,000-truck tick.

    python bench/compression.py [--clients 20] [--seconds 6] [--steps 300]

The world of bench/simulation.py (10,000 nodes, 20,000 edges, 1,000 trucks, 5,000
packages), stepped ``--steps`` ticks so that trucks are under way, then ticking
at 20 Hz to ``--clients`` sessions, twice: the host with ``[host] websocket =
"websockets"`` and ``websocket_compression`` off, then on (the clients, on the
``websockets`` library, ask for permessage-deflate in both runs). For each:
the bytes a client reads off its socket per tick (frames as sent, after
compression) against the ticked frame's size as decoded, and the host's CPU per
tick and share of a core, from /proc.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import trio
from websockets.trio.client import connect

from common import host_process, open_conns, run, workdir
from simulation import cpu_seconds
from worlds import logistics_state


class CountingStream(trio.abc.HalfCloseableStream):
    """A TCP stream that counts the bytes it reads (what crossed the wire)."""

    def __init__(self, inner: trio.SocketStream) -> None:
        self.inner = inner
        self.received = 0

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        data = await self.inner.receive_some(max_bytes)
        self.received += len(data)
        return bytes(data)

    async def send_all(self, data: Any) -> None:
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        await self.inner.send_eof()

    async def aclose(self) -> None:
        await self.inner.aclose()


async def one_run(state: dict[str, Any], compression: bool, clients: int, seconds: float,
                  steps: int) -> dict[str, float]:
    flag = "true" if compression else "false"
    server = host_process(workdir(), host=f'websocket = "websockets"\n'
                                           f'websocket_compression = {flag}\n').start()
    assert server.proc is not None
    try:
        async with trio.open_nursery() as nursery:
            (admin,) = await open_conns(nursery, server.url, 1, True, admin=True)
            reply = await admin.call("simulation.import_state", {"state_data": state})
            assert reply["signal"] == "simulation.state_imported", reply
            for _ in range(steps):
                await admin.call("simulation.step", {"ticks": 1})
            streams: list[CountingStream] = []
            ticks = [0]
            frame_bytes = [0]
            counting = trio.Event()

            async def listener(i: int) -> None:
                stream = CountingStream(await trio.open_tcp_stream("127.0.0.1", server.port))
                streams.append(stream)
                async with connect(server.url, stream=stream, compression="deflate",
                                   max_size=None, ping_interval=None) as ws:
                    await ws.recv()  # server.info
                    await ws.send(json.dumps({"id": 1, "action": "session.open",
                                              "params": {"name": f"z{i}"}}))
                    while True:
                        frame = await ws.recv()
                        if counting.is_set() and '"simulation.ticked"' in frame[:40]:
                            ticks[0] += 1
                            frame_bytes[0] += len(frame.encode() if isinstance(frame, str) else frame)

            for i in range(clients):
                nursery.start_soon(listener, i)
            while len(streams) < clients:
                await trio.sleep(0.05)
            await trio.sleep(1.0)  # sessions open, sync_state read
            await admin.call("simulation.start", {"tick_hz": 20})
            await trio.sleep(1.0)  # the first ticks compile the road graph
            received0 = sum(s.received for s in streams)
            cpu0, wall0 = cpu_seconds(server.proc.pid), trio.current_time()
            counting.set()
            await trio.sleep(seconds)
            counting = trio.Event()  # stop counting (listeners read the new event)
            cpu = cpu_seconds(server.proc.pid) - cpu0
            wall = trio.current_time() - wall0
            received = sum(s.received for s in streams) - received0
            await admin.call("simulation.stop", {})
            nursery.cancel_scope.cancel()
    finally:
        server.stop()
    per_client_ticks = ticks[0] / clients
    return {"ticks": per_client_ticks, "wire": received / max(1, ticks[0]),
            "frame": frame_bytes[0] / max(1, ticks[0]), "cpu_share": cpu / wall,
            "cpu_per_tick": cpu / max(1.0, per_client_ticks)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args()
    state = logistics_state(10_000, 20_000, 1_000, 5_000, seed=1)
    results = {}

    async def bench() -> None:
        for compression in (False, True):
            results[compression] = await one_run(state, compression, args.clients,
                                                 args.seconds, args.steps)

    run(bench)
    off, on = results[False], results[True]
    print(f"1,000-truck ticks at 20 Hz to {args.clients} clients, {args.seconds:g} s each "
          f"(websockets library)")
    print(f"{'compression':<12} {'ticks/client':>12} {'frame bytes':>12} {'wire bytes':>11} "
          f"{'host CPU/tick':>14} {'host CPU share':>15}")
    for name, r in (("off", off), ("on", on)):
        print(f"{name:<12} {r['ticks']:>12.0f} {r['frame']:>12.0f} {r['wire']:>11.0f} "
              f"{r['cpu_per_tick'] * 1000:>11.1f} ms {r['cpu_share'] * 100:>13.0f}%")
    print(f"on/off: wire bytes {on['wire'] / off['wire']:.2f}, host CPU per tick "
          f"{on['cpu_per_tick'] / off['cpu_per_tick']:.2f}")


if __name__ == "__main__":
    main()
