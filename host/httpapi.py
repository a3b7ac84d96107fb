"""The HTTP API: ``POST /v1/actions`` (one envelope in, its reply out) and
``GET /v1/events`` (the session's signals as Server-Sent Events).

An HTTP request acts as the session its ``Authorization: Bearer
SESSION_ID.RESUME_TOKEN`` header names, through the same router, gate and
dispatcher as a WebSocket frame: the same role, world, remembered replies and
seq numbering (a reply is numbered in the session's sequence, and also reaches
the session's connection, if it has one). It does not attach the session: a
WebSocket of the same session stays connected, and the token is not rotated.
Only ``session.open`` comes without the header; its session is then left
disconnected (resumable), and each later request keeps it so.

A browser's ``EventSource`` cannot send a header, and the credential never goes
in a URL: ``POST /v1/cookie`` (with the header) answers with an HttpOnly,
SameSite=Strict cookie holding it, sent only to ``/v1/events``, which takes it
in place of the header.
"""

from __future__ import annotations

import json
import re
import weakref
from dataclasses import dataclass
from typing import Any, Protocol

import h11
import trio

from host.actions import BadRequest, RateLimited
from host.config import Config
from host.framing import decode_frame, encode_frame, item_budget, request_of, undecodable
from host.limits import TokenBucket
from host.messages import Disconnect, Request, Signal, Submitter
from host.sessions import MAX_SEQ, Session, SessionTable
from host.sse import SseChannel, SseConnection
from host.transport import Slot, Transport, stream_address
from state.codec import DecodeError


class Credentials(Protocol):
    def credential(self, session_id: str, resume_token: str) -> Session | None: ...


class Server(Protocol):
    """What the API uses of the server (host/server.py), which it does not import."""

    @property
    def config(self) -> Config: ...

    @property
    def router(self) -> Submitter: ...

    @property
    def gate(self) -> Credentials: ...

    @property
    def sessions(self) -> SessionTable: ...

    @property
    def transport(self) -> Transport: ...

    @property
    def threads(self) -> bool: ...

    @property
    def stopping(self) -> bool: ...

    def clock(self) -> float: ...


API_PATHS = frozenset({b"/v1/actions", b"/v1/events", b"/v1/cookie"})
COOKIE = "worldhost_events"  # the stream's credential, for an EventSource
STATUS = {"bad_request": 400, "bad_frame": 400, "validation_error": 400,
          "unauthenticated": 401, "forbidden": 403, "not_found": 404, "unknown_action": 404,
          "conflict": 409, "rate_limited": 429, "internal_error": 500}
JSON = "application/json"
_UNBOUNDED = 1 << 62  # an event is never cut in pieces: SSE has no chunked transfers
_MAX_BUCKETS = 4096


@dataclass
class Response:
    status: int
    body: bytes
    content_type: str = "text/plain; charset=utf-8"
    headers: list[tuple[bytes, bytes]] | None = None
    cache: str = "no-store"


def plain(exc: Exception) -> str:
    """h11's account of a malformed request, without Python's reprs of bytes, short."""
    text = re.sub(r"bytearray\((b['\"].*?['\"])\)", r"\1", str(exc))
    text = re.sub(r"\bb(['\"])", r"\1", text)
    return text if len(text) <= 200 else text[:200] + "…"


def header(request: h11.Request, name: bytes) -> bytes | None:
    for key, value in request.headers:
        if key == name:
            return bytes(value)
    return None


def _twice(request: h11.Request, name: bytes) -> bool:
    """A header that says one thing, sent more than once: which one counts is a
    guess a proxy in front may make differently (it is refused)."""
    return sum(1 for key, _ in request.headers if key == name) > 1


class HttpPeer:
    """The requester of one ``POST /v1/actions``, as the gate and dispatcher see a
    connection. Its reply is read from the request (``Request.result``), not
    delivered here; it is the session's connection only while a ``session.open``
    it sent is being applied."""

    encoding = "json"

    def __init__(self, table: SessionTable, session: Session | None, remote: str) -> None:
        self._table = table
        self._session = session
        self.remote = remote
        self.failed_opens = 0

    @property
    def session(self) -> Session | None:
        """Its session while the session lasts (it may end while the request waits)."""
        s = self._session
        return s if s is not None and self._table.get(s.id) is s else None

    @session.setter
    def session(self, session: Session | None) -> None:
        self._session = session

    def deliver(self, sig: Signal) -> bool:
        return True  # kept in the session's replay buffer; the reply is read elsewhere

    def attached(self, session: Session) -> None:
        self._session = session

    def detached(self) -> None:
        pass

    def displace(self) -> None:
        self._session = None

    def close_soon(self, code: int, reason: str) -> None:
        pass  # the HTTP connection closes after its one response anyway


