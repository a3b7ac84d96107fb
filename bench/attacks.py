"""Attacks: the audit's attacks (issue #12) replayed against a real host, with a bystander.

    python bench/attacks.py [--quick] [--attack NAME ...] [--list]

For each attack a fresh ``worldhost serve`` runs on a temporary store with its
default limits (the admin token from ``WORLDHOST_ADMIN_TOKEN``). A bystander,
a process of its own with a raw-socket client, pings the host 80 times a second
the whole time; the attack runs from this process over its own connections,
on loopback only. Printed per attack: the bystander's ping p50/p99 before,
during (from the attack's first byte until the attacker has left) and after
(the 10 s that follow), the p99 ratio during/before, and the host's resident
memory (``VmRSS``) before, at its peak, and 1 s, 5 s and 10 s after the attacker
left. Targets (issue #12): p99 during < 100 ms (and after: work an attack left
behind counts too); RSS 10 s after within 50 MiB of RSS before; after the slot
attack the admin still gets a session, during the idle-socket attack a
legitimate client gets one within 1 s.

Bystander latency is measured from when each ping was due (every 12.5 ms), so
a stalled host counts every ping it kept from being sent, not only the one in
flight. Every attack is bounded in size, and in time: an attacker the host is
still busy with after ``--max-attack-s`` (20 s) leaves. The run stops by itself,
in about 3 minutes against a host that turns the attacks away, up to 6 against
one that chews on them (``--quick``: smaller attacks, shorter windows, RSS
judged at 3 s instead of 10 s).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import cbor2

sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
from serverproc import ServerProcess

MiB = 1 << 20
ADMIN = "attacks-bench-admin"
P99_TARGET_S = 0.100
RSS_TARGET_KB = 50 * 1024
SERVED_TARGET_S = 1.0
BYSTANDER_HZ = 80.0
TEXT, BINARY, CLOSE, PING, PONG = 0x1, 0x2, 0x8, 0x9, 0xA
# A signal's head as the host encodes it: signal, then re (replies only), then seq, data.
_HEAD = re.compile(rb'\{"signal":"([^"]*)"(?:,"re":(-?\d+|"[^"]*"|null))?')


# --- a raw WebSocket client: no framework, so its own cost stays negligible -------------

def frame_head(opcode: int, n: int) -> bytes:
    """A final client frame's header for an ``n``-byte payload, with a zero mask."""
    if n < 126:
        return bytes([0x80 | opcode, 0x80 | n, 0, 0, 0, 0])
    if n < 65536:
        return bytes([0x80 | opcode, 0x80 | 126]) + n.to_bytes(2, "big") + b"\0\0\0\0"
    return bytes([0x80 | opcode, 0x80 | 127]) + n.to_bytes(8, "big") + b"\0\0\0\0"


class Closed(Exception):
    """The host closed the connection (a close frame, or EOF)."""

    def __init__(self, code: int | None, reason: str = "") -> None:
        super().__init__(f"closed {code} {reason}".strip())
        self.code = code
        self.reason = reason


class Refused(Exception):
    """The host answered the handshake with something other than 101."""


