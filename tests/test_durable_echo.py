"""bench/durable_echo.py, the floor bench/floor.py holds the host's durable round
trips to, is durable: every message it answered is in its journal after a kill -9
in mid-stream, in each of its commit modes, with several clients sharing commits."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

ECHO = Path(__file__).parents[1] / "bench" / "durable_echo.py"
CLIENTS = 4


@pytest.mark.parametrize("mode", ["loop", "thread", "thread-wait"])
def test_every_answered_message_survives_a_kill(tmp_path: Path, mode: str) -> None:
    db = tmp_path / "echo.db"
    proc = subprocess.Popen([sys.executable, str(ECHO), mode, str(db)],
                            stdout=subprocess.PIPE, text=True)
    answered: list[str] = []

    def client(index: int) -> None:
        try:
            with connect(f"ws://127.0.0.1:{port}/") as ws:
                for i in range(100_000):
                    message = f"client {index} message {i}"
                    ws.send(message)
                    assert ws.recv(timeout=10) == message
                    answered.append(message)
        except (ConnectionClosed, OSError):  # the kill
            pass

    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline())
        clients = [threading.Thread(target=client, args=(i,)) for i in range(CLIENTS)]
        for t in clients:
            t.start()
        deadline = time.monotonic() + 30
        while len(answered) < 400 and time.monotonic() < deadline:
            time.sleep(0.001)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    for t in clients:
        t.join()
    assert len(answered) >= 400
    stored = [row[0].decode() for row in sqlite3.connect(db).execute("SELECT data FROM journal")]
    assert set(answered) <= set(stored)  # nothing answered is lost
    assert len(stored) == len(set(stored)) <= len(answered) + CLIENTS  # once each


def test_fanout_sends_a_committed_turn_to_its_process_and_answers_pings_at_once(
        tmp_path: Path) -> None:
    db = tmp_path / "echo.db"
    proc = subprocess.Popen([sys.executable, str(ECHO), "thread", str(db), "--fanout"],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        url = f"ws://127.0.0.1:{int(proc.stdout.readline())}/"
        with connect(url) as a, connect(url) as b, connect(url) as other:
            turns = {ws: f'{{"action":"process.turn","params":{{"process_id":"{pid}",'
                         f'"agent_id":"{name}"}}}}'
                     for ws, pid, name in ((a, "p1", "a"), (b, "p1", "b"), (other, "p2", "c"))}
            for ws, turn in turns.items():  # each joins its process with its first turn
                ws.send(turn)
                assert ws.recv(timeout=10) == turn
            assert a.recv(timeout=10) == turns[b]  # b's turn came after a had joined
            a.send(turns[a])
            assert a.recv(timeout=10) == turns[a]
            assert b.recv(timeout=10) == turns[a]
            ping = '{"id":1,"action":"host.ping","params":{}}'
            other.send(ping)
            assert other.recv(timeout=10) == ping  # nothing from p1 reached p2's connection
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    stored = [row[0].decode() for row in sqlite3.connect(db).execute("SELECT data FROM journal")]
    assert sorted(stored) == sorted([*turns.values(), turns[a]])  # every turn, no ping