class Buckets:
    """Rate limits of HTTP requests: one token bucket per session (its requests
    share it, as a connection's frames share the connection's) and one per address
    for requests without a session. Idle ones are forgotten when there are many."""

    def __init__(self, rate: float, burst: int) -> None:
        self.rate = rate
        self.burst = burst
        self.buckets: dict[str, TokenBucket] = {}

    def take(self, key: str, now: float) -> bool:
        bucket = self.buckets.get(key)
        if bucket is None:
            if len(self.buckets) >= _MAX_BUCKETS:
                self._forget_idle(now)
            bucket = self.buckets[key] = TokenBucket(self.rate, self.burst)
        return bucket.take(now)

    def _forget_idle(self, now: float) -> None:
        full = self.burst / self.rate if self.rate > 0 else 0.0  # refilled by then
        for key in [k for k, b in self.buckets.items()
                    if b.stamp is None or now - b.stamp >= full]:
            del self.buckets[key]
        while len(self.buckets) >= _MAX_BUCKETS:  # all busy: the oldest go
            del self.buckets[next(iter(self.buckets))]


_buckets: weakref.WeakKeyDictionary[Server, Buckets] = weakref.WeakKeyDictionary()


def buckets(host: Server) -> Buckets:
    found = _buckets.get(host)
    if found is None:
        limits = host.config.host.limits
        found = _buckets[host] = Buckets(limits.rate_per_s, limits.rate_burst)
    return found


def error(status: int, code: str, message: str, *, re: Any = None, action: str = "",
          headers: list[tuple[bytes, bytes]] | None = None) -> Response:
    """An ``error`` reply envelope refused before it reached the dispatcher."""
    sig = Signal("error", {"code": code, "message": message, "action": action}, re, True)
    if status == 401:
        headers = [*(headers or []), (b"www-authenticate", b'Bearer realm="worldhost"')]
    return Response(status, _json(sig), JSON, headers)


def _json(sig: Signal) -> bytes:
    frame = encode_frame(sig, "json")
    assert isinstance(frame, str)
    return frame.encode("utf-8", "surrogatepass") + b"\n"


def reply_response(sig: Signal | None) -> Response:
    """The HTTP response for a reply: 200, or the status its error code implies."""
    if sig is None:  # the dispatcher always answers a request; this is a bug
        return error(500, "internal_error", "no reply was produced (logged by the host)")
    status = 200
    headers: list[tuple[bytes, bytes]] = []
    if sig.signal == "error":
        code = sig.data.get("code")
        status = STATUS.get(code, 400) if isinstance(code, str) else 400
        if status == 401:
            headers.append((b"www-authenticate", b'Bearer realm="worldhost"'))
        elif status == 429:
            headers.append((b"retry-after", b"1"))
    return Response(status, _json(sig), JSON, headers)


def credential(request: h11.Request, cookie: bool = False) -> tuple[str, str] | None | Response:
    """(session id, resume token) from ``Authorization: Bearer ID.TOKEN`` (or, with
    ``cookie``, when there is no such header, from the stream's cookie); None
    without either; a 401 when it is there but not of that form."""
    if _twice(request, b"authorization"):
        return error(400, "bad_request", "send one Authorization header, not several")
    raw, where = header(request, b"authorization"), "Authorization"
    if raw is None and cookie:
        raw, where = _cookie(request), f"the {COOKIE} cookie"
    if raw is None:
        return None
    scheme, _, value = raw.decode("latin-1").strip().partition(" ")
    sid, dot, token = value.strip().partition(".")
    if scheme.lower() != "bearer" or not dot or not sid or not token:
        form = "'Bearer SESSION_ID.RESUME_TOKEN'" if where == "Authorization" else \
            "SESSION_ID.RESUME_TOKEN"
        return error(401, "unauthenticated", f"{where} must be {form} (from session.opened)")
    return sid, token


def _cookie(request: h11.Request) -> bytes | None:
    """The stream's cookie, as the header it stands for (``Bearer ID.TOKEN``)."""
    for key, value in request.headers:
        if key != b"cookie":
            continue
        for pair in bytes(value).split(b";"):
            name, eq, found = pair.strip().partition(b"=")
            if eq and name == COOKIE.encode():
                return b"Bearer " + found
    return None


def authenticate(host: Server, request: h11.Request,
                 cookie: bool = False) -> Session | None | Response:
    """The session the request's credential names; None without one; a 401 when the
    credential is wrong or its session is gone (ended, or past its resume window)."""
    found = credential(request, cookie)
    if found is None or isinstance(found, Response):
        return found
    session = host.gate.credential(*found)
    if session is None:
        return error(401, "unauthenticated", "invalid or expired session credential "
                     "(Authorization: Bearer SESSION_ID.RESUME_TOKEN)")
    return session