class RawWS:
    """A blocking client WebSocket over a plain socket, loopback only. Frames go out
    with a zero masking key (legal, and no per-byte masking of 16 MiB in Python)."""

    opened: ClassVar[list[socket.socket]] = []  # the attacker's, for the watchdog to cut

    def __init__(self, port: int, timeout: float = 60.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.opened.append(self.sock)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = bytearray()
        self.next_id = 0

    @classmethod
    def connect(cls, port: int, timeout: float = 60.0) -> RawWS:
        ws = cls(port, timeout)
        ws.send_handshake()
        ws.read_handshake()
        return ws

    def send_handshake(self) -> None:
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall((f"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
                           f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                           f"Sec-WebSocket-Version: 13\r\n\r\n").encode())

    def read_handshake(self) -> None:
        while b"\r\n\r\n" not in self.buf:
            self._fill()
        head, _, rest = bytes(self.buf).partition(b"\r\n\r\n")
        self.buf = bytearray(rest)
        status = head.split(b"\r\n", 1)[0].decode("latin-1")
        if " 101 " not in status + " ":
            raise Refused(status)

    def _fill(self) -> None:
        data = self.sock.recv(1 << 20)
        if not data:
            raise Closed(None, "EOF")
        self.buf += data

    def _take(self, n: int) -> bytes:
        while len(self.buf) < n:
            self._fill()
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    def send_frame(self, opcode: int, payload: bytes) -> None:
        if len(payload) < 65536:
            self.sock.sendall(frame_head(opcode, len(payload)) + payload)
        else:  # no copy of a big payload
            self.sock.sendall(frame_head(opcode, len(payload)))
            self.sock.sendall(payload)

    def send_json(self, value: Any) -> None:
        self.send_frame(TEXT, json.dumps(value, separators=(",", ":")).encode())

    def recv(self) -> bytes:
        """The next data frame's payload (pings answered, fragments joined)."""
        parts: list[bytes] = []
        while True:
            b0, b1 = self._take(2)
            n = b1 & 0x7F
            if n == 126:
                n = int.from_bytes(self._take(2), "big")
            elif n == 127:
                n = int.from_bytes(self._take(8), "big")
            payload = self._take(n)
            opcode = b0 & 0x0F
            if opcode == PING:
                self.send_frame(PONG, payload)
                continue
            if opcode == PONG:
                continue
            if opcode == CLOSE:
                code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else None
                raise Closed(code, payload[2:].decode("utf-8", "replace"))
            parts.append(payload)
            if b0 & 0x80:
                return b"".join(parts)

    def request(self, action: str, params: dict[str, Any]) -> int:
        self.next_id += 1
        self.send_json({"id": self.next_id, "action": action, "params": params})
        return self.next_id

    def reply(self, rid: int) -> tuple[str, bytes]:
        """Wait for the reply to ``rid``: its signal name and frame. Big frames are not
        parsed (only their head), so reading them costs the attacker little CPU."""
        want = str(rid).encode()
        while True:
            frame = self.recv()
            match = _HEAD.match(frame[:256])
            if match and match.group(2) == want:
                return match.group(1).decode(), frame

    def call(self, action: str, params: dict[str, Any]) -> tuple[str, bytes]:
        return self.reply(self.request(action, params))

    def close(self) -> None:
        """Leave: FIN, without a close handshake (as a vanished client would)."""
        try:
            self.sock.close()
        except OSError:
            pass


def describe(signal_name: str, frame: bytes) -> str:
    """``signal`` or ``error code: message`` for a reply, shortened."""
    if signal_name != "error" or len(frame) > 65536:
        return signal_name
    data = json.loads(frame).get("data", {})
    return f"error {data.get('code')}: {str(data.get('message'))[:70]}"


# --- the bystander: a process of its own, pinging on a fixed schedule -------------------

def bystander_main(port: int, hz: float, lifetime: float) -> None:
    """Ping every 1/hz s; print ``due latency`` per ping, where latency runs from when
    the ping was due (pings a stall kept from being sent count too). Reconnects with
    ``session.resume`` if dropped. Stops after ``lifetime`` s or when stdout closes."""
    out = sys.stdout
    ws, session = _bystander_session(port, None)
    out.write("ready\n")
    out.flush()
    interval = 1.0 / hz
    due = time.monotonic()
    end = due + lifetime
    while due < end:
        now = time.monotonic()
        if now < due:
            time.sleep(due - now)
        try:
            name, _ = ws.call("host.ping", {})
            if name != "host.pong":
                out.write(f"E {due:.6f} {name}\n")
        except (OSError, Closed) as exc:
            out.write(f"E {due:.6f} dropped: {exc}\n")
            ws.close()
            ws, session = _bystander_session(port, session)
        done = time.monotonic()
        lines = []
        while due <= done:
            lines.append(f"{due:.6f} {done - due:.6f}\n")
            due += interval
        try:
            out.write("".join(lines))
            out.flush()
        except BrokenPipeError:
            return


def _bystander_session(port: int, session: dict[str, Any] | None) -> tuple[RawWS, dict[str, Any]]:
    deadline = time.monotonic() + 60
    while True:
        try:
            ws = RawWS.connect(port, timeout=300)  # a stalled host is not a dropped one
            ws.recv()  # server.info
            if session is None:
                name, frame = ws.call("session.open", {"name": "bystander"})
            else:
                name, frame = ws.call("session.resume", {
                    "session_id": session["session_id"], "resume_token": session["resume_token"]})
            if name in ("session.opened", "session.resumed"):
                return ws, json.loads(frame)["data"]
            ws.close()
            session = None  # could not resume: a new session
        except (OSError, Closed, Refused):
            pass
        if time.monotonic() > deadline:
            raise SystemExit("bystander: could not get back in within 60 s")
        time.sleep(0.05)


class Bystander:
    """The bystander process and what it reported."""

    def __init__(self, port: int, hz: float) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--bystander", str(port), "--hz", str(hz)],
            stdout=subprocess.PIPE, text=True, bufsize=1)
        self.samples: list[tuple[float, float]] = []  # (due, latency)
        self.interval = 1.0 / hz
        self.events: list[tuple[float, str]] = []
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()
        if not self.ready.wait(20):
            self.stop()
            raise RuntimeError("the bystander did not get a session")

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line == "ready\n":
                self.ready.set()
            elif line.startswith("E "):
                _, due, what = line.rstrip("\n").split(" ", 2)
                self.events.append((float(due), what))
            else:
                due, latency = line.split()
                self.samples.append((float(due), float(latency)))

    def catch_up(self, until: float, timeout: float) -> None:
        """Wait (a while) for the bystander to report every ping due before ``until``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and (not self.samples or self.samples[-1][0] < until):
            time.sleep(0.05)

    def window(self, start: float, end: float) -> list[float]:
        """Latencies of the pings due in [start, end). Pings not reported yet (the host
        has not answered) count with how long they have waited so far: a lower bound."""
        samples = list(self.samples)
        out = [lat for due, lat in samples if start <= due < end]
        now = time.monotonic()
        due = max(start, samples[-1][0] + self.interval if samples else start)
        while due < end:
            out.append(now - due)
            due += self.interval
        return out

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


# --- the host's memory ---------------------------------------------------------------

def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


class RssSampler:
    """Samples the host's RSS every 20 ms in a thread, for the peak."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            try:
                self.samples.append((time.monotonic(), rss_kb(self.pid)))
            except OSError:
                return  # the host is gone

    def peak(self, start: float, end: float) -> int:
        return max((kb for t, kb in list(self.samples) if start <= t <= end), default=0)

    def stop(self) -> None:
        self._stop.set()
        self.thread.join()


