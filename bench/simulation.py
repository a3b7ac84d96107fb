"""The simulation under load.

    python bench/simulation.py [--steps 500] [--seconds 10] [--clients 100]

The 10,000-node / 20,000-edge / 1,000-truck / 5,000-package world: ticks/s when
stepping as fast as possible; then ticking at 20 Hz with 100 connected clients,
the p50/p99 delay from a tick to its ``simulation.ticked`` arriving, next to a
bare trio-websocket server broadcasting the same bytes to 100 clients at the
same rate in the same run (target: p99 within 2x), and the host's CPU share.
Then, in a 20 Hz run of their own (so that reading them never slows the timed
clients' process), clients subscribe (``world.subscribe``) to
``simulation.ticks``, to one moving truck (at full rate, at ``@2`` and at ``@1``
deltas a second) and to a view of 10% of the map (at full rate and at ``@2``):
the bytes per tick and per second each gets, as deltas, next to the whole tick a
client that never subscribed gets (target for one truck: under 1% of it), and as
a share of what the watch-everything client gets (target for one truck at 2/s: a
few hundred bytes a second).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import trio
from trio_websocket import connect_websocket_url

from common import host_process, open_conns, percentile, run, workdir
from worlds import logistics_state


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def sent_at(frame: str) -> float:
    """The ``at`` a frame ends with, without decoding all of it (the same for host and
    bare frames), so the clients' own work stays small next to what is measured."""
    tail = frame[frame.rindex('"at":') + 5:]
    return float(tail[:min(i for i in (tail.find(","), tail.find("}")) if i >= 0)])


async def listen_ticks(nursery: trio.Nursery, url: str, count: int, delays: list[float],
                       sizes: list[int]) -> None:
    conns = await open_conns(nursery, url, count, True)

    async def reader(ws) -> None:  # type: ignore[no-untyped-def]
        while True:
            frame = await ws.get_message()
            if '"simulation.ticked"' in frame:
                delays.append(time.time() - sent_at(frame))
                sizes.append(len(frame))

    for conn in conns:
        nursery.start_soon(reader, conn.ws)


async def watch(nursery: trio.Nursery, url: str, topics: list[str], sizes: list[int]) -> None:
    """A client subscribed to ``topics``: the bytes of each delta frame it gets."""
    (conn,) = await open_conns(nursery, url, 1, True)
    reply = await conn.call("world.subscribe", {"topics": topics})
    assert reply["signal"] == "world.subscribed", reply

    async def reader() -> None:
        while True:
            frame = await conn.ws.get_message()
            if '"simulation.delta"' in frame:
                sizes.append(len(frame))
    nursery.start_soon(reader)


def view_of(state: dict, share: float) -> str:
    """A square-ish view over ``share`` of the map's bounding box, in its corner."""
    xs = [n["x"] for n in state["graph"]["nodes"]]
    ys = [n["y"] for n in state["graph"]["nodes"]]
    side = share ** 0.5
    x0, y0 = min(xs), min(ys)
    x1, y1 = x0 + (max(xs) - x0) * side, y0 + (max(ys) - y0) * side
    return f"simulation.view:{x0},{y0},{x1},{y1}"


