"""A cheap load generator: many WebSocket (or TCP line) connections in one process.

The trio client of the other benchmarks costs about 100 µs of CPU per round
trip, as much as the server it measures, so on a small machine it, not the
server, sets the pace. This one speaks just enough WebSocket over plain
sockets and epoll: the frames it sends are built by formatting bytes into a
template and masking them with one integer XOR (the mask for each length is
computed once), and a reply is recognised by a byte search, never decoded. It
costs a fraction of what the servers do per round trip, so several of these
processes (or one) leave the server as the bottleneck.

Run by bench/roundtrip.py, one process per share of the connections:

    python bench/rawclient.py URL --conns N --action host.ping [--session] [--line]

``--action`` may name several phases, comma-separated (``host.ping,plan``), run
one after the other on the same connections; ``plan`` is the request of each
connection in ``--plan FILE`` (JSON: ``{"conns": [{"request": {"action", "params"},
"subscribe": [topics]}, ...]}``, by connection index), which is how
bench/process.py has each agent take its own turns.

It connects (and with ``--session`` opens a session on each connection; with
``--join W1,W2,...`` each then joins one of those worlds in turn), warms up,
prints ``ready`` and waits for a line on stdin; then every
connection makes round trips back to back for ``--seconds`` and it prints one
JSON line (and, with several phases, ``ready`` again for the next): the round-trip times (µs), its own CPU time over that window and
the time it was running or runnable (``busy``: CPU time plus time spent waiting
for a core, which on a loaded machine tells whether it could have gone faster).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import resource
import select
import socket
import struct
import sys
import time
from collections.abc import Callable
from urllib.parse import urlsplit

OP_TEXT = 0x1
OP_CLOSE = 0x8
OP_PING = 0x9
OP_PONG = 0xA


def cpu_seconds() -> float:
    """This process's user and system CPU time."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def run_wait_seconds(pid: int | str = "self") -> tuple[float, float]:
    """Seconds a process's main thread has spent on a CPU and waiting for one
    (runnable, not running) — from /proc/PID/schedstat."""
    run, wait = open(f"/proc/{pid}/schedstat").read().split()[:2]
    return int(run) / 1e9, int(wait) / 1e9