# --- the attacks ------------------------------------------------------------------------

@dataclass
class Outcome:
    note: str
    served: bool | None = None  # for attacks on admission: did the legitimate party get in
    served_what: str = ""


@dataclass
class Sizes:
    bomb_small: int = 4 * MiB
    bomb_big: int = 16 * MiB  # the host's default max_frame_bytes
    replay_pings: int = 60
    replay_bytes: int = 8 * MiB
    slot_drops: int = 100
    chunk_pieces: int = 5000
    hold_transfers: int = 4
    hold_pieces: int = 32  # of 1 MiB each, sent per transfer…
    hold_count: int = 256  # …of this many announced: max_transfer_bytes by default
    big_ids: int = 10
    big_id_bytes: int = 8 * MiB
    idle_sockets: int = 300


def cbor_bomb(size: int) -> Callable[[int, Sizes], Outcome]:
    """One binary frame before any session: an array of N empty maps, N filling the frame."""
    def attack(port: int, sizes: Sizes) -> Outcome:
        n = size - 5
        return _bomb(port, BINARY, b"\x9a" + n.to_bytes(4, "big") + b"\xa0" * n, n)
    return attack


def json_bomb(port: int, sizes: Sizes) -> Outcome:
    """One text frame before any session: ``[{},{},...]`` filling the frame."""
    n = (sizes.bomb_big - 1) // 3
    return _bomb(port, TEXT, b"[" + b"{}," * (n - 1) + b"{}]", n)


