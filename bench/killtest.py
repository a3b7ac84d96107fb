"""Kill -9 the host at random moments and check that nothing acknowledged is lost.

Each cycle: start ``worldhost serve`` on the same store file, resume the three
clients' sessions (opened in the first cycle), let them send world-changing
actions with unique request ids while the simulation ticks, SIGKILL the host at
a random moment, run ``PRAGMA quick_check``, restart, and compare the world
with what the clients were told.

    python bench/killtest.py --cycles 200

prints acknowledged / lost / invented counts; the test suite runs 20 cycles.
"""

from __future__ import annotations

import argparse
import json
import random
import sqlite3
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import trio
from trio_websocket import ConnectionClosed, open_websocket_url

sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
from serverproc import ServerProcess  # noqa: E402

from host.client import connect  # noqa: E402

CLIENTS = 3
ADMIN = "kill-test-admin"


@dataclass
class Ledger:
    """What the clients sent and what they were told."""

    acked: set[str] = field(default_factory=set)
    sent: set[str] = field(default_factory=set)
    sessions: dict[str, dict[str, object]] = field(default_factory=dict)
    counter: int = 0
    resumed: int = 0


@dataclass
class Totals:
    cycles: int = 0
    acknowledged: int = 0
    lost: int = 0
    invented: int = 0
    resume_failures: int = 0
    check_failures: int = 0
    problems: list[str] = field(default_factory=list)


async def _call(ws, frame: dict) -> dict:  # type: ignore[no-untyped-def]
    await ws.send_message(json.dumps(frame))
    while True:
        msg = json.loads(await ws.get_message())
        if msg.get("re") == frame.get("id"):
            return msg


async def _client(url: str, name: str, ledger: Ledger, stop_at: float) -> None:
    try:
        async with open_websocket_url(url, message_queue_size=64) as ws:
            await ws.get_message()  # server.info
            known = ledger.sessions.get(name)
            if known is None:
                reply = await _call(ws, {"id": f"{name}-open", "action": "session.open",
                                         "params": {"name": name, "token": ADMIN}})
                data = reply["data"]
                ledger.sessions[name] = {"session_id": data["session_id"],
                                         "resume_token": data["resume_token"], "last_seq": 0}
            else:
                reply = await _call(ws, {"id": f"{name}-resume-{ledger.counter}",
                                         "action": "session.resume", "params": known})
                if reply["signal"] != "session.resumed":
                    raise RuntimeError(f"{name} could not resume: {reply['data']}")
                known["resume_token"] = reply["data"]["resume_token"]
                ledger.resumed += 1
            while trio.current_time() < stop_at:
                ledger.counter += 1
                item = f"{name}-{ledger.counter}"
                action = ("map.add_node", {"id": item, "x": ledger.counter, "y": 0}) \
                    if ledger.counter % 2 else \
                    ("simulation.add_package", {"id": item, "origin": "g1", "destination": "g4"})
                ledger.sent.add(item)
                reply = await _call(ws, {"id": item, "action": action[0], "params": action[1]})
                if reply["signal"] == "error":
                    raise RuntimeError(f"{item}: {reply['data']}")
                ledger.acked.add(item)
                ledger.sessions[name]["last_seq"] = reply["seq"]
    except (ConnectionClosed, OSError, trio.BrokenResourceError):
        pass  # the host was killed under us


async def _drive(url: str, ledger: Ledger, seconds: float) -> None:
    stop_at = trio.current_time() + seconds + 5
    async with trio.open_nursery() as nursery:
        for i in range(CLIENTS):
            nursery.start_soon(_client, url, f"client{i}", ledger, stop_at)


async def _drive_then_kill(server: ServerProcess, ledger: Ledger, seconds: float) -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_drive, server.url, ledger, seconds)
        await trio.sleep(seconds)
        server.kill9()


def _world(url: str) -> dict:
    async def read() -> dict:
        # the project's client: after many cycles the world outgrows one frame, and
        # it reassembles a chunked reply
        async with connect(url, name="checker", token=ADMIN, reconnect=False) as checker:
            snap = await checker.call("world.snapshot")
            await checker.call("session.close")
            return snap["slices"]
    return trio.run(read)


def _setup(url: str) -> None:
    async def setup() -> None:
        async with open_websocket_url(url) as ws:
            await ws.get_message()
            await _call(ws, {"id": 1, "action": "session.open",
                             "params": {"name": "setup", "token": ADMIN}})
            nodes = [{"id": f"g{i}", "x": i, "y": 0, "building": None} for i in range(6)]
            edges = [{"id": f"e{i}{j}", "from": f"g{i}", "to": f"g{j}", "length": 1, "speed": 1}
                     for i in range(6) for j in range(6) if abs(i - j) == 1]
            await _call(ws, {"id": 2, "action": "map.import",
                             "params": {"map_data": {"nodes": nodes, "edges": edges}}})
            for t in range(3):
                await _call(ws, {"id": f"t{t}", "action": "simulation.add_agent",
                                 "params": {"id": f"truck{t}", "kind": "truck", "node": "g0"}})
            for p in range(30):
                await _call(ws, {"id": f"p{p}", "action": "simulation.add_package",
                                 "params": {"id": f"pkg{p}", "origin": f"g{p % 6}",
                                            "destination": f"g{(p + 3) % 6}"}})
            await _call(ws, {"id": 3, "action": "simulation.start", "params": {"tick_hz": 50}})
            await _call(ws, {"id": 4, "action": "session.close"})
    trio.run(setup)