async def bare_broadcast(count: int, seconds: float, frame_bytes: int,
                         delays: list[float]) -> None:
    """The floor: bench/broadcast.py, in a process of its own as the host is, sends
    frames of the host's average size to ``count`` clients at 20 Hz."""
    proc = subprocess.Popen([sys.executable, str(Path(__file__).parent / "broadcast.py"),
                             str(count), str(seconds), str(frame_bytes)], stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        url = f"ws://127.0.0.1:{int(proc.stdout.readline())}/"
        async with trio.open_nursery() as nursery:
            for _ in range(count):
                ws = await connect_websocket_url(nursery, url, message_queue_size=256,
                                                 max_message_size=1 << 30)

                async def reader(ws=ws) -> None:  # type: ignore[no-untyped-def]
                    while True:
                        frame = await ws.get_message()
                        delays.append(time.time() - sent_at(frame))
                nursery.start_soon(reader)
            await trio.sleep(seconds + 1.0)
            nursery.cancel_scope.cancel()
    finally:
        proc.kill()
        proc.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=500,
                        help="ticks stepped one at a time, as fast as possible, first")
    parser.add_argument("--seconds", type=float, default=10.0, help="then ticking at 20 Hz")
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
            for _ in range(args.steps):  # trucks set off one a tick: about 500 under way after
                await admin.call("simulation.step", {"ticks": 1})
            stepping = args.steps / (time.perf_counter() - started)
            print(f"stepping as fast as possible: {stepping:.1f} ticks/s "
                  f"({1000 / stepping:.1f} ms per tick of 1,000 trucks)", flush=True)

            host_delays: list[float] = []
            sizes: list[int] = []
            async with trio.open_nursery() as timed:  # the 100 clients alone: they are timed
                await listen_ticks(timed, server.url, args.clients, host_delays, sizes)
                cpu0, wall0 = cpu_seconds(server.proc.pid), time.perf_counter()
                await admin.call("simulation.start", {"tick_hz": 20})
                await trio.sleep(args.seconds)
                await admin.call("simulation.stop", {})
                cpu_share = (cpu_seconds(server.proc.pid) - cpu0) / (time.perf_counter() - wall0)
                await trio.sleep(1.0)  # let the last ticks arrive
                timed.cancel_scope.cancel()

            # then, in a run of their own (so that reading them never slows the timed
            # clients' process), the subscribers and one client that never subscribed
            exported = await admin.call("simulation.export_state", {})
            moving = next(a["id"] for a in exported["data"]["state_data"]["agents"]
                          if a.get("edge") is not None)
            view = view_of(state, 0.1)
            topics = {"everything (simulation.ticks)": "simulation.ticks",
                      f"one truck ({moving})": f"simulation.agent:{moving}",
                      f"one truck ({moving}) @2": f"simulation.agent:{moving}@2",
                      f"one truck ({moving}) @1": f"simulation.agent:{moving}@1",
                      "a view of 10% of the map": view,
                      "a view of 10% of the map @2": f"{view}@2"}
            watched: dict[str, list[int]] = {name: [] for name in topics}
            legacy: list[float] = []
            legacy_sizes: list[int] = []
            async with trio.open_nursery() as counted:
                for name, topic in topics.items():
                    await watch(counted, server.url, [topic], watched[name])
                await listen_ticks(counted, server.url, 1, legacy, legacy_sizes)
                await trio.sleep(0.5)  # the rated topics' first delta (a reset) comes now
                for got in watched.values():
                    got.clear()
                began = time.perf_counter()
                await admin.call("simulation.start", {"tick_hz": 20})
                await trio.sleep(max(2.0, args.seconds / 2))
                await admin.call("simulation.stop", {})
                await trio.sleep(1.0)
                counted.cancel_scope.cancel()
            watched_s = time.perf_counter() - began - 1.0  # start to stop
            nursery.cancel_scope.cancel()
        frame_bytes = sum(sizes) // max(1, len(sizes))
        bare: list[float] = []
        await bare_broadcast(args.clients, args.seconds, frame_bytes, bare)
        h50, h99 = percentile(host_delays, 0.5), percentile(host_delays, 0.99)
        b50, b99 = percentile(bare, 0.5), percentile(bare, 0.99)
        print(f"20 Hz to {args.clients} clients: host p50 {h50 * 1000:.1f} ms  p99 "
              f"{h99 * 1000:.1f} ms   bare broadcast p50 {b50 * 1000:.1f} ms  p99 "
              f"{b99 * 1000:.1f} ms   p99 ratio {h99 / b99:.2f} (target <= 2)")
        print(f"host CPU share while ticking at 20 Hz: {cpu_share * 100:.0f}% of one core "
              f"({len(host_delays)} ticks received, {frame_bytes} bytes each on average)")
        ticks = len(legacy)  # the one client that never subscribed gets every tick
        print(f"bytes per tick per client ({ticks} ticks in {watched_s:.1f} s, a run of their "
              f"own): never subscribed (simulation.ticked) {frame_bytes:,}")
        everything = sum(next(iter(watched.values())))
        for name, got in watched.items():
            per_tick = sum(got) / max(1.0, ticks)
            print(f"  {name}: {len(got)} deltas, {per_tick:,.0f} bytes per tick, "
                  f"{sum(got) / watched_s:,.0f} B/s ({per_tick * 20:,.0f} B/s at a full 20 Hz), "
                  f"{per_tick / max(1, frame_bytes) * 100:.2f}% of the whole tick, "
                  f"{sum(got) / max(1, everything) * 100:.3f}% of everything")

    try:
        run(bench)
    finally:
        server.stop()


if __name__ == "__main__":
    main()