def _bomb(port: int, opcode: int, payload: bytes, items: int) -> Outcome:
    ws = RawWS.connect(port, timeout=300)  # the watchdog ends the wait (max_attack_s)
    ws.recv()  # server.info
    started = time.monotonic()
    try:
        ws.send_frame(opcode, payload)
        frame = ws.recv()
        if opcode == BINARY:  # the reply comes in the request's encoding
            frame = json.dumps(cbor2.loads(frame), separators=(",", ":")).encode()
        match = _HEAD.match(frame[:256])
        what = describe(match.group(1).decode() if match else "?", frame)
    except Closed as exc:
        what = f"closed {exc.code}"
    except OSError as exc:
        what = f"socket error {exc}"
    ws.close()
    return Outcome(f"{len(payload) / MiB:.0f} MiB frame of {items:,} items: "
                   f"{what} after {time.monotonic() - started:.2f} s")


def replay_pin(port: int, sizes: Sizes) -> Outcome:
    """Big pings whose replies the session's replay buffer keeps; then vanish, resumable."""
    ws = RawWS.connect(port)
    ws.recv()
    name, frame = ws.call("session.open", {"name": "pinner"})
    if name != "session.opened":
        return Outcome(f"session.open: {describe(name, frame)}")
    pad = "x" * sizes.replay_bytes
    answered = 0
    what = "all answered"
    try:
        for i in range(sizes.replay_pings):
            name, frame = ws.call("host.ping", {"pad": pad, "i": i})
            if name != "host.pong":
                what = describe(name, frame)
                break
            answered += 1
    except Closed as exc:
        what = f"closed {exc.code} {exc.reason}"
    except OSError as exc:
        what = f"socket error {exc}"
    ws.close()
    return Outcome(f"{answered}/{sizes.replay_pings} pings of "
                   f"{sizes.replay_bytes / MiB:.0f} MiB answered ({what}); left resumable")


def slot_exhaustion(port: int, sizes: Sizes) -> Outcome:
    """Open-and-drop sessions (25 connections at a time, under the per-address limit),
    then a fresh client and the admin try to get in."""
    started = time.monotonic()
    opened = refused = 0
    reasons: set[str] = set()
    batch = 25
    for first in range(0, sizes.slot_drops, batch):
        conns = []
        for _ in range(min(batch, sizes.slot_drops - first)):
            ws = RawWS(port)
            ws.send_handshake()
            conns.append(ws)
        for i, ws in enumerate(conns):
            try:
                ws.read_handshake()
                ws.recv()  # server.info
                ws.request("session.open", {"name": f"drop{first + i}"})
            except (Refused, Closed, OSError) as exc:
                refused += 1
                reasons.add(str(exc)[:40])
        for ws in conns:
            try:
                name, _ = ws.reply(ws.next_id) if ws.next_id else ("", b"")
                opened += name == "session.opened"
            except (Closed, OSError):
                pass
            ws.close()
    elapsed = time.monotonic() - started
    time.sleep(0.2)  # the host notices the drops
    fresh = _try_open(port, {"name": "fresh"})
    admin = _try_open(port, {"name": "admin", "token": ADMIN})
    refusals = f", {refused} refused ({'; '.join(sorted(reasons))})" if refused else ""
    return Outcome(f"{opened}/{sizes.slot_drops} sessions opened and dropped in {elapsed:.2f} s"
                   f"{refusals}; fresh client: {fresh[1]}",
                   served=admin[0], served_what=f"admin: {admin[1]}")


def _try_open(port: int, params: dict[str, Any]) -> tuple[bool, str]:
    try:
        ws = RawWS.connect(port, timeout=10)
        ws.recv()
        name, frame = ws.call("session.open", params)
        ws.close()
        return name == "session.opened", "got in" if name == "session.opened" \
            else describe(name, frame)
    except (Refused, Closed, OSError) as exc:
        return False, f"refused: {exc}"


def chunk_flood(port: int, sizes: Sizes) -> Outcome:
    """Pieces of one never-ending chunked transfer, back to back, before any session."""
    ws = RawWS.connect(port)
    ws.recv()
    piece = "x" * 100
    frames = []
    for i in range(sizes.chunk_pieces):
        text = json.dumps({"chunk": {"transfer": "flood", "index": i, "count": 10**9,
                                     "payload": piece}}, separators=(",", ":")).encode()
        frames.append(frame_head(TEXT, len(text)) + text)
    blob = b"".join(frames)
    started = time.monotonic()
    try:
        ws.sock.sendall(blob)
        sent = time.monotonic() - started
        name, frame = ws.call("host.ping", {})
        what = f"then a ping on it: {describe(name, frame)}"
    except Closed as exc:
        sent = time.monotonic() - started
        what = f"connection closed {exc.code} {exc.reason}"
    except OSError as exc:
        sent = time.monotonic() - started
        what = f"socket error {exc}"
    ws.close()
    return Outcome(f"{sizes.chunk_pieces:,} pieces ({len(blob) / MiB:.1f} MiB) sent in "
                   f"{sent:.3f} s; {what}")


