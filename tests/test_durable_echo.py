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
