"""Kill -9 the host at random moments and check that nothing acknowledged is lost.

Each cycle: start ``worldhost serve`` on the same store file, resume the three
clients' sessions (opened in the first cycle), let them send world-changing
actions with unique request ids while the simulation ticks, SIGKILL the host at
a random moment, run ``PRAGMA quick_check``, restart, and compare the world
with what the clients were told.

    python bench/killtest.py --cycles 200 [--worlds 3]

prints acknowledged / lost / invented counts; the test suite runs 20 cycles.
With ``--worlds N`` (N > 1) the clients (N of them, at least three) are spread
over N worlds (``main`` and ``w1``…), each with its own map and running
simulation: a resumed session must still be in its world, and each world's
store is checked on its own (an action that landed in another world counts as
lost in its own and invented in the other).

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


def world_ids(worlds: int) -> list[str]:
    """``main`` (the default world, the ``--db`` file) and ``w1``… beside it."""
    return ["main"] + [f"w{i}" for i in range(1, worlds)]


@dataclass
class Ledger:
    """What the clients sent and what they were told; ``homes`` maps each client
    to the world it joined (empty with one world: no client joins)."""

    homes: dict[str, str] = field(default_factory=dict)
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


async def _check_home(ws, name: str, home: str | None,  # type: ignore[no-untyped-def]
                      ledger: Ledger, totals: Totals | None) -> None:
    """A resumed session is still in the world it had joined, not the default one."""
    if home is None:
        return
    reply = await _call(ws, {"id": f"{name}-where-{ledger.counter}", "action": "world.list",
                             "params": {}}, ledger.seen.setdefault(name, {}) if totals else None)
    if reply["data"].get("joined") != home:
        raise RuntimeError(f"{name} resumed in {reply['data'].get('joined')}, not {home}")


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
    changed = [s for s, text in zip(seqs, replayed)
               if s in seen and _as_logged(seen[s]) != _as_logged(text)]
    if changed:
        problems.append(f"{name}: seqs {changed[:5]} replayed differently")
    for s, text in zip(seqs, replayed):
        seen[s] = text
    totals.replay_failures += len(problems)
    totals.problems += problems


TOKEN_REPLIES = ("session.opened", "session.resumed")  # logged without their resume_token


def _as_logged(text: str) -> str:
    """A signal as read, as the outbound log keeps it: byte for byte, but for the
    replies that hand out a resume token, which the store never holds."""
    msg = json.loads(text)
    if msg.get("signal") not in TOKEN_REPLIES:
        return text
    msg["data"] = {k: v for k, v in msg["data"].items() if k != "resume_token"}
    return json.dumps(msg, sort_keys=True)


def check_logs(workdir: Path, ledger: Ledger, totals: Totals, worlds: int = 1) -> None:
    """``--replay``: each client read every seq from its first on (none missed), and
    every signal the stores' outbound logs hold for it is the one it read."""
    for name, seen in ledger.seen.items():
        gaps = sorted(set(range(min(seen), max(seen) + 1)) - set(seen)) if seen else []
        if gaps:
            totals.replay_failures += 1
            totals.problems.append(f"{name}: never read seqs {gaps[:5]}")
    sessions = {str(known["session_id"]): name for name, known in ledger.sessions.items()}
    for db in (*store_files(workdir / "kill.db", worlds), workdir / "kill.server.db"):
        if not db.exists():
            continue
        conn = sqlite3.connect(db)
        rows = conn.execute("SELECT o.session, o.seq, d.signal, d.data FROM outbound o "
                            "JOIN outbound_data d ON d.pos = o.pos").fetchall()
        conn.close()
        for sid, seq, signal, data in rows:
            text = ledger.seen.get(sessions.get(sid, ""), {}).get(seq)
            if text is None:
                continue  # logged, never read: sent after the client's last read
            msg = json.loads(_as_logged(text))
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
            home = ledger.homes.get(name)
            if known is None:
                reply = await _call(ws, {"id": f"{name}-open", "action": "session.open",
                                         "params": {"name": name, "token": ADMIN}})
                data = reply["data"]
                ledger.sessions[name] = {"session_id": data["session_id"],
                                         "resume_token": data["resume_token"], "last_seq": 0}
                if home is not None:
                    reply = await _call(ws, {"id": f"{name}-join", "action": "world.join",
                                             "params": {"world_id": home}},
                                        ledger.seen.setdefault(name, {}) if totals else None)
                    if reply["signal"] != "world.joined":
                        raise RuntimeError(f"{name} could not join {home}: {reply['data']}")
            elif totals is not None and rng is not None:  # --replay
                seen = ledger.seen.setdefault(name, {})
                last_seq = max(0, max(seen, default=0) - rng.randint(0, 20))
                await ws.send_message(json.dumps({
                    "id": f"{name}-resume-{ledger.counter}", "action": "session.resume",
                    "params": {**known, "last_seq": last_seq}}))
                message = await ws.get_message()
                text = message if isinstance(message, str) else message.decode()
                reply = json.loads(text)
                if reply["signal"] != "session.resumed":
                    raise RuntimeError(f"{name} could not resume: {reply['data']}")
                known["resume_token"] = reply["data"]["resume_token"]
                ledger.resumed += 1
                seen[reply["seq"]] = text
                await _check_replay(ws, name, last_seq, reply, ledger, totals)
                await _check_home(ws, name, home, ledger, totals)
            else:
                reply = await _call(ws, {"id": f"{name}-resume-{ledger.counter}",
                                         "action": "session.resume", "params": known})
                if reply["signal"] != "session.resumed":
                    raise RuntimeError(f"{name} could not resume: {reply['data']}")
                known["resume_token"] = reply["data"]["resume_token"]
                await _check_home(ws, name, home, ledger, totals)
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