def chunk_hold(port: int, sizes: Sizes) -> Outcome:
    """Chunked transfers announced at the size limit, never finished, held open 2 s by a
    session (so no handshake timeout ends them)."""
    ws = RawWS.connect(port)
    ws.recv()
    name, frame = ws.call("session.open", {"name": "holder"})
    if name != "session.opened":
        return Outcome(f"session.open: {describe(name, frame)}")
    piece = b"x" * MiB
    sent = 0
    what = "held"
    try:
        for t in range(sizes.hold_transfers):
            for i in range(sizes.hold_pieces):
                head = (f'{{"chunk":{{"transfer":"hold{t}","index":{i},'
                        f'"count":{sizes.hold_count},"payload":"').encode()
                ws.send_frame(TEXT, head + piece + b'"}}')
                sent += 1
        name, frame = ws.call("host.ping", {})
        what = f"held; a ping on it: {describe(name, frame)}"
        time.sleep(2)
    except Closed as exc:
        what = f"connection closed {exc.code} {exc.reason}"
    except OSError as exc:
        what = f"socket error {exc}"
    ws.close()
    return Outcome(f"{sizes.hold_transfers} transfers of {sizes.hold_count} MiB announced, "
                   f"{sent} pieces of 1 MiB sent; {what}")


def big_ids(port: int, sizes: Sizes) -> Outcome:
    """``map.add_node`` with ids of megabytes: kept in the world, the journal, broadcasts."""
    ws = RawWS.connect(port)
    ws.recv()
    name, frame = ws.call("session.open", {"name": "bigids"})
    if name != "session.opened":
        return Outcome(f"session.open: {describe(name, frame)}")
    added = 0
    what = "all added"
    try:
        for i in range(sizes.big_ids):
            node_id = f"{i}-" + "x" * (sizes.big_id_bytes - 8)
            name, frame = ws.call("map.add_node", {"id": node_id, "x": float(i), "y": 0.0})
            if name != "map.node_added":
                what = describe(name, frame)
                break
            added += 1
    except Closed as exc:
        what = f"closed {exc.code} {exc.reason}"
    except OSError as exc:
        what = f"socket error {exc}"
    ws.close()
    return Outcome(f"{added}/{sizes.big_ids} nodes with {sizes.big_id_bytes / MiB:.0f} MiB ids "
                   f"added ({what})")


def idle_sockets(port: int, sizes: Sizes) -> Outcome:
    """TCP connections that never send a byte; then a legitimate client comes."""
    socks = []
    try:
        for _ in range(sizes.idle_sockets):
            socks.append(socket.create_connection(("127.0.0.1", port), timeout=10))
        time.sleep(0.5)
        started = time.monotonic()
        ok, what = _try_open(port, {"name": "late"})
        waited = time.monotonic() - started
        time.sleep(1)
    finally:
        for s in socks:
            s.close()
    return Outcome(f"{len(socks)} idle sockets held", served=ok and waited < SERVED_TARGET_S,
                   served_what=f"late client: {what} in {waited * 1000:.0f} ms")


ATTACKS: dict[str, tuple[str, Callable[[int, Sizes], Outcome]]] = {
    "cbor-4m": ("CBOR decode bomb, 4 MiB", lambda port, s: cbor_bomb(s.bomb_small)(port, s)),
    "cbor-16m": ("CBOR decode bomb, 16 MiB", lambda port, s: cbor_bomb(s.bomb_big)(port, s)),
    "json-16m": ("JSON decode bomb, 16 MiB", json_bomb),
    "replay": ("replay-buffer pinning", replay_pin),
    "slots": ("session slot exhaustion", slot_exhaustion),
    "chunk-flood": ("chunk piece flood", chunk_flood),
    "chunk-hold": ("unfinished chunked transfers held", chunk_hold),
    "big-ids": ("oversized ids in map.add_node", big_ids),
    "idle": ("idle sockets that never handshake", idle_sockets),
}