def check(world: dict, ledger: Ledger, totals: Totals) -> None:
    present = {k[len("node:"):] for k in world["map"] if k.startswith("node:client")}
    present |= {k[len("package:"):] for k in world["simulation"] if k.startswith("package:")}
    present = {p for p in present if p.startswith("client")}
    lost = ledger.acked - present
    invented = present - ledger.sent
    totals.lost += len(lost)
    totals.invented += len(invented)
    if lost or invented:
        totals.problems.append(f"lost {sorted(lost)[:5]} invented {sorted(invented)[:5]}")
    nodes = {k[5:] for k in world["map"] if k.startswith("node:")}
    for key, edge in world["map"].items():
        if key.startswith("edge:") and not {edge["from"], edge["to"]} <= nodes:
            totals.check_failures += 1
            totals.problems.append(f"dangling edge {key}")
    agents = {k[6:]: a for k, a in world["simulation"].items() if k.startswith("agent:")}
    for key, package in world["simulation"].items():
        if not key.startswith("package:"):
            continue
        carriers = [a for a in agents.values() if package["id"] in a["cargo"]]
        in_transit = package["status"] == "in_transit"
        if in_transit != bool(carriers) or len(carriers) > 1 or \
                (in_transit and carriers[0]["id"] != package["carried_by"]):
            totals.check_failures += 1
            totals.problems.append(f"package {package['id']} is not in exactly one place")
    for agent in agents.values():
        if agent["fuel"] < 0:
            totals.check_failures += 1
            totals.problems.append(f"agent {agent['id']} has negative fuel")


def run(cycles: int, workdir: Path, seed: int | None = None, verbose: bool = False,
        synchronous: str = "NORMAL", journal_commits: str = "thread",
        websocket: str | None = None) -> Totals:
    """Journal commits on the store's thread (the default), or in the event loop
    (``journal_commits = "loop"``, with NORMAL only; see state/saver.py): every path
    must lose nothing acknowledged. ``websocket`` sets ``[host] websocket`` (else the
    host's default)."""
    rng = random.Random(seed)
    db = workdir / "kill.db"
    config = workdir / "kill.toml"
    library = f'websocket = "{websocket}"\n' if websocket else ""
    config.write_text(f'[host]\nadmin_token = "{ADMIN}"\n{library}[host.limits]\nrate_per_s = 100000.0\n'
                      '[sessions]\nresume_ttl_s = 3600\n'
                      f'[store]\nsynchronous = "{synchronous}"\n'
                      f'journal_commits = "{journal_commits}"\n'
                      '[plugins.session_cleanup]\nmax_sessions = 1000\n')
    ledger = Ledger()
    totals = Totals()
    for cycle in range(cycles):
        server = ServerProcess(db, config=config).start()
        if cycle == 0:
            _setup(server.url)
        seconds = rng.uniform(0.2, 1.2)

        trio.run(_drive_then_kill, server, ledger, seconds)
        conn = sqlite3.connect(db)
        result = conn.execute("PRAGMA quick_check").fetchone()[0]
        conn.close()
        if result != "ok":
            totals.check_failures += 1
            totals.problems.append(f"cycle {cycle}: quick_check {result}")
        totals.cycles += 1
        if verbose:
            print(f"cycle {cycle + 1}: {len(ledger.acked)} acknowledged so far", flush=True)
    server = ServerProcess(db, config=config).start()
    try:
        expected_resumes = ledger.resumed
        world = _world(server.url)
        check(world, ledger, totals)
        totals.acknowledged = len(ledger.acked)
        totals.resume_failures = max(0, CLIENTS * (cycles - 1) - expected_resumes)
    finally:
        server.stop()
    return totals


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cycles", type=int, default=200)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--synchronous", choices=["NORMAL", "FULL"], default="NORMAL",
                        help="the store's synchronous mode")
    parser.add_argument("--journal-commits", choices=["thread", "loop"], default="thread",
                        help="where journal commits run (loop: NORMAL only)")
    parser.add_argument("--websocket", choices=["trio-websocket", "websockets"], default=None,
                        help="the host's [host] websocket (default: the host's own)")
    args = parser.parse_args()
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        totals = run(args.cycles, Path(tmp), args.seed, verbose=True,
                     synchronous=args.synchronous, journal_commits=args.journal_commits,
                     websocket=args.websocket)
    print(f"cycles {totals.cycles}  acknowledged {totals.acknowledged}  lost {totals.lost}  "
          f"invented {totals.invented}  resume failures {totals.resume_failures}  "
          f"invariant failures {totals.check_failures}  "
          f"({time.monotonic() - started:.0f} s)")
    for problem in totals.problems[:20]:
        print("  " + problem)
    return 0 if not (totals.lost or totals.invented or totals.check_failures
                     or totals.resume_failures) else 1


if __name__ == "__main__":
    raise SystemExit(main())
