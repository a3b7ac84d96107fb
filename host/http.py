"""HTTP on the WebSocket port: pages, the JavaScript client, health and metrics.

A connection whose first request is not a WebSocket upgrade is answered here, one
request per connection (``Connection: close``): it keeps the bounds simple (one
header block of at most ``max_http_header_bytes``, sent within ``http_timeout_s``)
and browsers open a few connections in parallel anyway. Static files come only
from the ``web`` folder beside this module, by a name from a fixed pattern.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections import Counter
from http import HTTPStatus
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import unquote

import h11
import trio

from host import httpapi as api
from host.httpapi import API_PATHS, Response
from host.transport import Slot


class Served(api.Server, Protocol):
    """What the HTTP face reads of the server it fronts (host.server.Server), which
    it does not import: the API's needs, and the pages' and probes' own."""

    @property
    def port(self) -> int | None: ...

    @property
    def started(self) -> bool: ...

    @property
    def worlds(self) -> Any: ...

    @property
    def lobby(self) -> Any: ...


log = logging.getLogger("worldhost.http")

WEB = Path(__file__).with_name("web")
WS_PATH = "/ws"  # the JavaScript client's default (a WebSocket may use any path)
_NAME = re.compile(r"[A-Za-z0-9_-]+(\.[A-Za-z0-9]+)+")
TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".mjs": "text/javascript; charset=utf-8",
    ".ts": "text/plain; charset=utf-8",  # a .d.ts is read, not run
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".json": "application/json",
}
PAGES = {"/": "index.html", "/inspector": "inspector.html", "/play": "play.html",
         "/client/worldhost.js": "worldhost.js", "/client/worldhost.d.ts": "worldhost.d.ts",
         "/favicon.ico": "favicon.svg"}
SECURITY_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
    (b"content-security-policy",
     b"default-src 'self'; connect-src 'self' ws: wss:; img-src 'self' data:; "
     b"style-src 'self' 'unsafe-inline'; frame-ancestors 'none'"),
]
requests: Counter[int] = Counter()  # responses by status, for /metrics (this process)


async def read_head(stream: trio.abc.Stream, max_bytes: int) -> bytes:
    """Bytes up to the end of the first request's headers (perhaps more), or what came
    before the peer closed or the head grew past ``max_bytes``, or as soon as it
    cannot be a request head (not a method first, a TLS hello; lines ended by a bare
    newline): answered 400 at once rather than after the header timeout."""
    buf = bytearray()
    while b"\r\n\r\n" not in buf and len(buf) <= max_bytes:
        try:
            data = await stream.receive_some(4096)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return b""  # reset by the peer: nothing to answer
        if not data:
            break
        buf += data
        if not_a_head(buf):
            break
    return bytes(buf)


def not_a_head(head: bytes | bytearray) -> bool:
    """What came cannot be (the start of) a request head: no method first (a TLS
    hello), or it already ended at a bare blank line."""
    return not head[:1].isalpha() or b"\n\n" in head


def too_large(head: bytes, max_bytes: int) -> bool:
    """The request's line and headers in ``head`` (or what came of them) pass ``max_bytes``."""
    end = head.find(b"\r\n\r\n")
    return len(head) > max_bytes if end < 0 else end + 4 > max_bytes


def is_websocket(head: bytes) -> bool:
    """The request asks to upgrade to a WebSocket (its ``Upgrade`` header says so)."""
    for line in head.split(b"\r\n\r\n", 1)[0].split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"upgrade" and \
                b"websocket" in [v.strip().lower() for v in value.split(b",")]:
            return True
    return False


def unread(stream: trio.abc.Stream, data: bytes) -> None:
    """Give bytes already read back to the stream, for the WebSocket handshake to read.
    (The stream object stays the same, so the peer's address can still be told.)"""
    receive = stream.receive_some
    pending = [data] if data else []

    async def receive_some(max_bytes: int | None = None) -> bytes | bytearray:
        if pending:
            chunk = pending.pop()
            if max_bytes is not None and len(chunk) > max_bytes:
                pending.append(chunk[max_bytes:])
                chunk = chunk[:max_bytes]
            return chunk
        return await receive(max_bytes)

    stream.receive_some = receive_some  # type: ignore[method-assign]


async def serve(host: Served, stream: trio.abc.Stream, head: bytes,
                slot: Slot | None = None) -> None:
    """Answer the one HTTP request in ``head`` (it came within the time allowed), in
    the transport's ``slot`` for its socket. A peer gone before the answer is sent is
    no error of the host's."""
    try:
        await _serve(host, stream, head, slot)
        await _linger(stream)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass


async def _linger(stream: trio.abc.Stream) -> None:
    """Half-close, then read (for at most a second, at most 1 MiB) what the peer still
    sends: a socket closed with unread input is reset, and a reset can reach the peer
    before the answer it was about to read (a 431 sent before the rest of the headers)."""
    if isinstance(stream, trio.abc.HalfCloseableStream):
        await stream.send_eof()
    drained = 0
    with trio.move_on_after(1):
        while drained < 1 << 20:
            data = await stream.receive_some(65536)
            if not data:
                return
            drained += len(data)