async def _drive(url: str, ledger: Ledger, seconds: float, clients: int,
                 totals: Totals | None = None, rng: random.Random | None = None) -> None:
    stop_at = trio.current_time() + seconds + 5
    async with trio.open_nursery() as nursery:
        for i in range(clients):
            nursery.start_soon(_client, url, f"client{i}", ledger, stop_at, totals, rng)


async def _drive_then_kill(server: ServerProcess, ledger: Ledger, seconds: float,
                           clients: int, totals: Totals | None = None,
                           rng: random.Random | None = None) -> None:
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_drive, server.url, ledger, seconds, clients, totals, rng)
            await trio.sleep(seconds)
            server.kill9()
    finally:
        if server.proc is not None and server.proc.poll() is None:
            server.kill9()  # a client failed first: leave no host ticking behind the error


def _worlds(url: str, worlds: int) -> dict[str, dict]:
    """Each world's slices, read by a session that joins it (none with one world)."""
    async def read() -> dict[str, dict]:
        # the project's client: after many cycles the world outgrows one frame, and
        # it reassembles a chunked reply
        out = {}
        async with connect(url, name="checker", token=ADMIN, reconnect=False) as checker:
            if worlds > 1:
                listed = {w["world_id"] for w in (await checker.call("world.list"))["worlds"]}
                if not set(world_ids(worlds)) <= listed:
                    raise RuntimeError(f"worlds missing after the restarts: {sorted(listed)}")
            for world_id in world_ids(worlds):
                if worlds > 1:
                    await checker.call("world.join", world_id=world_id)
                out[world_id] = (await checker.call("world.snapshot"))["slices"]
            await checker.call("session.close")
        return out
    return trio.run(read)


def _setup(url: str, worlds: int) -> None:
    """Every world gets the same small map, three trucks, 30 packages and a
    running simulation (so every world is loaded again at each restart)."""
    async def setup() -> None:
        async with open_websocket_url(url) as ws:
            await ws.get_message()
            await _call(ws, {"id": 1, "action": "session.open",
                             "params": {"name": "setup", "token": ADMIN}})
            for world_id in world_ids(worlds)[1:]:
                reply = await _call(ws, {"id": f"create-{world_id}", "action": "world.create",
                                         "params": {"world_id": world_id}})
                if reply["signal"] != "world.created":
                    raise RuntimeError(f"world.create {world_id}: {reply['data']}")
            for world_id in world_ids(worlds):
                if worlds > 1:
                    reply = await _call(ws, {"id": f"join-{world_id}", "action": "world.join",
                                             "params": {"world_id": world_id}})
                    if reply["signal"] != "world.joined":
                        raise RuntimeError(f"world.join {world_id}: {reply['data']}")
                await _populate(ws, world_id)
            await _call(ws, {"id": 4, "action": "session.close"})
    trio.run(setup)


