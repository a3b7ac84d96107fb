"""``worldhost connect URL``: an interactive terminal client, over ``ws://`` or ``tcp://``.

Each input line is an action name and optional JSON params
(``chat.say {"text": "hi"}``); replies and signals are printed pretty. The session
survives a server restart: the client reconnects and resumes with ``last_seq``
by itself (host/client.py does that for both transports: over TCP it speaks
through ``LineConnection``, which looks to it like a WebSocket).
"""

from __future__ import annotations

import json
import sys
from typing import Any
from urllib.parse import urlsplit

import trio
from trio_websocket import CloseReason, ConnectionClosed

from host.client import CallError, Client, Disconnected, Opener, open_client, url_opener

MAX_LINE = 64 * 1024 * 1024  # what the client takes from a host in one line
_READ = 64 * 1024


class LineConnection:
    """A line-delimited JSON TCP connection with the WebSocket methods the client
    uses: ``get_message``, ``send_message``, ``aclose``. The host's last line,
    ``connection.closed`` ``{code, reason}``, is raised as ``ConnectionClosed``
    with that code, as a close frame would be."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self._buffer = bytearray()
        self._send_lock = trio.Lock()
        self.closed: CloseReason | None = None

    def _gone(self, code: int = 1006, reason: str = "connection lost") -> ConnectionClosed:
        if self.closed is None:
            self.closed = CloseReason(code, reason)
        return ConnectionClosed(self.closed)

    async def get_message(self) -> str:
        while True:
            if self.closed is not None:
                raise ConnectionClosed(self.closed)
            end = self._buffer.find(b"\n")
            if end >= 0:
                line = bytes(self._buffer[:end]).rstrip(b"\r").decode("utf-8")
                del self._buffer[:end + 1]
                if '"connection.closed"' in line[:64]:  # cheap test first: most lines are not
                    message = json.loads(line)
                    if message.get("signal") == "connection.closed" and "re" not in message:
                        data = message.get("data", {})
                        raise self._gone(int(data.get("code", 1006)),
                                         str(data.get("reason", "")))
                return line
            if len(self._buffer) > MAX_LINE:
                await trio.aclose_forcefully(self.stream)
                raise self._gone(1009, f"line over {MAX_LINE} bytes")
            try:
                data = await self.stream.receive_some(_READ)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                data = b""
            if not data:
                raise self._gone()
            self._buffer += data

    async def send_message(self, message: str | bytes) -> None:
        if isinstance(message, bytes):
            raise TypeError("line-delimited JSON carries text only (no CBOR)")
        if self.closed is not None:
            raise ConnectionClosed(self.closed)
        async with self._send_lock:
            try:
                await self.stream.send_all(message.encode("utf-8") + b"\n")
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                raise self._gone() from None

    async def aclose(self, code: int = 1000, reason: str | None = None) -> None:
        if self.closed is None:
            self.closed = CloseReason(code, reason)
        await trio.aclose_forcefully(self.stream)


def tcp_address(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    if parts.scheme != "tcp" or not parts.hostname or parts.port is None:
        raise ValueError(f"{url}: expected tcp://HOST:PORT")
    return parts.hostname, parts.port


def tcp_opener(url: str) -> Opener:
    """Opens a line connection to ``tcp://HOST:PORT``."""
    host, port = tcp_address(url)

    async def opener(nursery: trio.Nursery) -> Any:
        return LineConnection(await trio.open_tcp_stream(host, port))
    return opener


def opener_for(url: str) -> Opener:
    """A WebSocket opener for ``ws://``/``wss://``, a line opener for ``tcp://``."""
    scheme = urlsplit(url).scheme
    if scheme == "tcp":
        return tcp_opener(url)
    if scheme in ("ws", "wss"):
        return url_opener(url)
    raise ValueError(f"{url}: the URL must start with ws://, wss:// or tcp://")


def parse_command(line: str) -> tuple[str, dict[str, Any]]:
    """``action {json params}`` -> (action, params); ValueError says what is wrong."""
    action, _, rest = line.strip().partition(" ")
    rest = rest.strip()
    if not rest:
        return action, {}
    try:
        params = json.loads(rest)
    except json.JSONDecodeError as exc:
        raise ValueError(f"params are not JSON: {exc}") from None
    if not isinstance(params, dict):
        raise ValueError("params must be a JSON object")
    return action, params


def show(text: str) -> None:
    print(text, flush=True)


def pretty(value: Any) -> str:
    return json.dumps(value, indent=2, ensure_ascii=False)


class Terminal:
    """Reads commands from stdin (with readline's history on a terminal)."""

    def __init__(self, history: str | None) -> None:
        self.tty = sys.stdin.isatty()
        self.history = history
        if self.tty:
            import readline  # noqa: F401 -- input() gains editing and history

            if history:
                try:
                    readline.read_history_file(history)
                except OSError:
                    pass

    def read(self) -> str | None:
        try:
            if self.tty:
                return input("> ")
            line = sys.stdin.readline()
            return line if line else None
        except EOFError:
            return None

    def save(self) -> None:
        if self.tty and self.history:
            import readline
            try:
                readline.write_history_file(self.history)
            except OSError:
                pass


async def run(url: str, *, name: str, token: str | None, history: str | None = None) -> int:
    """The interactive session; returns the exit code: 0 after Ctrl-D (the session
    is closed), 1 when the session was lost (it could not be resumed)."""
    terminal = Terminal(history)
    lost = False
    async with open_client(opener_for(url), name=name, token=token, reconnect=True) as client:
        show(f"connected to {url}: session {client.session_id} ({client.role}); "
             f"type an action and JSON params, e.g. host.ping {{\"n\": 1}}; Ctrl-D ends")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_print_signals, client)

            async def watch() -> None:
                nonlocal lost
                if await _print_states(client):
                    lost = True
                    nursery.cancel_scope.cancel()  # stop reading: nothing can be sent
            nursery.start_soon(watch)
            try:
                while True:
                    line = await trio.to_thread.run_sync(terminal.read, abandon_on_cancel=True)
                    if line is None:
                        break
                    if line.strip():
                        await _command(client, line)
            finally:
                terminal.save()
            with trio.move_on_after(5):
                try:
                    await client.close_session()
                except (Disconnected, CallError):
                    pass
            nursery.cancel_scope.cancel()
    return 1 if lost else 0


async def _command(client: Client, line: str) -> None:
    try:
        action, params = parse_command(line)
    except ValueError as exc:
        show(f"!! {exc}")
        return
    try:
        data = await client.call(action, params)
    except Disconnected as exc:
        show(f"!! {exc}")
        return
    except CallError as exc:
        show(f"!! error {exc.code}: {exc.message}")
        if exc.details is not None:
            show(pretty(exc.details))
        return
    show(f"<= {action}")
    show(pretty(data))


async def _print_signals(client: Client) -> None:
    async for sig in client.signals():
        seq = sig.get("seq")
        show(f"<- {sig.get('signal')}" + (f" #{seq}" if seq is not None else ""))
        show(pretty(sig.get("data")))


async def _print_states(client: Client) -> bool:
    """Tell the user when the connection drops and comes back; True once the
    session is lost for good."""
    async for state in client.state_changes():
        if state == "resuming":
            show("-- connection lost; reconnecting")
        elif state == "open" and client.last_resume is not None:
            resumed = client.last_resume
            show(f"-- resumed session {client.session_id}: {resumed.get('replayed', 0)} "
                 f"signals replayed")
        elif state == "offline" and client.reconnect:  # not closed by us (Ctrl-D)
            show("-- the session could not be resumed (the host no longer knows it, or its "
                 "resume window ended)")
            return True
    return False