class Masker:
    """Client frames must be masked (RFC 6455 §5.3); one fixed random key per
    connection, the repeated key kept per payload length so masking is one XOR."""

    def __init__(self) -> None:
        self.key = os.urandom(4)
        self.by_length: dict[int, int] = {}

    def frame(self, payload: bytes, opcode: int = OP_TEXT) -> bytes:
        n = len(payload)
        mask = self.by_length.get(n)
        if mask is None:
            mask = self.by_length[n] = int.from_bytes((self.key * (n // 4 + 1))[:n], "big")
        if n < 126:
            head = struct.pack("!BB", 0x80 | opcode, 0x80 | n)
        elif n < 65536:
            head = struct.pack("!BBH", 0x80 | opcode, 0xFE, n)
        else:
            head = struct.pack("!BBQ", 0x80 | opcode, 0xFF, n)
        return head + self.key + (int.from_bytes(payload, "big") ^ mask).to_bytes(n, "big")


def parse_frames(buf: bytearray) -> list[tuple[int, bytes]]:
    """Whole (unmasked, server-sent) frames at the front of ``buf``, removed from it."""
    frames = []
    while len(buf) >= 2:
        n = buf[1] & 0x7F
        start = 2
        if n == 126:
            if len(buf) < 4:
                break
            n = (buf[2] << 8) | buf[3]
            start = 4
        elif n == 127:
            if len(buf) < 10:
                break
            n = struct.unpack_from("!Q", buf, 2)[0]
            start = 10
        end = start + n
        if len(buf) < end:
            break
        frames.append((buf[0] & 0x0F, bytes(buf[start:end])))
        del buf[:end]
    return frames


class Conn:
    """One connection's socket, receive buffer and outstanding request."""

    def __init__(self, url: str, line: bool) -> None:
        parts = urlsplit(url)
        self.sock = socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 80))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.line = line
        self.buf = bytearray()
        self.masker = Masker()
        self.rid = 0
        self.started = 0.0
        self.expect = b""
        self.pending: list[bytes] = []
        if not line:
            self.handshake(parts.netloc, parts.path or "/")

    def handshake(self, netloc: str, path: str) -> None:
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {netloc}\r\nUpgrade: websocket\r\n"
                          f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                          f"Sec-WebSocket-Version: 13\r\n\r\n".encode())
        while b"\r\n\r\n" not in self.buf:
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("closed during the handshake")
            self.buf += data
        head, _, rest = bytes(self.buf).partition(b"\r\n\r\n")
        if b" 101 " not in head.split(b"\r\n", 1)[0]:
            raise ConnectionError(f"handshake refused: {head[:200]!r}")
        self.buf = bytearray(rest)

    def send(self, payload: bytes) -> None:
        self.sock.sendall(payload + b"\n" if self.line else self.masker.frame(payload))

    def messages(self) -> list[bytes]:
        """The messages now in the buffer; answers the server's pings on the way."""
        if self.line:
            *lines, rest = self.buf.split(b"\n")
            self.buf = bytearray(rest)
            return [bytes(x) for x in lines]
        out = []
        for opcode, payload in parse_frames(self.buf):
            if opcode == OP_PING:
                self.sock.sendall(self.masker.frame(payload, OP_PONG))
            elif opcode == OP_CLOSE:
                raise ConnectionError(f"server closed: {payload!r}")
            elif opcode != OP_PONG:
                out.append(payload)
        return out

    def receive(self) -> bytes:
        """The next message, blocking (only while setting up)."""
        while not self.pending:
            self.pending += self.messages()
            if self.pending:
                break
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("connection closed")
            self.buf += data
        return self.pending.pop(0)


def call(conn: Conn, action: str, params: dict, answer: str) -> dict:
    """Send one request and wait for its reply (skipping any other signal), which
    must be ``answer``."""
    conn.send(json.dumps({"id": "setup", "action": action, "params": params}).encode())
    while True:
        msg = json.loads(conn.receive())
        if msg.get("re") == "setup":
            if msg.get("signal") != answer:
                raise RuntimeError(f"{action} {params}: {msg}")
            return msg


def open_session(conn: Conn, name: str) -> None:
    """server.info, session.open, session.opened and sync_state, as any client does."""
    conn.receive()  # server.info
    call(conn, "session.open", {"name": name}, "session.opened")
    conn.receive()  # sync_state


def join_world(conn: Conn, world_id: str) -> None:
    """``world.join``: its reply, then the world's ``sync_state`` (skipped later, like
    any signal that is not a reply)."""
    call(conn, "world.join", {"world_id": world_id}, "world.joined")


def subscribe(conn: Conn, topics: list[str]) -> None:
    """``world.subscribe``, waiting for its reply."""
    call(conn, "world.subscribe", {"topics": topics}, "world.subscribed")


def planned(plan: list[dict]) -> Callable[[int, int], bytes]:
    """Each connection's own request from a plan, with the request id put in."""
    templates = [b'{"id":%d,' + json.dumps(c["request"], separators=(",", ":"))[1:].encode()
                 for c in plan]
    return lambda index, rid: templates[index] % rid


def requester(action: str) -> Callable[[int, int], bytes]:
    """The request payload for (connection index, request id); ``bench.touch``
    writes one key per connection, as bench/roundtrip.py's trio client does."""
    if action == "bench.touch":
        tmpl = b'{"id":%d,"action":"bench.touch","params":{"key":"k%d","n":%d}}'
        return lambda index, rid: tmpl % (rid, index, rid)
    tmpl = b'{"id":%d,"action":"' + action.encode() + b'","params":{"n":%d}}'
    return lambda index, rid: tmpl % (rid, rid)