async def serve(host: Server, stream: trio.abc.Stream, conn: h11.Connection,
                request: h11.Request, slot: Slot | None) -> Response | None:
    """One API request; the response to send, or None when it was a stream that
    has ended."""
    path = request.target.partition(b"?")[0]
    wanted = b"GET" if path == b"/v1/events" else b"POST"
    if request.method != wanted:
        return Response(405, b"%s is served for %s only\n" % (path, wanted),
                        headers=[(b"allow", wanted)])
    if not host.router.accepting or host.stopping:
        return error(503, "conflict", "the host is shutting down")
    session = authenticate(host, request, cookie=path == b"/v1/events")
    if isinstance(session, Response):
        # a refused credential costs its address a token, as a request without one
        # does: guesses come no faster than the rate limit
        if session.status == 401 and not buckets(host).take(
                "@" + stream_address(stream), trio.current_time()):
            return error(429, "rate_limited", "too many requests without a valid "
                         "credential from this address; slow down")
        return session
    if path == b"/v1/cookie":
        return set_cookie(host, request, session)
    if path == b"/v1/events":
        if session is None:
            return error(401, "unauthenticated", "GET /v1/events needs Authorization: "
                         "Bearer SESSION_ID.RESUME_TOKEN (or the cookie POST /v1/cookie "
                         "sets, for a browser's EventSource)")
        return await events(host, stream, conn, request, slot, session)
    return await action(host, stream, conn, request, session)


# POST /v1/cookie --------------------------------------------------------------------

def set_cookie(host: Server, request: h11.Request, session: Session | None) -> Response:
    """The credential of the ``Authorization`` header as the stream's cookie: HttpOnly
    (no script reads it), SameSite=Strict (no other site's page sends it), sent
    only to ``/v1/events``, for as long as the session may be resumed."""
    if _has_body(request):
        return error(400, "bad_request", "POST /v1/cookie takes no body")
    found = credential(request)
    if session is None or not isinstance(found, tuple):
        return error(401, "unauthenticated", "POST /v1/cookie needs Authorization: "
                     "Bearer SESSION_ID.RESUME_TOKEN")
    age = int(host.config.sessions.resume_ttl_s)
    cookie = (f"{COOKIE}={found[0]}.{found[1]}; Path=/v1/events; Max-Age={age}; "
              f"HttpOnly; SameSite=Strict")
    body = json.dumps({"cookie": COOKIE, "path": "/v1/events", "max_age": age}).encode()
    return Response(200, body, JSON, [(b"set-cookie", cookie.encode())])


def _has_body(request: h11.Request) -> bool:
    return header(request, b"transfer-encoding") is not None or \
        (header(request, b"content-length") or b"0") != b"0"


# POST /v1/actions -------------------------------------------------------------------

async def action(host: Server, stream: trio.abc.Stream, conn: h11.Connection,
                 request: h11.Request, session: Session | None) -> Response:
    limits = host.config.host.limits
    kind = (header(request, b"content-type") or b"").split(b";")[0].strip().lower()
    if kind != JSON.encode():
        return error(415, "bad_request", "the body must be one JSON envelope with "
                     "Content-Type: application/json (curl --json)")
    limit = limits.max_frame_bytes if session is not None else \
        limits.max_frame_bytes_before_session
    key = "max_frame_bytes" if session is not None else "max_frame_bytes_before_session"
    body = await read_body(stream, conn, request, limit, key, limits.http_body_timeout_s)
    if isinstance(body, Response):
        return body
    remote = stream_address(stream)
    allowed = buckets(host).take(session.id if session is not None else "@" + remote,
                                 trio.current_time())  # counted before it is decoded
    req = await _request(host, body, session)
    if not allowed and req.error is None:
        req.error = RateLimited(f"more than {limits.rate_per_s:g} actions/s (burst "
                                f"{limits.rate_burst}); slow down")
    if req.error is None and req.action == "session.resume":
        req.error = BadRequest("session.resume is not served over HTTP: send the session's "
                               "credential in Authorization: Bearer SESSION_ID.RESUME_TOKEN, "
                               "and GET /v1/events with Last-Event-ID for what it missed")
    peer = HttpPeer(host.sessions, session, remote)
    req.conn = peer
    req.done = done = trio.Event()
    try:
        await host.router.put(req)
        await done.wait()
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        return error(503, "conflict", "the host is shutting down")
    finally:
        with trio.CancelScope(shield=True):
            await _leave(host, peer, session)
    return reply_response(req.result)


