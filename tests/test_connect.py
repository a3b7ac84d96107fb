"""``worldhost connect``, driven as a user would: a subprocess, typed lines on its
stdin, against a real ``worldhost serve`` that restarts in the middle."""

from __future__ import annotations

import queue
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from serverproc import ServerProcess, free_port


class Terminal:
    """``worldhost connect`` with a pipe for a keyboard and one for a screen."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "host", "connect", *args], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def type(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def until(self, text: str, timeout: float = 20) -> list[str]:
        """The lines printed up to and including the first that holds ``text``."""
        deadline = time.monotonic() + timeout
        got = []
        while True:
            try:
                line = self.lines.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no {text!r} within {timeout}s; printed: "
                                     f"{self.seen[-30:]}") from None
            if line is None:
                stderr = self.proc.stderr.read() if self.proc.stderr else ""
                raise AssertionError(f"connect exited; printed: {self.seen[-30:]}; "
                                     f"stderr: {stderr}")
            self.seen.append(line)
            got.append(line)
            if text in line:
                return got

    def end(self) -> int:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        return self.proc.wait(20)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerProcess]:
    (tmp_path / "tcp.toml").write_text(
        f"[transports.tcp]\nenabled = true\nport = {free_port()}\n")
    proc = ServerProcess(tmp_path / "world.db", config=tmp_path / "tcp.toml",
                         port=free_port()).start()
    yield proc
    proc.stop()


def _tcp_url(server: ServerProcess) -> str:
    assert server.config is not None
    port = int(server.config.read_text().split("port = ")[1].split()[0])
    return f"tcp://127.0.0.1:{port}"


@pytest.mark.parametrize("scheme", ["tcp", "ws"])
def test_connect_types_actions_and_resumes_after_a_restart(server: ServerProcess,
                                                           scheme: str) -> None:
    url = _tcp_url(server) if scheme == "tcp" else server.url
    term = Terminal(url, "--name", "ada")
    try:
        assert "(player)" in term.until("connected to")[-1]
        term.type('host.ping {"n": 1}')
        shown = term.until('"n": 1')
        assert "<= host.ping" in shown
        term.type("chat.say not json")
        assert "params are not JSON" in term.until("!!")[-1]
        term.type('chat.say {"text": ""}')
        assert "!! error validation_error" in term.until("!! error")[-1]
        term.type('chat.say {"text": "before"}')
        term.until('"text": "before"')
        server.stop()
        term.until("connection lost")
        server.start()
        term.until("resumed session")
        term.type('chat.say {"text": "after"}')
        shown = term.until('"text": "after"')
        assert any(line.startswith("<- chat.message #") for line in shown), shown
        term.type("host.ping")
        term.until("<= host.ping")
        assert term.end() == 0
    finally:
        if term.proc.poll() is None:
            term.proc.kill()


def test_connect_ends_with_1_when_the_session_cannot_be_resumed(server: ServerProcess,
                                                                tmp_path: Path) -> None:
    term = Terminal(_tcp_url(server))
    try:
        term.until("connected to")
        server.stop()
        term.until("connection lost")
        fresh = ServerProcess(tmp_path / "fresh.db", config=server.config,
                              port=server.fixed_port).start()  # same ports, another store
        try:
            term.until("could not be resumed")
            assert term.proc.wait(20) == 1
        finally:
            fresh.stop()
        server.start()  # for the fixture's stop
    finally:
        if term.proc.poll() is None:
            term.proc.kill()


def test_connect_admin_uses_the_token_serve_keeps(server: ServerProcess) -> None:
    term = Terminal(_tcp_url(server), "--admin", "--db", str(server.db))
    try:
        assert "(admin)" in term.until("connected to")[-1]
        term.type("sessions.list")
        term.until("<= sessions.list")
        assert term.end() == 0
    finally:
        if term.proc.poll() is None:
            term.proc.kill()


def test_connect_refuses_a_url_it_cannot_speak() -> None:
    done = subprocess.run([sys.executable, "-m", "host", "connect", "http://127.0.0.1:1/"],
                          capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=30)
    assert done.returncode == 2
    assert "ws://, wss:// or tcp://" in done.stderr