async def _populate(ws, world_id: str) -> None:  # type: ignore[no-untyped-def]
    """The map, trucks, packages and running simulation of the world ``ws`` is in
    (request ids carry the world's id: a repeated id would get the first reply)."""
    nodes = [{"id": f"g{i}", "x": i, "y": 0, "building": None} for i in range(6)]
    edges = [{"id": f"e{i}{j}", "from": f"g{i}", "to": f"g{j}", "length": 1, "speed": 1}
             for i in range(6) for j in range(6) if abs(i - j) == 1]
    await _call(ws, {"id": f"{world_id}-map", "action": "map.import",
                     "params": {"map_data": {"nodes": nodes, "edges": edges}}})
    for t in range(3):
        await _call(ws, {"id": f"{world_id}-t{t}", "action": "simulation.add_agent",
                         "params": {"id": f"truck{t}", "kind": "truck", "node": "g0"}})
    for p in range(30):
        await _call(ws, {"id": f"{world_id}-p{p}", "action": "simulation.add_package",
                         "params": {"id": f"pkg{p}", "origin": f"g{p % 6}",
                                    "destination": f"g{(p + 3) % 6}"}})
    await _call(ws, {"id": f"{world_id}-start", "action": "simulation.start",
                     "params": {"tick_hz": 50}})


def _owner(item: str) -> str:
    """The client that sent an item (``client3-41`` → ``client3``)."""
    return item.rsplit("-", 1)[0]


def check(world: dict, ledger: Ledger, totals: Totals, world_id: str = "main") -> None:
    """One world against what its clients were told (every client, with one world)."""
    def here(items: set[str]) -> set[str]:
        if not ledger.homes:
            return items
        return {i for i in items if ledger.homes.get(_owner(i)) == world_id}

    present = {k[len("node:"):] for k in world["map"] if k.startswith("node:client")}
    present |= {k[len("package:"):] for k in world["simulation"] if k.startswith("package:")}
    present = {p for p in present if p.startswith("client")}
    lost = here(ledger.acked) - present
    invented = present - here(ledger.sent)
    totals.lost += len(lost)
    totals.invented += len(invented)
    where = f"{world_id}: " if ledger.homes else ""
    if lost or invented:
        totals.problems.append(f"{where}lost {sorted(lost)[:5]} invented {sorted(invented)[:5]}")
    nodes = {k[5:] for k in world["map"] if k.startswith("node:")}
    for key, edge in world["map"].items():
        if key.startswith("edge:") and not {edge["from"], edge["to"]} <= nodes:
            totals.check_failures += 1
            totals.problems.append(f"{where}dangling edge {key}")
    agents = {k[6:]: a for k, a in world["simulation"].items() if k.startswith("agent:")}
    for key, package in world["simulation"].items():
        if not key.startswith("package:"):
            continue
        carriers = [a for a in agents.values() if package["id"] in a["cargo"]]
        in_transit = package["status"] == "in_transit"
        if in_transit != bool(carriers) or len(carriers) > 1 or \
                (in_transit and carriers[0]["id"] != package["carried_by"]):
            totals.check_failures += 1
            totals.problems.append(f"{where}package {package['id']} is not in exactly one place")
    for agent in agents.values():
        if agent["fuel"] < 0:
            totals.check_failures += 1
            totals.problems.append(f"{where}agent {agent['id']} has negative fuel")


def store_files(db: Path, worlds: int) -> list[Path]:
    """Each world's store: ``main`` is the ``--db`` file, the others are in the
    default worlds directory beside it."""
    return [db] + [db.parent / "worlds" / f"{w}.db" for w in world_ids(worlds)[1:]]


