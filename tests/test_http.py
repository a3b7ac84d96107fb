"""The HTTP face of the WebSocket port: pages, the client, health, metrics, bounds, origins."""

from __future__ import annotations

import json
import socket
import struct
from typing import Any

import h11
import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st
from trio_websocket import HandshakeError, open_websocket_url

from host import http
from host.client import CallError


async def fetch(port: int, raw: bytes, timeout: float = 5) -> tuple[int, dict[str, str], bytes]:
    """Send raw bytes, read to EOF; (status, headers, body)."""
    with trio.fail_after(timeout):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(raw)
            data = b""
            while chunk := await stream.receive_some(65536):
                data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return status, headers, body


def get(path: str, extra: str = "") -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{extra}\r\n".encode()


async def test_pages_and_client_are_served_with_types_and_cache_headers(worldhost: Any) -> None:
    h = await worldhost.start(listen=True)
    status, headers, body = await fetch(h.host.port, get("/"))
    assert status == 200 and headers["content-type"].startswith("text/html")
    for link in (b"/inspector", b"/play", b"/client/worldhost.js", b"/healthz", b"/metrics"):
        assert link in body
    status, headers, body = await fetch(h.host.port, get("/client/worldhost.js"))
    assert status == 200 and headers["content-type"] == "text/javascript; charset=utf-8"
    assert b"export class WorldhostClient" in body
    assert headers["cache-control"] == "no-cache" and headers["x-content-type-options"] == "nosniff"
    etag = headers["etag"]
    status, _, body = await fetch(h.host.port, get("/client/worldhost.js", f"If-None-Match: {etag}\r\n"))
    assert status == 304 and body == b""
    status, headers, body = await fetch(h.host.port, get("/client/worldhost.d.ts"))
    assert status == 200 and b"export declare class WorldhostClient" in body
    for page in ("/inspector", "/play"):
        status, headers, body = await fetch(h.host.port, get(page))
        assert status == 200 and headers["content-type"].startswith("text/html"), page
    status, headers, body = await fetch(h.host.port, b"HEAD / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status == 200 and body == b"" and int(headers["content-length"]) > 0


async def test_unknown_paths_methods_and_the_websocket_path(worldhost: Any) -> None:
    h = await worldhost.start(listen=True)
    status, _, body = await fetch(h.host.port, get("/nope"))
    assert status == 404 and b"/nope" in body and b"/inspector" in body
    status, headers, body = await fetch(h.host.port, get("/ws"))
    assert status == 426 and b"WebSocket" in body and headers["upgrade"] == "websocket"
    status, headers, _ = await fetch(h.host.port, b"POST / HTTP/1.1\r\nHost: x\r\n"
                                                  b"Content-Length: 0\r\n\r\n")
    assert status == 405 and headers["allow"] == "GET, HEAD"
    status, _, _ = await fetch(h.host.port, b"NOT HTTP AT ALL\r\n\r\n")
    assert status == 400
    # the WebSocket still works on any path, next to all this
    async with h.client("ada") as ada:
        assert (await ada.call("host.ping", x=1)) == {"x": 1}


@pytest.mark.parametrize("path", [
    "/static/../http.py", "/static/..%2fhttp.py", "/static/%2e%2e%2fhttp.py",
    "/static/%2E%2E/http.py", "/static/..%5chttp.py", "/static/worldhost.js%00",
    "/static/%00", "/static/.%2e/server.py", "/client/../http.py", "/static//etc/passwd",
    "/static/%ff%fe.js", "/static/", "/static/.worldhost.js", "/../host/http.py",
])
async def test_no_path_escapes_the_asset_folder(worldhost: Any, path: str) -> None:
    h = await worldhost.start(listen=True)
    status, _, body = await fetch(h.host.port, get(path))
    assert status == 404, (path, status)
    assert b"import" not in body


@settings(max_examples=300, deadline=None)
@given(st.text(min_size=0, max_size=40))
def test_any_static_name_is_a_file_in_the_folder_or_nothing(raw: str) -> None:
    target = ("/static/" + raw).encode("utf-8", "surrogatepass")
    try:
        request = h11.Request(method="GET", target=target, headers=[("Host", "x")])
    except h11.LocalProtocolError:
        return  # not a request line h11 (or any client) would send
    response = http.respond(None, request)  # type: ignore[arg-type]  # static paths need no host
    if response.status == 200:
        name = http.static_name(raw)
        assert name is not None and (http.WEB / name).resolve().parent == http.WEB.resolve()
    else:
        assert response.status in (404, 304)


async def test_health_reports_up_worlds_and_sessions(worldhost: Any) -> None:
    h = await worldhost.start(listen=True)
    status, headers, body = await fetch(h.host.port, get("/healthz"))
    health = json.loads(body)
    assert status == 200 and headers["content-type"] == "application/json"
    assert health["status"] == "up" and health["up"] is True and health["worlds"] == 1
    assert health["sessions"] == 0
    async with h.client("ada"):
        _, _, body = await fetch(h.host.port, get("/healthz"))
        assert json.loads(body)["sessions"] == 1 and json.loads(body)["connected"] == 1
    h.host.lobby.dispatcher.accepting = False  # as during a shutdown
    status, _, body = await fetch(h.host.port, get("/healthz"))
    assert status == 503 and json.loads(body)["status"] == "stopping"
    h.host.lobby.dispatcher.accepting = True


async def test_metrics_count_actions_errors_commits_and_connections(worldhost: Any) -> None:
    h = await worldhost.start(listen=True)
    async with h.client("ada") as ada:
        await ada.call("chat.say", text="hello")
        with pytest.raises(CallError):
            await ada.call("no.such_action")
        status, headers, body = await fetch(h.host.port, get("/metrics"))
    text = body.decode()
    assert status == 200 and headers["content-type"].startswith("text/plain; version=0.0.4")
    values = {}
    for line in text.splitlines():
        if not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    assert values["worldhost_connections"] == 1
    assert values['worldhost_sessions{state="connected"}'] == 1
    assert values["worldhost_actions_total"] >= 2  # session.open, chat.say
    assert values['worldhost_errors_total{code="unknown_action"}'] == 1
    assert values["worldhost_journal_commits_total"] >= 1
    assert values["worldhost_journal_commit_seconds_count"] == values["worldhost_journal_commits_total"]
    assert 0 < values["worldhost_journal_commit_wait_seconds_total"] \
        <= values["worldhost_journal_commit_seconds_sum"]
    assert values["worldhost_checkpoint_seconds_count"] >= 1
    assert values["worldhost_session_signals_sent"] >= 3
    assert "worldhost_signals_dropped_total" in values and "worldhost_simulation_tick" in values
    for name in {n.split("{")[0] for n in values}:
        base = name.removesuffix("_sum").removesuffix("_count")
        assert f"# TYPE {base} " in text, name


async def test_request_headers_are_bounded_in_size_and_time(worldhost: Any) -> None:
    h = await worldhost.start(listen=True, config={"host": {"limits": {
        "max_http_header_bytes": 2048, "http_timeout_s": 0.5}}})
    big = get("/", "X-Big: " + "a" * 4000 + "\r\n")
    status, _, body = await fetch(h.host.port, big)
    assert status == 431 and b"too large" in body
    upgrade = ("Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
               "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n")
    status, _, body = await fetch(h.host.port, get("/", upgrade + "X-Big: " + "a" * 4000 + "\r\n"))
    assert status == 431 and b"too large" in body  # a handshake is held to it too
    # slowloris: a request line, then nothing; the host closes within the timeout
    started = trio.current_time()
    with trio.fail_after(5):
        stream = await trio.open_tcp_stream("127.0.0.1", h.host.port)
        async with stream:
            await stream.send_all(b"GET / HTTP/1.1\r\nHost: x\r\n")
            assert await stream.receive_some(1000) == b""
    assert trio.current_time() - started < 2


async def test_a_websocket_handshake_is_held_to_the_same_header_bound(worldhost: Any) -> None:
    """max_http_header_bytes bounds the WebSocket handshake too (as documented), not
    only plain requests: wsproto's own bound (16 KiB) let a bigger one through."""
    h = await worldhost.start(listen=True, config={"host": {"limits": {
        "max_http_header_bytes": 2048}}})
    with pytest.raises(HandshakeError) as err:
        async with open_websocket_url(h.url, extra_headers=[(b"X-Big", b"a" * 4000)]):
            pass
    assert getattr(err.value, "status_code", None) == 431
    async with open_websocket_url(h.url, extra_headers=[(b"X-Small", b"a" * 1000)]) as ws:
        assert json.loads(await ws.get_message())["signal"] == "server.info"


async def test_pages_of_the_host_may_connect_without_allowed_origins(worldhost: Any) -> None:
    h = await worldhost.start(listen=True)  # allowed_origins = []
    port = h.host.port
    same = [(b"Origin", f"http://127.0.0.1:{port}".encode())]
    async with open_websocket_url(h.url, extra_headers=same) as ws:
        assert json.loads(await ws.get_message())["signal"] == "server.info"
    foreign = [f"http://evil.example:{port}", f"http://127.0.0.1:{port + 1}",
               f"http://localhost:{port}", "null", f"file://127.0.0.1:{port}"]
    for origin in foreign:
        with pytest.raises(HandshakeError) as err:
            async with open_websocket_url(h.url, extra_headers=[(b"Origin", origin.encode())]):
                pass
        assert getattr(err.value, "status_code", None) == 403, origin


def test_same_origin_needs_a_matching_address_not_a_name() -> None:
    from host.transport import same_origin
    assert same_origin("http://127.0.0.1:8765", "127.0.0.1:8765")
    assert same_origin("https://[::1]:8765", "[::1]:8765")
    assert same_origin("http://localhost:8765", "localhost:8765")
    assert same_origin("http://10.0.0.5", "10.0.0.5")
    # a DNS name could be rebound to this machine by the page that owns it
    assert not same_origin("http://evil.example:8765", "evil.example:8765")
    assert not same_origin("http://127.0.0.1:8765", "127.0.0.1:8766")
    assert not same_origin("http://127.0.0.1:8765", None)
    assert not same_origin("ws://127.0.0.1:8765", "127.0.0.1:8765")


async def test_a_peer_that_vanishes_mid_request_leaves_the_host_serving(worldhost: Any) -> None:
    h = await worldhost.start(listen=True)
    # reset (RST) mid-headers and right after a whole request
    for raw in (b"GET / HT", get("/client/worldhost.js")):
        sock = trio.socket.socket()
        await sock.connect(("127.0.0.1", h.host.port))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        await sock.send(raw)
        sock.close()
    # a peer that closes before reading the answer
    for _ in range(3):
        client_end, server_end = trio.testing.memory_stream_pair()
        h.host.accept_stream(server_end)
        await client_end.send_all(get("/client/worldhost.js"))
        await client_end.aclose()
    await trio.sleep(0.3)
    status, _, _ = await fetch(h.host.port, get("/healthz"))
    assert status == 200
    async with h.client("ada") as ada:
        assert (await ada.call("host.ping", x=1)) == {"x": 1}


async def test_every_asset_a_page_names_is_served(worldhost: Any) -> None:
    import re
    h = await worldhost.start(listen=True)
    seen: set[str] = set()
    todo = ["/", "/inspector", "/play"]
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        status, _, body = await fetch(h.host.port, get(path))
        assert status == 200, path
        text = body.decode()
        for ref in re.findall(r'(?:src|href)="(/[^"]*)"|from "(/[^"]*)"', text):
            todo.extend(r for r in ref if r)
    assert {"/static/map.js", "/static/play.js", "/static/inspector.js", "/client/worldhost.js",
            "/static/style.css"} <= seen


async def test_metrics_keep_every_digit_of_big_values(worldhost: Any) -> None:
    """Past a million a counter or gauge is written whole, not rounded to six digits."""
    h = await worldhost.start(config={"host": {"admin_token": "adm"}}, listen=True)
    async with h.client("root", token="adm") as root:
        state = (await root.call("simulation.export_state"))["state_data"]
        state["metadata"]["tick"] = 1_234_567
        await root.call("simulation.import_state", state_data=state)
        status, _, body = await fetch(h.host.port, get("/metrics"))
    assert status == 200
    lines = body.decode().splitlines()
    assert "worldhost_simulation_tick 1234567" in lines, [l for l in lines if "tick" in l]
