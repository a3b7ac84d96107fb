"""Persistence under load.

    python bench/persistence.py [--seconds 5]

The 10,000-node / 20,000-edge / 1,000-truck / 5,000-package world, ticking at
20 Hz, 10 clients pinging. Prints, each against a baseline from the same run:

- p99 ``host.ping`` latency with saves on (journal + checkpoints) vs off
  (target ratio <= 2);
- the longest time a save held the event loop (target < 10 ms), and the
  longest stall of the loop seen by a watchdog task;
- time to restore that world plus 10 s of journal (target < 1 s) next to the
  time to decode its raw CBOR (the floor);
- journal throughput in acknowledged actions/s vs bare SQLite commits.
"""

from __future__ import annotations

import argparse
import sqlite3
import tempfile
import threading
import time
from pathlib import Path

import cbor2
import trio

from common import ADMIN, drive, host_process, open_conns, percentile, run, workdir
from host import config as config_mod
from host.testing import open_harness
from worlds import logistics_state

STATE = logistics_state(10_000, 20_000, 1_000, 5_000, seed=1)


async def ping_p99(extra_config: str, seconds: float) -> float:
    folder = workdir()
    server = host_process(folder, extra_config).start()
    try:
        async with trio.open_nursery() as nursery:
            (admin,) = await open_conns(nursery, server.url, 1, True, admin=True)
            await admin.call("simulation.import_state", {"state_data": STATE})
            await admin.call("simulation.start", {"tick_hz": 20})
            conns = await open_conns(nursery, server.url, 10, True)
            latencies = await drive(conns, seconds, lambda index, i: ("host.ping", {"i": i}))
            nursery.cancel_scope.cancel()
    finally:
        server.stop()
    return percentile(latencies, 0.99)


async def stalls_and_restore(seconds: float) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        db = folder / "w.db"
        async with open_harness(folder) as harness:
            h = await harness.start(db=db, config={
                "host": {"admin_token": ADMIN},
                "store": {"debounce_s": 1.0, "max_delay_s": 5.0}})
            worst = 0.0

            async def watchdog() -> None:
                nonlocal worst
                while True:
                    before = trio.current_time()
                    await trio.sleep(0.001)
                    worst = max(worst, trio.current_time() - before - 0.001)

            async with h.client("root", token=ADMIN) as root, trio.open_nursery() as nursery:
                await root.call("simulation.import_state", state_data=STATE)
                await h.host.world().saver.checkpoint()
                h.host.world().saver.longest_stall_s = 0.0
                nursery.start_soon(watchdog)
                await root.call("simulation.start", tick_hz=20)
                await trio.sleep(max(seconds, 11))  # at least two max_delay_s checkpoints
                nursery.cancel_scope.cancel()
            print(f"longest event-loop hold by a save: {h.host.world().saver.longest_stall_s * 1000:.1f} ms "
                  f"(target < 10 ms); longest loop stall overall: {worst * 1000:.1f} ms "
                  f"(ticks of 1,000 trucks included); {h.host.world().saver.checkpoints} checkpoints, "
                  f"{h.host.world().saver.commits} journal commits")
            # now 10 s of journal with no checkpoint, then a crash
            await h.stop()
            h.config = config_mod.from_dict({"host": {"admin_token": ADMIN, "port": 0},
                                             "store": {"debounce_s": 1e6, "max_delay_s": 1e6}})
            await h.start()
            await trio.sleep(10)
            await h.crash()
            conn = sqlite3.connect(db)
            blobs = [r[0] for r in conn.execute("SELECT value FROM records")]
            blobs += [r[0] for r in conn.execute("SELECT value FROM slices WHERE value IS NOT NULL")]
            journal = conn.execute("SELECT count(*) FROM journal").fetchone()[0]
            conn.close()
            started = time.perf_counter()
            for blob in blobs:
                cbor2.loads(blob)
            floor = time.perf_counter() - started
            started = time.perf_counter()
            await h.start()  # the whole server start: its own store, then the world's
            restored = time.perf_counter() - started
            replayed = h.host.world().replayed
            await h.stop()
        print(f"restore with {journal} journal entries (~10 s of ticks; {replayed} replayed): "
              f"{restored:.2f} s (target < 1 s); decoding the raw CBOR alone: {floor:.2f} s; "
              f"ratio {restored / floor:.1f}")


def bare_commits(seconds: float, folder: Path) -> float:
    conn = sqlite3.connect(folder / "bare.db", isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = NORMAL")
    conn.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v BLOB)")
    count = 0
    stop_at = time.perf_counter() + seconds
    while time.perf_counter() < stop_at:
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("INSERT INTO t (v) VALUES (?)", (b"x" * 64,))
        conn.execute("COMMIT")
        count += 1
    conn.close()
    return count / seconds


async def throughput(seconds: float) -> None:
    folder = workdir()
    server = host_process(folder).start()
    try:
        async with trio.open_nursery() as nursery:
            conns = await open_conns(nursery, server.url, 10, True)
            acked = await drive(conns, seconds, lambda index, i: (
                "bench.touch", {"key": f"k{index}", "n": i}))
            nursery.cancel_scope.cancel()
    finally:
        server.stop()
    result: list[float] = []
    thread = threading.Thread(target=lambda: result.append(bare_commits(seconds, folder)))
    thread.start()
    thread.join()
    rate = len(acked) / seconds
    print(f"journal: {rate:.0f} acknowledged actions/s from 10 clients; bare SQLite: "
          f"{result[0]:.0f} commits/s; ratio {rate / result[0]:.2f} (group commit batches "
          f"several actions per commit)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()

    async def bench() -> None:
        on = await ping_p99("", args.seconds)
        off = await ping_p99('[store]\ndurability = "snapshot"\ndebounce_s = 1000000.0\n'
                             'max_delay_s = 1000000.0\n', args.seconds)
        print(f"host.ping p99 while ticking at 20 Hz: saves on {on * 1000:.1f} ms, "
              f"off {off * 1000:.1f} ms, ratio {on / off:.2f} (target <= 2)", flush=True)
        await stalls_and_restore(args.seconds)
        await throughput(args.seconds)

    run(bench)


if __name__ == "__main__":
    main()
