"""Shared pieces of the benchmarks: a host process, a bare echo server, a client."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Any

import trio
from trio_websocket import WebSocketConnection, connect_websocket_url, serve_websocket

sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
from serverproc import ServerProcess  # noqa: E402,F401

ADMIN = "bench-admin"


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * p))] if ordered else float("nan")


def workdir() -> Path:
    return Path(tempfile.mkdtemp(prefix="worldhost-bench-"))


def config_file(folder: Path, extra: str = "", rate: float = 1e6, host: str = "") -> Path:
    """A config for benchmarks: no rate limit, room for many sessions, the bench
    plugin; ``extra`` is appended (whole tables only), ``host`` goes in ``[host]``."""
    path = folder / "bench.toml"
    path.write_text(f'[host]\nadmin_token = "{ADMIN}"\n{host}[host.limits]\nrate_per_s = {rate}\n'
                    f'rate_burst = 1000000\nmax_connections_per_address = 100000\n'
                    f'outbox_size = 100000\nmax_lag_s = 60.0\n'
                    f'[sessions]\nmax_sessions_per_address = 0\n'
                    f'[plugins.session_cleanup]\nmax_sessions = 100000\n'
                    f'[plugins.bench]\nmodule = "bench_plugin"\n{extra}')
    return path


def spawn_server(script: str, *args: str) -> tuple[subprocess.Popen[str], int]:
    """A server of bench/ (``script``) in a process of its own, and the port it
    prints on its first line once it listens."""
    proc = subprocess.Popen([sys.executable, str(Path(__file__).parent / script), *args],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    return proc, int(proc.stdout.readline())


def host_process(folder: Path, extra_config: str = "", rate: float = 1e6,
                 host: str = "") -> ServerProcess:
    """``worldhost serve`` with the bench plugin importable."""
    return ServerProcess(folder / "bench.db", config=config_file(folder, extra_config, rate, host),
                         env={"PYTHONPATH": str(Path(__file__).parent)})


async def echo_server(task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    """A bare trio-websocket server that answers each frame with the same frame."""
    async def handler(request: Any) -> None:
        ws = await request.accept()
        try:
            while True:
                await ws.send_message(await ws.get_message())
        except Exception:  # noqa: BLE001 - a client went away
            pass

    await serve_websocket(handler, "127.0.0.1", 0, None, message_queue_size=64,
                          max_message_size=64 << 20, task_status=task_status)


async def websockets_echo_server(task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    """The same echo on the ``websockets`` library's trio server, configured as the
    host configures it (no compression, no keepalive of its own, a queue of 8)."""
    from websockets.exceptions import ConnectionClosed
    from websockets.trio.server import serve

    async def handler(ws: Any) -> None:
        try:
            while True:
                await ws.send(await ws.recv())
        except ConnectionClosed:  # a client went away
            pass

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    async with trio.open_nursery() as nursery:
        await nursery.start(partial(serve, handler, listeners=listeners, compression=None,
                                    ping_interval=None, max_size=64 << 20, max_queue=8))
        task_status.started(_Port(port))


async def line_echo_server(task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    """A bare trio TCP server that answers each newline-terminated line with itself."""
    async def handler(stream: trio.SocketStream) -> None:
        pending = b""
        try:
            while data := await stream.receive_some(65536):
                *lines, pending = (pending + data).split(b"\n")
                for line in lines:
                    await stream.send_all(line + b"\n")
        except trio.BrokenResourceError:  # a client went away
            pass

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    task_status.started(_Port(listeners[0].socket.getsockname()[1]))
    await trio.serve_listeners(handler, listeners)


class _Port:
    """What ``echo_server`` hands to ``task_status``, as far as echo.py reads it."""

    def __init__(self, port: int) -> None:
        self.port = port


class Conn:
    """One client connection: request/reply with ids, for host and echo alike."""

    def __init__(self, ws: WebSocketConnection) -> None:
        self.ws = ws
        self.n = 0

    async def call(self, action: str, params: dict[str, Any]) -> dict[str, Any]:
        self.n += 1
        rid = self.n
        await self.ws.send_message(json.dumps({"id": rid, "action": action, "params": params}))
        while True:
            msg = json.loads(await self.ws.get_message())
            if msg.get("re") == rid or (msg.get("id") == rid):
                return msg


async def open_conns(nursery: trio.Nursery, url: str, count: int, host: bool,
                     admin: bool = False) -> list[Conn]:
    conns = []
    for i in range(count):
        ws = await connect_websocket_url(nursery, url, message_queue_size=256,
                                         max_message_size=1 << 30)
        conn = Conn(ws)
        if host:
            await ws.get_message()  # server.info
            params = {"name": f"bench{i}"}
            if admin:
                params["token"] = ADMIN
            reply = await conn.call("session.open", params)
            assert reply["signal"] == "session.opened", reply
            await ws.get_message()  # sync_state
        conns.append(conn)
    return conns


async def drive(conns: list[Conn], seconds: float,
                make: Callable[[int, int], tuple[str, dict[str, Any]]]) -> list[float]:
    """Every connection calls back to back for ``seconds``; the round-trip times."""
    latencies: list[float] = []
    stop_at = trio.current_time() + seconds

    async def loop(index: int, conn: Conn) -> None:
        i = 0
        while trio.current_time() < stop_at:
            action, params = make(index, i)
            started = time.perf_counter()
            reply = await conn.call(action, params)
            latencies.append(time.perf_counter() - started)
            if reply.get("signal") == "error":
                raise RuntimeError(f"{action}: {reply['data']}")
            i += 1

    async with trio.open_nursery() as nursery:
        for index, conn in enumerate(conns):
            nursery.start_soon(loop, index, conn)
    return latencies


def run(main: Callable[[], Awaitable[None]]) -> None:
    os.environ.setdefault("WORLDHOST_LOG", "WARNING")
    trio.run(main)
