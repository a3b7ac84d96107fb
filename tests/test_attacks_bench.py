"""bench/attacks.py stays runnable: it imports and explains itself, and its raw
client (the bystander's and the attacker's) still speaks to a real host. The
attacks themselves are a benchmark (minutes), not a test."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from attacks import ADMIN, ATTACKS, RawWS
from serverproc import ServerProcess

SCRIPT = Path(__file__).parents[1] / "bench" / "attacks.py"


def test_help_and_list_name_every_attack() -> None:
    for flag in ("--help", "--list"):
        done = subprocess.run([sys.executable, str(SCRIPT), flag], capture_output=True,
                              text=True, timeout=60, check=False)
        assert done.returncode == 0, done.stderr
        for name in ATTACKS:
            assert name in done.stdout, f"{flag} does not mention {name}"


def test_the_raw_client_opens_a_session_and_pings_a_real_host(tmp_path: Path) -> None:
    server = ServerProcess(tmp_path / "w.db", env={"WORLDHOST_ADMIN_TOKEN": ADMIN}).start()
    try:
        ws = RawWS.connect(server.port, timeout=10)
        assert json.loads(ws.recv())["signal"] == "server.info"
        name, frame = ws.call("session.open", {"name": "raw", "token": ADMIN})
        assert name == "session.opened"
        assert json.loads(frame)["data"]["role"] == "admin"
        name, frame = ws.call("host.ping", {"pad": "x" * 65_500})  # a 64-bit frame length; params within max_ping_bytes
        assert name == "host.pong"
        assert json.loads(frame)["data"] == {"pad": "x" * 65_500}
        ws.close()
    finally:
        server.stop()
