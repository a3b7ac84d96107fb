"""The README's "Worlds" quick start, as written, against a real ``worldhost serve``:
two worlds created, one client in each (``worldhost connect``, typing the README's
lines), kill -9, a restart, and both worlds back, the last active one the default,
both sessions resumed by their clients."""

from __future__ import annotations

import contextlib
import io
import json
import os
import queue
import re
import shlex
import subprocess
import sys
import threading
import time
from pathlib import Path

from host import cli
from serverproc import ServerProcess, free_port

ROOT = Path(__file__).parents[1]


def _worlds_part() -> str:
    readme = (ROOT / "README.md").read_text()
    return readme.split("### Worlds", 1)[1].split("\n## ", 1)[0]


class Typist:
    """``worldhost connect`` with its stdin a pipe: lines typed, output read as it comes."""

    def __init__(self, cwd: Path, args: list[str]) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "host", *args], cwd=cwd,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, bufsize=1)
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)

    def type(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def expect(self, text: str, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while not any(text in line for line in self.seen):
            left = deadline - time.monotonic()
            assert left > 0, f"never printed {text!r}: {''.join(self.seen)[-2000:]}"
            try:
                self.seen.append(self.lines.get(timeout=left))
            except queue.Empty:
                pass

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()  # Ctrl-D
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


def _cli(cwd: Path, command: str, url: str) -> dict:
    """``worldhost call ...`` as the README writes it, run in this process (no Python
    start-up per call), in ``cwd`` (where ``--admin`` finds the token serve wrote)."""
    args = shlex.split(command)[1:]
    assert args[0] == "call", command
    out, err = io.StringIO(), io.StringIO()
    saved = os.getcwd()
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = cli.main([*args, "--url", url])
    finally:
        os.chdir(saved)
    assert code == 0, (command, out.getvalue(), err.getvalue())
    return json.loads(out.getvalue())  # type: ignore[no-any-return]


def test_the_readme_worlds_quick_start(tmp_path: Path) -> None:
    part = _worlds_part()
    sh = part.split("```sh\n", 1)[1].split("```", 1)[0]
    calls = [line for line in sh.splitlines() if line.startswith(".venv/bin/worldhost ")]
    sessions = re.findall(r"```text\n\$ (\.venv/bin/worldhost connect[^\n]*)\n(.*?)```",
                          part, re.S)
    assert len(calls) == 3 and len(sessions) == 2
    (tmp_path / "data").mkdir()
    server = ServerProcess(tmp_path / "data" / "world.db", config=ROOT / "plugins.toml",
                           port=free_port()).start()
    typists: list[Typist] = []
    try:
        for command in calls[:2]:
            assert _cli(tmp_path, command, server.url)["world_id"] in ("north", "south")
        listed = _cli(tmp_path, calls[2], server.url)
        assert {w["world_id"] for w in listed["worlds"]} == {"main", "north", "south"}
        typists += [Typist(tmp_path, [*shlex.split(command)[1:], server.url])
                    for command, _ in sessions]  # both start at once
        for typist, (_, typed) in zip(typists, sessions):
            typist.expect("connected to")
            for line in typed.splitlines():
                assert line.startswith("> ")
                action = line[2:].split()[0]
                typist.type(line[2:])
                typist.expect(f"<= {action}")
        ada, bob = typists
        bob.type("world.snapshot")
        bob.expect("<= world.snapshot")
        assert '"node:a"' not in "".join(bob.seen)  # bob's world has no node a
        assert not any("chat.message" in line for line in ada.seen)  # nor ada's a chat

        server.kill9()
        server.start()
        for typist in typists:
            typist.expect("-- resumed session")
        listed = _cli(tmp_path, calls[2], server.url)
        worlds = {w["world_id"]: w for w in listed["worlds"]}
        assert worlds["north"]["loaded"] and worlds["south"]["loaded"]
        assert listed["default"] == "south"  # bob spoke last
        ada.type("world.snapshot")  # ada carries on in north, with its node
        ada.expect('"node:a"')
        assert '"world_id": "north"' in "".join(ada.seen)
    finally:
        for typist in typists:
            typist.close()
        server.stop()