async def _leave(host: Server, peer: HttpPeer, session: Session | None) -> None:
    """After a request: a session it opened is left disconnected (resumable); one it
    acted as, that nothing is connected to, has its resume window restarted (at
    most every quarter window: each restart is a journal entry)."""
    target = peer.session
    if target is None:
        return
    if target.outbox is not peer:
        if target.outbox is not None or session is None:
            return
        since = target.record.get("disconnected_at")
        ttl = host.config.sessions.resume_ttl_s
        if since is not None and host.clock() - since < ttl / 4:
            return
    try:
        await host.router.put(Disconnect(peer))
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass  # the host is gone: startup marks every session disconnected


async def read_body(stream: trio.abc.Stream, conn: h11.Connection, request: h11.Request,
                    limit: int, key: str, timeout_s: float) -> bytes | Response:
    """The request's body (Content-Length or chunked), refused with 413 as soon as it
    is known to pass ``limit`` (unread), with 408 when it stalls past ``timeout_s``."""
    too_big = error(413, "bad_request", f"the body is over {limit} bytes "
                    f"(host.limits.{key})")
    declared = header(request, b"content-length")
    if declared is not None and int(declared) > limit:  # h11 checked it is a number
        return too_big
    if conn.they_are_waiting_for_100_continue:
        await stream.send_all(conn.send(h11.InformationalResponse(status_code=100, headers=[])))
    body = bytearray()
    with trio.move_on_after(timeout_s):
        while True:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError as exc:
                return error(400, "bad_request", f"bad request body: {plain(exc)}")
            if event is h11.NEED_DATA:
                try:
                    data = await stream.receive_some(65536)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    data = b""
                conn.receive_data(bytes(data))
                continue
            if isinstance(event, h11.Data):
                body += event.data
                if len(body) > limit:
                    return too_big
            elif isinstance(event, h11.EndOfMessage):
                return bytes(body)
            else:  # the peer closed before the end of its body
                return error(400, "bad_request", "the body ended early")
    return error(408, "bad_request", f"the body did not arrive within {timeout_s:g} s "
                 f"(host.limits.http_body_timeout_s)")


async def _request(host: Server, body: bytes, session: Session | None) -> Request:
    """The body as a request, decoded and checked as a WebSocket text frame is; a
    refusal travels in ``error``, to be answered through the dispatcher like any."""
    budget = item_budget(host.config.host.limits, session.role if session else None)
    try:
        decoded = await decode_frame(body, budget, threads=host.threads, encoding="json")
    except DecodeError as exc:
        return undecodable(body, exc, None, "json", host.config.host.limits.max_id_bytes)
    return request_of(decoded, None, "json")


# GET /v1/events ----------------------------------------------------------------------

SSE_HEAD = (b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream; charset=utf-8\r\n"
            b"cache-control: no-store\r\nx-accel-buffering: no\r\nconnection: close\r\n"
            b"x-content-type-options: nosniff\r\n\r\n")


def last_event_id(request: h11.Request) -> int | Response:
    if _twice(request, b"last-event-id"):
        return error(400, "bad_request", "send one Last-Event-ID header, not several")
    raw = header(request, b"last-event-id")
    if raw is None or not raw.strip():
        return 0  # a first stream: everything the session still holds, as last_seq 0
    text = raw.strip()
    if not text.isdigit() or len(text) > 16 or int(text) > MAX_SEQ:
        return error(400, "validation_error", f"Last-Event-ID must be a seq, a whole number "
                     f"from 0 to {MAX_SEQ}")
    return int(text)


async def events(host: Server, stream: trio.abc.Stream, conn: h11.Connection,
                 request: h11.Request, slot: Slot | None, session: Session) -> Response | None:
    """The session's stream: attached like ``session.resume`` with ``last_seq`` from
    ``Last-Event-ID`` (displacing the session's other connection), then run as any
    transport connection until the client leaves or is dropped."""
    if _has_body(request):
        return error(400, "bad_request", "GET /v1/events takes no body")
    last_seq = last_event_id(request)
    if isinstance(last_seq, Response):
        return last_seq
    if not buckets(host).take(session.id, trio.current_time()):
        return reply_response(Signal("error", {
            "code": "rate_limited", "message": "too many requests for this session; slow "
            "down", "action": "session.resume"}, None, True))
    found = credential(request, cookie=True)
    assert isinstance(found, tuple)
    channel = SseChannel(stream, SSE_HEAD, send_timeout_s=host.config.host.ping_timeout_s)
    sse = host.transport.connection(channel, stream_address(stream), slot,
                                    max_frame=_UNBOUNDED, cls=SseConnection)
    done = trio.Event()
    req = Request("session.resume", {"session_id": found[0], "resume_token": found[1],
                                     "last_seq": last_seq}, None, False, sse, "json", done=done)
    try:
        await host.router.put(req)
        await done.wait()
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        return error(503, "conflict", "the host is shutting down")
    if sse.session is None:
        return reply_response(req.result)
    await host.transport.run(sse)
    return None