# --- one attack, measured -----------------------------------------------------------------

@dataclass
class Result:
    name: str
    before: list[float] = field(default_factory=list)
    during: list[float] = field(default_factory=list)
    after: list[float] = field(default_factory=list)
    rss_before: int = 0
    rss_peak: int = 0
    rss_after: dict[float, int] = field(default_factory=dict)
    outcome: Outcome | None = None
    died: str = ""
    bystander_events: list[str] = field(default_factory=list)

    def p(self, values: list[float], q: float) -> float:
        ordered = sorted(values)
        return ordered[min(len(ordered) - 1, int(len(ordered) * q))] if ordered else float("nan")

    def failures(self) -> list[str]:
        why = []
        if self.died:
            why.append("host died")
        if not self.p(self.during, 0.99) < P99_TARGET_S:
            why.append("p99")
        if self.after and not self.p(self.after, 0.99) < P99_TARGET_S:
            why.append("p99 after")  # work the attack left behind stalls the host too
        if self.rss_after and max(self.rss_after.items())[1] - self.rss_before >= RSS_TARGET_KB:
            why.append("RSS")
        if self.outcome is not None and self.outcome.served is False:
            why.append("locked out")
        return why


def measure(name: str, sizes: Sizes, before_s: float, after_marks: tuple[float, ...],
            max_attack_s: float, config: Path | None) -> Result:
    attack = ATTACKS[name][1]
    result = Result(name)
    with tempfile.TemporaryDirectory(prefix="worldhost-attacks-") as tmp:
        server = ServerProcess(Path(tmp) / "world.db", config=config,
                               env={"WORLDHOST_ADMIN_TOKEN": ADMIN})
        server.start()
        assert server.proc is not None
        sampler = RssSampler(server.proc.pid)
        bystander = None
        try:
            bystander = Bystander(server.port, BYSTANDER_HZ)
            time.sleep(0.5)  # warm up
            start = time.monotonic()
            time.sleep(before_s)
            result.rss_before = rss_kb(server.proc.pid)
            attacked = time.monotonic()
            gave_up = threading.Event()
            watchdog = threading.Timer(max_attack_s, _give_up, (gave_up,))
            watchdog.start()
            try:
                result.outcome = attack(server.port, sizes)
            except (OSError, Closed, Refused) as exc:
                result.outcome = Outcome(f"attack cut short: {exc}")
            finally:
                watchdog.cancel()
                RawWS.opened.clear()
            left = time.monotonic()
            if gave_up.is_set() and result.outcome is not None:
                result.outcome.note = (f"the host was still busy after {max_attack_s:g} s: "
                                       f"the attacker left; {result.outcome.note}")
            for mark in after_marks:
                time.sleep(max(0.0, left + mark - time.monotonic()))
                if server.proc.poll() is not None:
                    break
                result.rss_after[mark] = rss_kb(server.proc.pid)
            if server.proc.poll() is not None:
                result.died = f"exit code {server.proc.returncode}"
            result.rss_peak = sampler.peak(attacked, left + after_marks[-1])
            bystander.catch_up(left + after_marks[-1], timeout=5)
            result.before = bystander.window(start, attacked)
            result.during = bystander.window(attacked, left)
            result.after = bystander.window(left, left + after_marks[-1])
            result.bystander_events = [what for due, what in bystander.events if due >= attacked]
        finally:
            if bystander is not None:
                bystander.stop()
            sampler.stop()
            _stop(server)
    return result


def _give_up(flag: threading.Event) -> None:
    """The attack ran out of time (the host chews on it): cut the attacker's sockets,
    which ends whatever it was waiting for."""
    flag.set()
    for sock in list(RawWS.opened):
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


def _stop(server: ServerProcess) -> None:
    assert server.proc is not None
    try:  # a host still busy with a bomb cannot take the signal until it is done
        server.stop(signal.SIGTERM, timeout=5)
    except subprocess.TimeoutExpired:
        server.kill9()


# --- the report ---------------------------------------------------------------------------