def run(cycles: int, workdir: Path, seed: int | None = None, verbose: bool = False,
        synchronous: str = "NORMAL", journal_commits: str = "thread", worlds: int = 1,
        clients: int | None = None, websocket: str | None = None,
        replay: bool = True) -> Totals:
    """Journal commits on the store's thread (the default), or in the event loop
    (``journal_commits = "loop"``, with NORMAL only; see state/saver.py): every path
    must lose nothing acknowledged (and, with ``replay``, replay what was sent).
    ``worlds`` > 1 spreads ``clients`` (default: three, or one per world if more) over
    that many worlds, client i in world i mod N. ``websocket`` sets ``[host]
    websocket`` (else the host's default)."""
    rng = random.Random(seed)
    clients = clients if clients is not None else max(CLIENTS, worlds)
    db = workdir / "kill.db"
    config = workdir / "kill.toml"
    library = f'websocket = "{websocket}"\n' if websocket else ""
    config.write_text(f'[host]\nadmin_token = "{ADMIN}"\n{library}[host.limits]\nrate_per_s = 100000.0\n'
                      '[sessions]\nresume_ttl_s = 3600\n'
                      f'[store]\nsynchronous = "{synchronous}"\n'
                      f'journal_commits = "{journal_commits}"\n'
                      '[plugins.session_cleanup]\nmax_sessions = 1000\n')
    ledger = Ledger()
    if worlds > 1:
        ids = world_ids(worlds)
        ledger.homes = {f"client{i}": ids[i % worlds] for i in range(clients)}
    totals = Totals()
    for cycle in range(cycles):
        server = ServerProcess(db, config=config).start()
        if cycle == 0:
            _setup(server.url, worlds)
        seconds = rng.uniform(0.2, 1.2)

        trio.run(_drive_then_kill, server, ledger, seconds, clients,
                 totals if replay else None, rng)
        for store in store_files(db, worlds):
            if not store.exists():  # connect() would create it
                result = "the store file is missing"
            else:
                conn = sqlite3.connect(store)
                result = conn.execute("PRAGMA quick_check").fetchone()[0]
                conn.close()
            if result != "ok":
                totals.check_failures += 1
                totals.problems.append(f"cycle {cycle}: {store.name}: quick_check {result}")
        totals.cycles += 1
        if verbose:
            print(f"cycle {cycle + 1}: {len(ledger.acked)} acknowledged so far", flush=True)
    server = ServerProcess(db, config=config).start()
    try:
        expected_resumes = ledger.resumed
        for world_id, world in _worlds(server.url, worlds).items():
            check(world, ledger, totals, world_id)
        totals.acknowledged = len(ledger.acked)
        totals.resume_failures = max(0, clients * (cycles - 1) - expected_resumes)
    finally:
        server.stop()
    if replay:
        check_logs(workdir, ledger, totals, worlds)
    return totals


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cycles", type=int, default=200)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--synchronous", choices=["NORMAL", "FULL"], default="NORMAL",
                        help="the store's synchronous mode")
    parser.add_argument("--journal-commits", choices=["thread", "loop"], default="thread",
                        help="where journal commits run (loop: NORMAL only)")
    parser.add_argument("--worlds", type=int, default=1,
                        help="spread the clients over this many worlds (1: the default world only)")
    parser.add_argument("--clients", type=int, default=None,
                        help=f"clients (default {CLIENTS}, or one per world if --worlds is more)")
    parser.add_argument("--websocket", choices=["trio-websocket", "websockets"], default=None,
                        help="the host's [host] websocket (default: the host's own)")
    parser.add_argument("--replay", action=argparse.BooleanOptionalAction, default=True,
                        help="check each resume's replay and the outbound logs")
    args = parser.parse_args()
    if args.worlds < 1:
        parser.error("--worlds must be at least 1")
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        totals = run(args.cycles, Path(tmp), args.seed, verbose=True,
                     synchronous=args.synchronous, journal_commits=args.journal_commits,
                     worlds=args.worlds, clients=args.clients, websocket=args.websocket,
                     replay=args.replay)
    print(f"cycles {totals.cycles}  worlds {args.worlds}  acknowledged {totals.acknowledged}  "
          f"lost {totals.lost}  invented {totals.invented}  "
          f"resume failures {totals.resume_failures}  "
          f"invariant failures {totals.check_failures}  "
          f"replay failures {totals.replay_failures}  "
          f"({time.monotonic() - started:.0f} s)")
    for problem in totals.problems[:20]:
        print("  " + problem)
    return 0 if not (totals.lost or totals.invented or totals.check_failures
                     or totals.resume_failures or totals.replay_failures) else 1


if __name__ == "__main__":
    raise SystemExit(main())