def run(conns: list[Conn], seconds: float, make: Callable[[int, int], bytes],
        host: bool, first_index: int, grace: float = 10.0) -> list[float]:
    """Every connection makes round trips back to back for ``seconds``; their times.

    A reply is the host's message carrying ``"re":<id>`` (an echo's is the
    request itself); each connection has one request outstanding, so nothing
    else needs to be matched.
    """
    latencies: list[float] = []
    record = latencies.append
    now = time.perf_counter
    poller = select.epoll()
    by_fd = {}
    for index, conn in enumerate(conns):
        by_fd[conn.sock.fileno()] = (first_index + index, conn)
        poller.register(conn.sock.fileno(), select.EPOLLIN)

    def send_next(index: int, conn: Conn) -> None:
        conn.rid += 1
        payload = make(index, conn.rid)
        conn.expect = b'"re":%d,' % conn.rid if host else payload
        conn.started = now()
        conn.send(payload)

    for index, conn in by_fd.values():
        send_next(index, conn)
    stop_at = now() + seconds
    outstanding = len(conns)
    while outstanding:
        events = poller.poll(1.0)
        if not events and now() > stop_at + grace:
            raise TimeoutError(f"{outstanding} replies missing {grace:g} s after the end")
        for fd, _ in events:
            index, conn = by_fd[fd]
            data = conn.sock.recv(262144)
            if not data:
                raise ConnectionError("connection closed")
            conn.buf += data
            for msg in conn.messages():
                if conn.expect not in msg:
                    continue
                t = now()
                record(t - conn.started)
                if b'"signal":"error"' in msg:
                    raise RuntimeError(msg.decode())
                if t < stop_at:
                    send_next(index, conn)
                else:
                    outstanding -= 1
    poller.close()
    return latencies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("url")
    parser.add_argument("--conns", type=int, default=1)
    parser.add_argument("--first", type=int, default=0, help="index of this process's first connection")
    parser.add_argument("--action", default="host.ping")
    parser.add_argument("--session", action="store_true", help="open a session on each connection (the host)")
    parser.add_argument("--line", action="store_true", help="newline-delimited over plain TCP, no WebSocket")
    parser.add_argument("--join", default="", help="world ids, comma-separated: connection i (counting "
                        "from --first) joins the (i mod count)th after opening its session")
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--warmup", type=float, default=0.3)
    parser.add_argument("--grace", type=float, default=10.0,
                        help="seconds to wait for the last replies after the window")
    parser.add_argument("--plan", default="", help="JSON file: each connection's request "
                        "(action 'plan') and topics to subscribe to")
    args = parser.parse_args()

    plan = json.loads(open(args.plan).read())["conns"] if args.plan else []
    conns = [Conn(args.url, args.line) for _ in range(args.conns)]
    if args.session:
        for i, conn in enumerate(conns):
            open_session(conn, f"raw{args.first + i}")
            if args.join:
                worlds = args.join.split(",")
                join_world(conn, worlds[(args.first + i) % len(worlds)])
            if plan and plan[args.first + i].get("subscribe"):
                subscribe(conn, plan[args.first + i]["subscribe"])
    for action in args.action.split(","):
        make = planned(plan) if action == "plan" else requester(action)
        run(conns, args.warmup, make, args.session, args.first)
        print("ready", flush=True)
        sys.stdin.readline()
        cpu = cpu_seconds()
        busy = sum(run_wait_seconds())
        started = time.perf_counter()
        latencies = run(conns, args.seconds, make, args.session, args.first, args.grace)
        wall = time.perf_counter() - started
        cpu = cpu_seconds() - cpu
        busy = sum(run_wait_seconds()) - busy
        print(json.dumps({"wall": wall, "cpu": cpu, "busy": busy,
                          "us": [round(x * 1e6) for x in latencies]}), flush=True)
    for conn in conns:
        conn.sock.close()


if __name__ == "__main__":
    main()