def report(results: list[Result], rss_mark: float) -> None:
    ms = 1000.0
    print(f"\nbystander ping (ms) and host RSS (MiB); targets: p99 during and after < "
          f"{P99_TARGET_S * ms:.0f} ms, RSS {rss_mark:g} s after within "
          f"{RSS_TARGET_KB // 1024} MiB of before")
    marks = sorted({m for r in results for m in r.rss_after} | {rss_mark})
    print(f"{'attack':<12} {'p50 bef':>7} {'p99 bef':>7} {'p50 dur':>7} {'p99 dur':>8} "
          f"{'ratio':>6} {'p99 aft':>7}  {'RSS bef':>7} {'peak':>6} "
          + " ".join(f"{'+' + format(m, 'g') + 's':>6}" for m in marks)
          + f" {'after-bef':>9}  verdict")
    for r in results:
        p99b, p99d = r.p(r.before, 0.99), r.p(r.during, 0.99)
        last = r.rss_after.get(rss_mark)
        delta = f"{(last - r.rss_before) / 1024:+9.0f}" if last is not None else f"{'-':>9}"
        fails = r.failures()
        print(f"{r.name:<12} {r.p(r.before, 0.5) * ms:7.1f} {p99b * ms:7.1f} "
              f"{r.p(r.during, 0.5) * ms:7.1f} {p99d * ms:8.1f} {p99d / p99b:6.1f} "
              f"{r.p(r.after, 0.99) * ms:7.1f}  {r.rss_before / 1024:7.0f} {r.rss_peak / 1024:6.0f} "
              + " ".join(f"{r.rss_after[m] / 1024:6.0f}" if m in r.rss_after else f"{'-':>6}"
                         for m in marks)
              + f" {delta}  " + ("PASS" if not fails else "FAIL (" + ", ".join(fails) + ")"))
    print()
    for r in results:
        o = r.outcome
        lines = [o.note if o else "no outcome"]
        if o and o.served is not None:
            lines.append(f"{o.served_what} ({'ok' if o.served else 'NOT served'})")
        if r.died:
            lines.append(f"the host died: {r.died}")
        if r.bystander_events:
            lines.append(f"bystander: {len(r.bystander_events)} event(s), first: "
                         f"{r.bystander_events[0]}")
        lines.append(f"{len(r.during)} pings due during the attack")
        print(f"{r.name}: {ATTACKS[r.name][0]}: " + "; ".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="attacks: " + ", ".join(f"{k} ({v[0]})" for k, v in ATTACKS.items()))
    parser.add_argument("--attack", action="append", choices=sorted(ATTACKS), metavar="NAME",
                        help="run only this attack (repeatable; default: all)")
    parser.add_argument("--quick", action="store_true",
                        help="smaller attacks and shorter windows, for iterating")
    parser.add_argument("--list", action="store_true", help="list the attacks and exit")
    parser.add_argument("--config", type=Path, metavar="FILE",
                        help="the host's config (default: none, the built-in defaults)")
    parser.add_argument("--max-attack-s", type=float, default=20.0, metavar="S",
                        help="an attacker still waiting on the host after S s leaves "
                             "(default 20)")
    parser.add_argument("--bystander", type=int, metavar="PORT", help=argparse.SUPPRESS)
    parser.add_argument("--hz", type=float, default=BYSTANDER_HZ, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.bystander is not None:
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        bystander_main(args.bystander, args.hz, lifetime=600)
        return
    if args.list:
        for key, (what, _) in ATTACKS.items():
            print(f"{key:<12} {what}")
        return
    names = args.attack or list(ATTACKS)
    marks: tuple[float, ...]
    if args.quick:
        sizes = Sizes(bomb_big=8 * MiB, replay_pings=10, slot_drops=100, chunk_pieces=5000,
                      hold_pieces=8, big_ids=3, idle_sockets=200)
        before_s, marks = 1.0, (1.0, 3.0)
    else:
        sizes, before_s, marks = Sizes(), 2.0, (1.0, 5.0, 10.0)
    os.environ.setdefault("WORLDHOST_LOG", "WARNING")
    results = []
    for name in names:
        print(f"{name}: {ATTACKS[name][0]} ...", flush=True)
        results.append(measure(name, sizes, before_s, marks, args.max_attack_s, args.config))
    report(results, marks[-1])


if __name__ == "__main__":
    main()
