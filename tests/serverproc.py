"""Running ``worldhost serve`` as a real process, for black-box and crash tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path


class ServerProcess:
    """``worldhost serve --port 0`` on a store file; start, kill -9, stop, restart."""

    def __init__(self, db: Path, config: Path | None = None,
                 env: dict[str, str] | None = None, port: int = 0) -> None:
        self.db = db
        self.config = config
        self.env = {**os.environ, "WORLDHOST_LOG": "WARNING", **(env or {})}
        self.proc: subprocess.Popen[str] | None = None
        self.port = port
        self.fixed_port = port
        self.stderr_path = db.with_suffix(".stderr")

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/"

    def start(self, timeout: float = 20) -> ServerProcess:
        cmd = [sys.executable, "-m", "host", "serve", "--db", str(self.db), "--port", str(self.fixed_port)]
        if self.config is not None:
            cmd += ["--config", str(self.config)]
        self.stderr = open(self.stderr_path, "a")  # noqa: SIM115
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self.stderr,
                                     text=True, env=self.env)
        deadline = time.monotonic() + timeout
        assert self.proc.stdout is not None
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                break
            if line.startswith("listening on ws://"):
                self.port = int(line.strip().rsplit(":", 1)[1].rstrip("/"))
                return self
        self.proc.kill()
        raise RuntimeError(f"worldhost did not start: {self.stderr_path.read_text()[-2000:]}")

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        self.stderr.close()

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        code = self.proc.wait(timeout)
        self.stderr.close()
        return code

    def log(self) -> str:
        return self.stderr_path.read_text()

    def memory_mib(self, field: str = "VmRSS") -> float:
        """The host's memory from /proc: ``VmRSS`` held now, ``VmHWM`` the most it
        has held at once (what a bomb would raise)."""
        assert self.proc is not None
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
        raise AssertionError(f"no {field}")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