async def _serve(host: Served, stream: trio.abc.Stream, head: bytes,
                 slot: Slot | None) -> None:
    limits = host.config.host.limits
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=limits.max_http_header_bytes)
    if too_large(head, limits.max_http_header_bytes):
        await _send(stream, conn, Response(431, b"request headers too large (limit: "
                                           b"max_http_header_bytes)\n"),
                    method=b"GET", force=True)
        return
    conn.receive_data(head)
    try:
        event = conn.next_event()
    except h11.RemoteProtocolError as exc:
        await _send(stream, conn, Response(400, f"bad request: {api.plain(exc)}\n".encode()),
                    method=b"GET", force=True)
        return
    if event is h11.NEED_DATA and head and not_a_head(head):
        await _send(stream, conn, Response(400, b"bad request: not an HTTP/1.1 request head "
                                                b"(lines end with CRLF; no TLS here)\n"),
                    method=b"GET", force=True)
        return
    if not isinstance(event, h11.Request):  # the peer closed before the end of its headers
        return
    names = {key for key, _ in event.headers}
    if b"transfer-encoding" in names and b"content-length" in names:
        # two ways to tell where the body ends: a proxy in front may pick the other
        # one (request smuggling), so neither is trusted
        await _send(stream, conn, Response(400, b"bad request: Content-Length together "
                                                b"with Transfer-Encoding\n"),
                    method=b"GET", force=True)
        return
    if event.target.partition(b"?")[0] in API_PATHS:
        response = await api.serve(host, stream, conn, event, slot)
        if response is not None:  # (a reply may be big: a reader that stalls is cut off)
            with trio.move_on_after(host.config.host.ping_timeout_s):
                await _send(stream, conn, response, method=b"POST", force=True)
        return
    try:
        response = respond(host, event)
    except Exception:  # a failing page must not take the world down with it
        log.exception("HTTP %r failed", event.target)
        response = Response(500, b"internal error (logged by the host)\n")
    with trio.move_on_after(host.config.host.ping_timeout_s):
        await _send(stream, conn, response, method=event.method)


def respond(host: Served, request: h11.Request) -> Response:
    """The response to one request, by its method and path."""
    target = request.target.decode("latin-1")
    path, _, _query = target.partition("?")
    if request.method not in (b"GET", b"HEAD"):
        return Response(405, b"only GET and HEAD are served here\n",
                        headers=[(b"allow", b"GET, HEAD")])
    if path == WS_PATH:
        return Response(426, b"this is the WebSocket endpoint: connect with a WebSocket "
                             b"client (Upgrade: websocket), e.g. /client/worldhost.js\n",
                        headers=[(b"upgrade", b"websocket")])
    if path == "/healthz":
        return healthz(host)
    if path == "/metrics":
        return Response(200, metrics(host).encode(),
                        "text/plain; version=0.0.4; charset=utf-8")
    name = PAGES.get(path)
    if name is None and path.startswith("/static/"):
        name = static_name(path[len("/static/"):])
    if name is None:
        return not_found(path)
    return static(name, api.header(request, b"if-none-match"))


def static_name(raw: str) -> str | None:
    """The asset a ``/static/`` path names, or None: one file name of letters, digits,
    ``_``, ``-`` and dots, with no folder, once decoded (``..``, ``%2f``, NUL refused)."""
    try:
        name = unquote(raw, errors="strict") if "%" in raw else raw
    except UnicodeDecodeError:
        return None
    if not _NAME.fullmatch(name) or ".." in name:
        return None
    return name


def static(name: str, if_none_match: bytes | None) -> Response:
    path = (WEB / name).resolve()
    if path.parent != WEB.resolve() or not path.is_file():
        return not_found("/static/" + name)
    body = path.read_bytes()
    etag = b'"' + hashlib.sha256(body).hexdigest()[:20].encode() + b'"'
    headers = [(b"etag", etag)]
    if if_none_match == etag:
        return Response(304, b"", TYPES.get(path.suffix, "application/octet-stream"),
                        headers, cache="no-cache")
    # no-cache: the browser keeps the file but asks again each time (a 304 when it has
    # not changed), so a page never runs an old client against a newer host.
    return Response(200, body, TYPES.get(path.suffix, "application/octet-stream"), headers,
                    cache="no-cache")


def not_found(path: str) -> Response:
    shown = path.encode("latin-1", "replace")[:200].decode("latin-1")
    text = (f"404 not found: {shown!r}\nthis host serves /, /inspector, /play, "
            f"/client/worldhost.js, /client/worldhost.d.ts, /healthz, /metrics, and "
            f"WebSockets on any path\n")
    return Response(404, text.encode())


