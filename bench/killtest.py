"""Kill -9 the host at random moments and check that nothing acknowledged is lost.

Each cycle: start ``worldhost serve`` on the same store file, resume the three
clients' sessions (opened in the first cycle), let them send world-changing
actions with unique request ids while the simulation ticks, SIGKILL the host at
a random moment, run ``PRAGMA quick_check``, restart, and compare the world
with what the clients were told.

    python bench/killtest.py --cycles 200

prints acknowledged / lost / invented counts; the test suite runs 20 cycles.
With ``--replay`` (the default) each client also resumes from a little before the
last signal it read: the resume must be complete, replay every signal after that
``seq`` once and in order, those it had read identical to the byte; and at the
end what the clients read must match what the stores' outbound logs hold.
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
from state.codec import load_stored  # noqa: E402

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
    seen: dict[str, dict[int, str]] = field(default_factory=dict)  # name -> seq -> text


@dataclass
class Totals:
    cycles: int = 0
    acknowledged: int = 0
    lost: int = 0
    invented: int = 0
    resume_failures: int = 0
    check_failures: int = 0
    replay_failures: int = 0  # --replay: incomplete, a gap, a duplicate, a changed signal
    problems: list[str] = field(default_factory=list)


async def _call(ws, frame: dict,  # type: ignore[no-untyped-def]
                seen: dict[int, str] | None = None) -> dict:
    await ws.send_message(json.dumps(frame))
    while True:
        text = await ws.get_message()
        msg = json.loads(text)
        if seen is not None and "seq" in msg:
            seen[msg["seq"]] = text
        if msg.get("re") == frame.get("id"):
            return msg


async def _check_replay(ws, name: str, last_seq: int, reply: dict,  # type: ignore[no-untyped-def]
                        ledger: Ledger, totals: Totals) -> None:
    """``--replay``: a resume after a kill -9 is complete and replays every signal
    after ``last_seq`` once, in order, those already read exactly as they were."""
    seen = ledger.seen.setdefault(name, {})
    replayed = [await ws.get_message() for _ in range(reply["data"]["replayed"])]
    seqs = [json.loads(text)["seq"] for text in replayed]
    problems = []
    if not reply["data"]["complete"]:
        problems.append(f"{name}: resume from {last_seq} incomplete")
    if seqs != list(range(last_seq + 1, last_seq + 1 + len(seqs))):
        problems.append(f"{name}: replayed seqs {seqs[:3]}..{seqs[-3:]} after {last_seq}")
    changed = [s for s, text in zip(seqs, replayed) if s in seen and seen[s] != text]
    if changed:
        problems.append(f"{name}: seqs {changed[:5]} replayed differently")
    for s, text in zip(seqs, replayed):
        seen[s] = text
    totals.replay_failures += len(problems)
    totals.problems += problems


def check_logs(workdir: Path, ledger: Ledger, totals: Totals) -> None:
    """``--replay``: each client read every seq from its first on (none missed), and
    every signal the stores' outbound logs hold for it is the one it read."""
    for name, seen in ledger.seen.items():
        gaps = sorted(set(range(min(seen), max(seen) + 1)) - set(seen)) if seen else []
        if gaps:
            totals.replay_failures += 1
            totals.problems.append(f"{name}: never read seqs {gaps[:5]}")
    sessions = {str(known["session_id"]): name for name, known in ledger.sessions.items()}
    for db in (workdir / "kill.db", workdir / "kill.server.db"):
        conn = sqlite3.connect(db)
        rows = conn.execute("SELECT o.session, o.seq, d.signal, d.data FROM outbound o "
                            "JOIN outbound_data d ON d.pos = o.pos").fetchall()
        conn.close()
        for sid, seq, signal, data in rows:
            text = ledger.seen.get(sessions.get(sid, ""), {}).get(seq)
            if text is None:
                continue  # logged, never read: sent after the client's last read
            msg = json.loads(text)
            if msg["signal"] != signal or msg["data"] != json.loads(
                    json.dumps(load_stored(data))):
                totals.replay_failures += 1
                totals.problems.append(f"{sessions[sid]}: seq {seq} logged as {signal}, "
                                       f"read as {msg['signal']}")


