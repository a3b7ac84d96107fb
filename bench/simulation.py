"""The simulation under load.

    python bench/simulation.py [--seconds 5] [--clients 100]

The 10,000-node / 20,000-edge / 1,000-truck / 5,000-package world: ticks/s when
stepping as fast as possible; then ticking at 20 Hz with 100 connected clients,
the p50/p99 delay from a tick to its ``simulation.ticked`` arriving, next to a
bare trio-websocket server broadcasting the same bytes to 100 clients at the
same rate in the same run (target: p99 within 2x), and the host's CPU share.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import trio
from trio_websocket import connect_websocket_url, serve_websocket

from common import host_process, open_conns, percentile, run, workdir
from worlds import logistics_state


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def listen_ticks(nursery: trio.Nursery, url: str, count: int, delays: list[float],
                       host: bool) -> None:
    conns = await open_conns(nursery, url, count, host)

    async def reader(ws) -> None:  # type: ignore[no-untyped-def]
        while True:
            msg = json.loads(await ws.get_message())
            if msg.get("signal") == "simulation.ticked":
                delays.append(time.time() - msg["data"]["at"])

    for conn in conns:
        nursery.start_soon(reader, conn.ws)


async def bare_broadcast(count: int, seconds: float, frame_bytes: int,
                         delays: list[float]) -> None:
    """The floor: one trio-websocket server sends each tick's bytes to every client."""
    clients: list = []
    filler = "x" * max(0, frame_bytes - 80)

    async def handler(request) -> None:  # type: ignore[no-untyped-def]
        ws = await request.accept()
        clients.append(ws)
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        server = await nursery.start(lambda task_status: serve_websocket(
            handler, "127.0.0.1", 0, None, message_queue_size=64, task_status=task_status))
        url = f"ws://127.0.0.1:{server.port}/"
        for _ in range(count):
            ws = await connect_websocket_url(nursery, url, message_queue_size=256)

            async def reader(ws=ws) -> None:  # type: ignore[no-untyped-def]
                while True:
                    msg = json.loads(await ws.get_message())
                    delays.append(time.time() - msg["data"]["at"])
            nursery.start_soon(reader)
        while len(clients) < count:
            await trio.sleep(0.01)
        stop_at = trio.current_time() + seconds
        while trio.current_time() < stop_at:
            frame = json.dumps({"signal": "simulation.ticked", "seq": 1,
                                "data": {"at": time.time(), "pad": filler}})
            for ws in clients:
                await ws.send_message(frame)
            await trio.sleep(0.05)
        nursery.cancel_scope.cancel()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--clients", type=int, default=100)
    args = parser.parse_args()
    folder = workdir()
    server = host_process(folder).start()
    state = logistics_state(10_000, 20_000, 1_000, 5_000, seed=1)

    async def bench() -> None:
        async with trio.open_nursery() as nursery:
            (admin,) = await open_conns(nursery, server.url, 1, True, admin=True)
            reply = await admin.call("simulation.import_state", {"state_data": state})
            assert reply["signal"] == "simulation.state_imported", reply
            started = time.perf_counter()
            steps = 0
            while time.perf_counter() - started < args.seconds:
                await admin.call("simulation.step", {"ticks": 1})
                steps += 1
            stepping = steps / (time.perf_counter() - started)
            print(f"stepping as fast as possible: {stepping:.1f} ticks/s "
                  f"({1000 / stepping:.1f} ms per tick of 1,000 trucks)", flush=True)

            host_delays: list[float] = []
            await listen_ticks(nursery, server.url, args.clients, host_delays, True)
            cpu0, wall0 = cpu_seconds(server.proc.pid), time.perf_counter()
            await admin.call("simulation.start", {"tick_hz": 20})
            await trio.sleep(args.seconds)
            await admin.call("simulation.stop", {})
            cpu_share = (cpu_seconds(server.proc.pid) - cpu0) / (time.perf_counter() - wall0)
            nursery.cancel_scope.cancel()
        sizes = len(json.dumps({"signal": "simulation.ticked", "data": {"moved": [
            {"id": "t0000", "node": "n0000", "edge": "c00000", "progress": 1.2345}] * 1000}}))
        bare: list[float] = []
        await bare_broadcast(args.clients, args.seconds, sizes // 2, bare)
        h50, h99 = percentile(host_delays, 0.5), percentile(host_delays, 0.99)
        b50, b99 = percentile(bare, 0.5), percentile(bare, 0.99)
        print(f"20 Hz to {args.clients} clients: host p50 {h50 * 1000:.1f} ms  p99 "
              f"{h99 * 1000:.1f} ms   bare broadcast p50 {b50 * 1000:.1f} ms  p99 "
              f"{b99 * 1000:.1f} ms   p99 ratio {h99 / b99:.2f} (target <= 2)")
        print(f"host CPU share while ticking at 20 Hz: {cpu_share * 100:.0f}% of one core "
              f"({len(host_delays)} ticks received)")

    try:
        run(bench)
    finally:
        server.stop()


if __name__ == "__main__":
    main()