def healthz(host: Served) -> Response:
    if host.port is None or not host.started:
        status = "starting"
    elif host.stopping or not host.router.accepting:
        status = "stopping"
    else:
        status = "up"
    body = {"status": status, "up": status == "up", "worlds": len(host.worlds.loaded),
            "world_id": host.worlds.default_id(),
            "sessions": len(host.sessions),
            "connected": sum(1 for s in host.sessions if s.connected),
            "connections": len(host.transport.connections)}
    return Response(200 if status == "up" else 503, json.dumps(body).encode() + b"\n",
                    "application/json")


def metrics(host: Served) -> str:
    """Prometheus text format: counters since this process started, gauges now."""
    worlds = [host.lobby, *host.worlds.loaded.values()]
    sessions = list(host.sessions)
    errors: Counter[str] = Counter()
    for world in worlds:
        errors.update(world.dispatcher.errors)
    savers = [w.saver for w in worlds if w.saver is not None]
    lines: list[str] = []

    def metric(name: str, kind: str, help_: str, samples: list[tuple[str, float]]) -> None:
        lines.append(f"# HELP worldhost_{name} {help_}")
        lines.append(f"# TYPE worldhost_{name} {kind}")
        for labels, value in samples:  # whole numbers whole (``:g`` rounds to 6 digits)
            text = str(value) if isinstance(value, int) else repr(float(value))
            lines.append(f"worldhost_{name}{labels} {text}")

    metric("up", "gauge", "1 while the host takes actions.",
           [("", 1 if host.router.accepting and not host.stopping else 0)])
    metric("worlds_loaded", "gauge", "Worlds loaded now.", [("", len(host.worlds.loaded))])
    metric("connections", "gauge", "Open WebSocket connections.",
           [("", len(host.transport.connections))])
    by_state = Counter("connected" if s.connected else "disconnected" for s in sessions)
    metric("sessions", "gauge", "Sessions, connected or resumable.",
           [(f'{{state="{k}"}}', by_state[k]) for k in ("connected", "disconnected")])
    metric("actions_total", "counter", "Actions applied (replayed ones excluded).",
           [("", sum(w.dispatcher.applied for w in worlds))])
    metric("errors_total", "counter", "Error replies, by code.",
           [(f'{{code="{code}"}}', n) for code, n in sorted(errors.items())])
    commits = sum(s.commits for s in savers)
    metric("journal_commits_total", "counter", "Journal commits.", [("", commits)])
    metric("journal_commit_seconds", "summary", "Time to commit to the journal.",
           [("_sum", sum(s.commit_seconds for s in savers)), ("_count", commits)])
    metric("journal_commit_wait_seconds_total", "counter",
           "Time the event loop waited for journal commits on the store's thread.",
           [("", sum(s.waited_s for s in savers))])
    metric("checkpoint_seconds", "summary", "Time to write a checkpoint.",
           [("_sum", sum(s.checkpoint_seconds for s in savers)),
            ("_count", sum(s.checkpoints for s in savers))])
    # a gauge: it is the sum over the sessions there are now, which come and go
    metric("session_signals_sent", "gauge",
           "Signals sent to the sessions there are now, over their lives.",
           [("", sum(s.signals_sent for s in sessions))])
    metric("signals_dropped_total", "counter",
           "Signals not sent: the connection was closing or too slow.",
           [("", host.transport.signals_dropped)])
    default = host.worlds.loaded.get(host.worlds.default_id() or "")
    sim = default.slices.slices.get("simulation") if default is not None else None
    if sim is not None:
        meta = sim.data().get("meta", {})
        metric("simulation_tick", "gauge", "The simulation's tick.",
               [("", meta.get("tick", 0))])
        metric("simulation_dropped_ticks_total", "counter",
               "Ticks skipped because the host fell behind.",
               [("", meta.get("dropped_ticks", 0))])
    metric("http_responses_total", "counter", "HTTP responses, by status.",
           [(f'{{status="{k}"}}', n) for k, n in sorted(requests.items())])
    return "\n".join(lines) + "\n"


async def _send(stream: trio.abc.Stream, conn: h11.Connection, response: Response,
                method: bytes, force: bool = False) -> None:
    requests[response.status] += 1
    headers = [(b"content-type", response.content_type.encode()),
               (b"content-length", str(len(response.body)).encode()),
               (b"cache-control", response.cache.encode()),
               (b"connection", b"close"), *SECURITY_HEADERS, *(response.headers or [])]
    reason = HTTPStatus(response.status).phrase.encode()
    if force:  # h11 refuses to answer a request it could not parse; write it by hand
        head = b"HTTP/1.1 %d %s\r\n" % (response.status, reason)
        head += b"".join(k + b": " + v + b"\r\n" for k, v in headers) + b"\r\n"
        await stream.send_all(head + response.body)
        return
    await stream.send_all(conn.send(h11.Response(status_code=response.status, headers=headers,
                                                      reason=reason)))
    if method != b"HEAD" and response.status != 304:
        await stream.send_all(conn.send(h11.Data(data=response.body)))
    await stream.send_all(conn.send(h11.EndOfMessage()))