async def _client(url: str, name: str, ledger: Ledger, stop_at: float,
                  totals: Totals | None = None, rng: random.Random | None = None) -> None:
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
            elif totals is not None and rng is not None:  # --replay
                seen = ledger.seen.setdefault(name, {})
                last_seq = max(0, max(seen, default=0) - rng.randint(0, 20))
                await ws.send_message(json.dumps({
                    "id": f"{name}-resume-{ledger.counter}", "action": "session.resume",
                    "params": {**known, "last_seq": last_seq}}))
                text = await ws.get_message()
                reply = json.loads(text)
                if reply["signal"] != "session.resumed":
                    raise RuntimeError(f"{name} could not resume: {reply['data']}")
                known["resume_token"] = reply["data"]["resume_token"]
                ledger.resumed += 1
                seen[reply["seq"]] = text
                await _check_replay(ws, name, last_seq, reply, ledger, totals)
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
                reply = await _call(ws, {"id": item, "action": action[0], "params": action[1]},
                                    ledger.seen.setdefault(name, {}) if totals else None)
                if reply["signal"] == "error":
                    raise RuntimeError(f"{item}: {reply['data']}")
                ledger.acked.add(item)
                ledger.sessions[name]["last_seq"] = reply["seq"]
    except (ConnectionClosed, OSError, trio.BrokenResourceError):
        pass  # the host was killed under us


async def _drive(url: str, ledger: Ledger, seconds: float, totals: Totals | None = None,
                 rng: random.Random | None = None) -> None:
    stop_at = trio.current_time() + seconds + 5
    async with trio.open_nursery() as nursery:
        for i in range(CLIENTS):
            nursery.start_soon(_client, url, f"client{i}", ledger, stop_at, totals, rng)


async def _drive_then_kill(server: ServerProcess, ledger: Ledger, seconds: float,
                           totals: Totals | None = None,
                           rng: random.Random | None = None) -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_drive, server.url, ledger, seconds, totals, rng)
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
        replay: bool = True) -> Totals:
    """Journal commits on the store's thread (the default), or in the event loop
    (``journal_commits = "loop"``, with NORMAL only; see state/saver.py): every path
    must lose nothing acknowledged (and, with ``replay``, replay what was sent)."""
    rng = random.Random(seed)
    db = workdir / "kill.db"
    config = workdir / "kill.toml"
    config.write_text(f'[host]\nadmin_token = "{ADMIN}"\n[host.limits]\nrate_per_s = 100000.0\n'
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

        trio.run(_drive_then_kill, server, ledger, seconds, totals if replay else None, rng)
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
    if replay:
        check_logs(workdir, ledger, totals)
    return totals


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cycles", type=int, default=200)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--synchronous", choices=["NORMAL", "FULL"], default="NORMAL",
                        help="the store's synchronous mode")
    parser.add_argument("--journal-commits", choices=["thread", "loop"], default="thread",
                        help="where journal commits run (loop: NORMAL only)")
    parser.add_argument("--replay", action=argparse.BooleanOptionalAction, default=True,
                        help="check each resume's replay and the outbound logs")
    args = parser.parse_args()
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        totals = run(args.cycles, Path(tmp), args.seed, verbose=True,
                     synchronous=args.synchronous, journal_commits=args.journal_commits,
                     replay=args.replay)
    print(f"cycles {totals.cycles}  acknowledged {totals.acknowledged}  lost {totals.lost}  "
          f"invented {totals.invented}  resume failures {totals.resume_failures}  "
          f"invariant failures {totals.check_failures}  "
          f"replay failures {totals.replay_failures}  "
          f"({time.monotonic() - started:.0f} s)")
    for problem in totals.problems[:20]:
        print("  " + problem)
    return 0 if not (totals.lost or totals.invented or totals.check_failures
                     or totals.resume_failures or totals.replay_failures) else 1


if __name__ == "__main__":
    raise SystemExit(main())
