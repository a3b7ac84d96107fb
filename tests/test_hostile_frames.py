"""Hostile frames against a real ``worldhost serve``: decode bombs, piece floods, big
integers, sloppy encodings and protocol violations. The client is the independent
``websockets`` library (and raw bytes on its socket where a frame must be malformed)."""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cbor2
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

from serverproc import ServerProcess
from worlds import grid_map
from state.codec import (
    INT_MAX,
    INT_MIN,
    DecodeError,
    count_json_items,
    decode_cbor,
    decode_json,
    scan_cbor,
)

TIGHT = """
[host.limits]
max_frame_bytes = 65536
max_frame_items = 1000
max_player_frame_items = 1000
max_open_transfer_bytes = 65536
transfer_timeout_s = 1.0
rate_per_s = 20
rate_burst = 40
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    proc = ServerProcess(tmp_path_factory.mktemp("hostile") / "world.db",
                         env={"WORLDHOST_ADMIN_TOKEN": "adm"}).start()
    yield proc
    assert proc.stop() == 0


@pytest.fixture(scope="module")
def tight(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    folder = tmp_path_factory.mktemp("tight")
    (folder / "tight.toml").write_text(TIGHT)
    proc = ServerProcess(folder / "world.db", config=folder / "tight.toml").start()
    yield proc
    assert proc.stop() == 0


def recv(ws: ClientConnection, timeout: float = 10) -> dict[str, Any]:
    message = ws.recv(timeout=timeout)
    return json.loads(message) if isinstance(message, str) else cbor2.loads(message)


def call(ws: ClientConnection, action: str, params: Any = None, rid: Any = None,
         cbor: bool = False) -> dict[str, Any]:
    frame = {"id": rid if rid is not None else action, "action": action,
             "params": params if params is not None else {}}
    ws.send(cbor2.dumps(frame) if cbor else json.dumps(frame))
    return until_re(ws, frame["id"])


def until_re(ws: ClientConnection, rid: Any) -> dict[str, Any]:
    while True:
        msg = recv(ws)
        if msg.get("re") == rid:
            return msg


def client(proc: ServerProcess, name: str | None = None, token: str | None = None
           ) -> ClientConnection:
    ws = connect(proc.url, max_size=None)
    assert recv(ws)["signal"] == "server.info"
    if name is not None:
        params = {"name": name} if token is None else {"name": name, "token": token}
        assert call(ws, "session.open", params)["signal"] == "session.opened"
        assert recv(ws)["signal"] == "sync_state"
    return ws


def raw_frame(opcode: int, payload: bytes, rsv1: bool = False, fin: bool = True) -> bytes:
    """One masked client frame, built by hand so it can be wrong."""
    head = bytes([(0x80 if fin else 0) | (0x40 if rsv1 else 0) | opcode])
    size = len(payload)
    if size < 126:
        head += bytes([0x80 | size])
    elif size < 65536:
        head += bytes([0x80 | 126]) + size.to_bytes(2, "big")
    else:
        head += bytes([0x80 | 127]) + size.to_bytes(8, "big")
    mask = b"\x11\x22\x33\x44"
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def close_frame(ws: ClientConnection) -> tuple[int | None, str]:
    """Read until the host closes; the code and reason of its close frame (None: none)."""
    with pytest.raises(ConnectionClosed) as closed:
        for _ in range(10_000):
            ws.recv(timeout=10)
    rcvd = closed.value.rcvd
    return (rcvd.code, rcvd.reason) if rcvd is not None else (None, "")


def close_code(ws: ClientConnection) -> int | None:
    return close_frame(ws)[0]


# decode bombs ---------------------------------------------------------------------

N_BOMB = 8 * 1024 * 1024


@pytest.mark.parametrize("kind", ["cbor", "json"])
def test_a_decode_bomb_is_refused_without_stalling_others_or_keeping_memory(
        server: ServerProcess, kind: str) -> None:
    bomb: str | bytes
    if kind == "cbor":  # an array of 8 Mi empty maps: one byte each on the wire
        bomb = b"\x9a" + N_BOMB.to_bytes(4, "big") + b"\xa0" * N_BOMB
    else:  # 5.6 Mi empty objects in (just under) 16 MiB of JSON
        bomb = "[" + "{}," * (16 * 1024 * 1024 // 3 - 2) + "{}]"
    bystander = client(server)
    attacker = client(server, "attacker")  # before a session a big frame just closes
    call(bystander, "host.ping", rid="warm")
    baseline = server.memory_mib()
    latencies: list[float] = []
    done = threading.Event()

    def ping() -> None:
        i = 0
        while not done.is_set():
            start = time.monotonic()
            assert call(bystander, "host.ping", {"i": i}, rid=i)["data"] == {"i": i}
            latencies.append(time.monotonic() - start)
            i += 1
            time.sleep(0.01)

    pinger = threading.Thread(target=ping)
    pinger.start()
    try:
        attacker.send(bomb)
        reply = recv(attacker, timeout=60)
        time.sleep(0.3)  # a few pings after the refusal too
    finally:
        done.set()
        pinger.join(60)
    assert latencies and max(latencies) < 1.5, f"bystander waited {max(latencies):.2f} s"
    assert server.memory_mib() < baseline + 96, (baseline, server.memory_mib())
    assert reply["signal"] == "error" and reply["data"]["code"] == "bad_frame", reply
    assert "max_player_frame_items" in reply["data"]["message"]
    assert call(attacker, "host.ping", {"after": True})["data"] == {"after": True}
    attacker.close()
    bystander.close()


def test_items_a_frame_holds_count_not_only_those_it_declares(tight: ServerProcess) -> None:
    ws = client(tight)
    nested = {"x": [[0] * 10 for _ in range(100)]}  # small arrays, 1,100 values in all
    frame = {"id": "many", "action": "host.ping", "params": nested}
    for encoded in (json.dumps(frame), cbor2.dumps(frame)):
        ws.send(encoded)
        reply = recv(ws)  # a JSON frame's id is read back; a CBOR one's re is null
        assert reply["data"]["code"] == "bad_frame" and "1000 items" in reply["data"]["message"]
    fits = {"x": [[0] * 10 for _ in range(50)]}
    assert call(ws, "host.ping", fits, rid="fits", cbor=True)["data"] == fits
    ws.close()


def test_only_an_admin_may_send_frames_of_many_values(server: ServerProcess) -> None:
    """Frames of millions of values are for imports: anyone else is held to a bound whose
    decode cannot stall the host for long."""
    params = {"values": [0] * 150_000}  # over max_player_frame_items (100,000)
    ws = client(server, "player")
    ws.send(json.dumps({"id": "many", "action": "host.ping", "params": params}))
    reply = until_re(ws, None)  # too big for its id to be read back
    assert reply["data"]["code"] == "bad_frame", reply
    assert "host.limits.max_player_frame_items" in reply["data"]["message"]
    ws.close()
    admin = client(server, "admin", token="adm")
    reply = call(admin, "host.ping", params, rid="many")  # decoded; then too big to echo
    assert reply["data"]["code"] == "validation_error", reply
    admin.close()


def test_a_big_frame_before_a_session_closes_the_connection_undecoded(
        server: ServerProcess) -> None:
    """Nothing said before a session is big: such a frame closes with 1009 at once, so
    sockets without a session cannot pile big frames up waiting to be decoded."""
    ws = client(server)
    ws.send(json.dumps({"id": "big", "action": "host.ping", "params": {"x": "y" * 200_000}}))
    code, reason = close_frame(ws)
    assert code == 1009 and "before a session" in reason
    ws = client(server, "now")  # with a session the same frame is read and answered
    reply = call(ws, "host.ping", {"x": "y" * 200_000}, rid="big")
    assert reply["data"]["code"] == "validation_error"  # over max_ping_bytes, not a close
    ws.close()


def test_a_declared_length_the_frame_cannot_hold_is_refused(server: ServerProcess) -> None:
    ws = client(server)
    for frame in (b"\x9a\x7f\xff\xff\xff", b"\xa1\x65chunk\x9a\x00\x10\x00\x00\x00",
                  b"\xa1\x62id\x7a\x7f\x00\x00\x00ab"):
        ws.send(frame)
        reply = recv(ws)
        assert reply["data"]["code"] == "bad_frame" and "declares" in reply["data"]["message"]
    ws.close()


# chunked transfers ----------------------------------------------------------------

def piece(transfer: str, index: int, count: int, payload: str) -> str:
    return json.dumps({"chunk": {"transfer": transfer, "index": index, "count": count,
                                 "payload": payload}}, ensure_ascii=False)


def test_a_flood_of_pieces_is_rate_limited_and_disconnected(tight: ServerProcess) -> None:
    ws = client(tight, "pieces")
    for i in range(5000):
        try:
            ws.send(piece("t", i, 1_000_000, "x"))
        except ConnectionClosed:
            break
    code, reason = close_frame(ws)
    assert code == 1008 and "flooding" in reason
    with client(tight) as other:
        assert call(other, "host.ping")["signal"] == "host.pong"


def test_a_rate_limited_piece_drops_its_transfer_with_an_error(tmp_path: Path) -> None:
    (tmp_path / "slow.toml").write_text("[host.limits]\nrate_per_s = 1\nrate_burst = 2\n"
                                        "flood_factor = 1000\n")
    proc = ServerProcess(tmp_path / "w.db", config=tmp_path / "slow.toml").start()
    try:
        ws = client(proc, "slow")
        for i in range(3):
            ws.send(piece("slow", i, 5, "x"))
        reply = recv(ws)
        assert reply["data"]["code"] == "rate_limited" and "'slow'" in reply["data"]["message"]
        ws.close()
    finally:
        assert proc.stop() == 0


def test_unfinished_transfers_have_a_byte_budget_and_a_deadline(tight: ServerProcess) -> None:
    ws = client(tight, "pieces")
    ws.send(piece("first", 0, 3, "a" * 40_000))
    ws.send(piece("second", 0, 3, "é" * 20_000))  # 40,000 bytes: over 64 KiB together
    over = recv(ws)
    assert over["data"]["code"] == "bad_request", over
    assert "'second'" in over["data"]["message"]
    assert "max_open_transfer_bytes" in over["data"]["message"]
    late = recv(ws, timeout=5)  # 'first' never finishes: dropped after 1 s
    assert late["data"]["code"] == "bad_request" and "'first'" in late["data"]["message"]
    assert "transfer_timeout_s" in late["data"]["message"]
    ws.send(piece("first", 1, 3, "b"))  # it is gone: a piece 1 now starts nothing
    assert "must start with piece 0" in recv(ws)["data"]["message"]
    ws.send(piece("again", 0, 2, '{"id": "j", "action": "host.ping", '))
    ws.send(piece("again", 1, 2, '"params": {"ok": 1}}'))
    assert until_re(ws, "j")["data"] == {"ok": 1}
    ws.close()



def test_pieces_before_a_session_are_refused_and_long_action_names_are_not_echoed(
        server: ServerProcess) -> None:
    """Before a session nothing is held for a transfer; an action name is bounded, so an
    unknown one cannot draw back a reply twice its size."""
    ws = client(server)
    ws.send(piece("early", 0, 4, "x" * 1000))
    reply = recv(ws)
    assert reply["data"]["code"] == "unauthenticated" and "chunked" in reply["data"]["message"]
    ws.close()
    ws = client(server, "named")
    reply = call(ws, "x" * 100_000, rid="long")
    assert reply["data"]["code"] == "bad_request" and "at most 128" in reply["data"]["message"]
    assert len(json.dumps(reply)) < 1000
    ws.close()


def test_what_unfinished_transfers_held_is_given_back_when_the_connection_goes(
        server: ServerProcess) -> None:
    """Pieces held to the end of a connection are freed and the heap trimmed, so an
    attacker who sends most of four transfers and leaves keeps no memory."""
    warm = client(server, "warm")
    call(warm, "host.ping", {"warm": True})
    baseline = server.memory_mib()
    ws = client(server, "holder")
    mib = "x" * (1 << 20)
    for transfer in range(4):
        for index in range(16):  # 16 of 32 pieces: 64 MiB held, under the 256 MiB budget
            ws.send(piece(f"t{transfer}", index, 32, mib))
    assert call(ws, "host.ping", {"held": True})["data"] == {"held": True}
    assert server.memory_mib() > baseline + 48  # the pieces are held while it lives
    ws.close()
    deadline = time.monotonic() + 10
    while server.memory_mib() > baseline + 24 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert server.memory_mib() <= baseline + 24, (baseline, server.memory_mib())
    warm.close()

# numbers --------------------------------------------------------------------------

@pytest.mark.parametrize("number", [2**63, -(2**63) - 1, 10**30, -(10**400)])
def test_integers_outside_64_bits_are_refused_in_both_encodings(
        server: ServerProcess, number: int) -> None:
    ws = client(server)
    text = '{"id": "big", "action": "host.ping", "params": {"n": %d}}' % number
    ws.send(text)
    reply = until_re(ws, "big")
    assert reply["data"]["code"] == "bad_frame" and "64-bit" in reply["data"]["message"]
    ws.send(cbor2.dumps({"id": "cbig", "action": "host.ping", "params": {"n": number}}))
    reply = recv(ws)
    assert reply["data"]["code"] == "bad_frame" and "64-bit" in reply["data"]["message"]
    for edge in (INT_MAX, INT_MIN):
        assert call(ws, "host.ping", {"n": edge}, rid="e")["data"] == {"n": edge}
        assert call(ws, "host.ping", {"n": edge}, rid="ce", cbor=True)["data"] == {"n": edge}
    ws.close()


@pytest.mark.parametrize("action, params", [
    ("simulation.add_agent", {"id": "t9", "kind": "truck", "node": "n0_0", "capacity": 10**400}),
    ("simulation.add_package", {"id": "p9", "origin": "n0_0", "destination": "n1_0",
                                "weight": 10**400}),
    ("simulation.add_package", {"id": "p8", "origin": "n0_0", "destination": "n1_0",
                                "deadline_tick": -(10**400)}),
])
def test_huge_integers_in_simulation_fields_are_refused_not_internal_errors(
        server: ServerProcess, action: str, params: dict[str, Any]) -> None:
    ws = client(server, "sim", token="adm")
    call(ws, "map.import", {"map_data": grid_map(2, 1)})  # so only the number is wrong
    frame = {"id": "huge", "action": action, "params": params}
    for encoded in (json.dumps(frame), cbor2.dumps(frame)):
        ws.send(encoded)
        reply = recv(ws)
        assert reply["data"]["code"] == "bad_frame", reply
        assert "64-bit" in reply["data"]["message"]
    state = call(ws, "simulation.export_state")["data"]["state_data"]
    assert params["id"] not in {a["id"] for a in state["agents"]} | \
        {p["id"] for p in state["packages"]}
    ws.close()


# strictness -----------------------------------------------------------------------

def test_a_text_frame_is_limited_in_bytes_not_characters(tight: ServerProcess) -> None:
    ws = client(tight)
    ws.send(json.dumps({"action": "host.ping", "params": {"x": "€" * 30_000}},
                       ensure_ascii=False))  # 30,000 characters, 90,000 bytes
    assert close_code(ws) == 1009


def test_json_with_a_duplicate_key_is_refused(server: ServerProcess) -> None:
    ws = client(server, "dup")
    ws.send('{"id": "d", "action": "chat.say", "params": {"text": "one", "text": "two"}}')
    reply = until_re(ws, "d")
    assert reply["data"]["code"] == "bad_frame" and "'text'" in reply["data"]["message"]
    ws.send('{"id": "d2", "action": "chat.say", "action": "host.ping"}')
    assert "'action'" in until_re(ws, "d2")["data"]["message"]
    history = call(ws, "chat.history", {"limit": 1000})["data"]["messages"]
    assert not any(m["text"] in ("one", "two") for m in history)
    ws.close()


def test_cbor_with_bytes_after_the_item_is_refused(server: ServerProcess) -> None:
    ws = client(server)
    ws.send(cbor2.dumps({"id": 1, "action": "host.ping"}) + b"\x00")
    reply = recv(ws)
    assert reply["data"]["code"] == "bad_frame" and "after the end" in reply["data"]["message"]
    ws.close()


def test_a_text_frame_that_is_not_utf8_is_a_bad_frame(server: ServerProcess) -> None:
    """PROTOCOL.md: everything wrong with a frame but its size is an ``error`` and
    the connection stays open (trio-websocket's wsproto closes with 1007 instead, as
    RFC 6455 has it; docs/protocol.md says so)."""
    library = os.environ.get("WORLDHOST_WEBSOCKET") or "websockets"
    ws = client(server)
    ws.socket.sendall(raw_frame(0x1, b'{"action": "host.ping", "x": "\xff\xfe"}'))
    if library == "trio-websocket":
        assert close_code(ws) == 1007
    else:
        reply = recv(ws)
        assert reply["signal"] == "error" and reply["re"] is None
        assert reply["data"]["code"] == "bad_frame" and "UTF-8" in reply["data"]["message"]
        assert call(ws, "host.ping")["signal"] == "host.pong"
        ws.close()
    with client(server) as other:
        assert call(other, "host.ping")["signal"] == "host.pong"


def test_a_protocol_violation_closes_with_1002(server: ServerProcess) -> None:
    ws = client(server)
    ws.socket.sendall(raw_frame(0x1, b'{"action": "host.ping"}', rsv1=True))
    assert close_code(ws) == 1002


# a bad frame's id -----------------------------------------------------------------

def test_a_frame_a_lenient_parser_reads_is_answered_with_its_id(server: ServerProcess) -> None:
    ws = client(server, "nan")
    ws.send('{"id": "inf", "action": "chat.say", "params": {"text": "x", "n": Infinity}}')
    reply = until_re(ws, "inf")
    assert reply["signal"] == "error" and reply["data"]["code"] == "bad_frame"
    # not remembered as that id's reply: the fixed frame under the same id is applied
    ws.send('{"id": "inf", "action": "host.ping", "params": {"n": 1}}')
    assert until_re(ws, "inf")["data"] == {"n": 1}
    ws.send("{" + '"pad": "' + "x" * 70_000 + '", "id": "huge", "n": NaN}')
    assert until_re(ws, None)["data"]["code"] == "bad_frame"  # too big to parse leniently
    ws.close()


# the decoder on its own -----------------------------------------------------------

plain = st.recursive(
    st.none() | st.booleans() | st.integers(INT_MIN, INT_MAX)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=6) | st.dictionaries(st.text(max_size=6), inner,
                                                                max_size=6),
    max_leaves=40,
)
anything = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5)
    | st.binary(max_size=5) | st.just(cbor2.undefined),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(
        st.text(max_size=4) | st.integers(), inner, max_size=5)
    | st.builds(cbor2.CBORTag, st.integers(0, 300), inner),
    max_leaves=30,
)


def values_in(value: Any) -> int:
    if isinstance(value, list):
        return 1 + sum(values_in(v) for v in value)
    if isinstance(value, dict):
        return 1 + sum(values_in(v) for v in value.values())
    return 1


@given(plain, st.integers(1, 60))
@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow])
def test_plain_values_round_trip_within_the_bound_and_are_refused_over_it(
        value: Any, max_items: int) -> None:
    held = values_in(value)
    encoded, text = cbor2.dumps(value), json.dumps(value)
    assert scan_cbor(encoded) == held <= count_json_items(text)  # JSON's count is a bound
    if held <= max_items:
        assert decode_cbor(encoded, max_items=max_items) == value
    else:
        with pytest.raises(DecodeError):
            decode_cbor(encoded, max_items=max_items)
    if count_json_items(text) <= max_items:
        assert decode_json(text, max_items=max_items) == value
    else:
        with pytest.raises(DecodeError):
            decode_json(text, max_items=max_items)


@given(st.binary(max_size=300) | anything.map(cbor2.dumps), st.integers(1, 50),
       st.integers(0, 10), st.binary(max_size=4))
@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
def test_any_bytes_decode_to_bounded_plain_data_or_a_decode_error(
        data: bytes, max_items: int, cut: int, tail: bytes) -> None:
    for frame in (data, data[:max(0, len(data) - cut)], data + tail):
        try:
            value = decode_cbor(frame, max_items=max_items)
        except DecodeError:
            continue
        assert values_in(value) <= max_items
        assert cbor2.loads(cbor2.dumps(value)) == value


@given(st.text(max_size=200) | plain.map(json.dumps), st.integers(1, 50))
@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
def test_any_text_decodes_to_bounded_plain_data_or_a_decode_error(
        text: str, max_items: int) -> None:
    try:
        value = decode_json(text, max_items=max_items)
    except DecodeError:
        return
    assert values_in(value) <= max_items


@pytest.mark.parametrize("frame, code", [
    ('{"id": ' + "9" * 4000 + ', "action": "host.ping"}', "bad_frame"),  # past 64 bits
    ('{"id": "' + "x" * 60_000 + '", "action": "host.ping", "params": {"a": NaN}}',
     "bad_frame"),
    ('{"id": "' + "x" * 200 + '", "action": "host.ping"}', "bad_request"),  # > max_id_bytes
], ids=["a 4000-digit id", "a long id in a bad frame", "a long id"])
def test_an_id_past_the_bounds_is_not_echoed(server: ServerProcess, frame: str,
                                             code: str) -> None:
    """A reply's ``re`` is an id the host would take: at most max_id_bytes, or a
    64-bit integer; else it is null, whatever the client sent (before a session too)."""
    for name in (None, "echo"):
        ws = client(server, name)
        ws.send(frame)
        reply = recv(ws)
        assert reply["signal"] == "error" and reply["data"]["code"] == code
        assert reply["re"] is None
        ok = '{"id": "' + "y" * 100 + '", "action": "host.ping", "params": {"a": NaN}}'
        ws.send(ok)  # one within the bounds is still answered with its id
        assert recv(ws)["re"] == "y" * 100
        ws.close()


def test_an_error_does_not_echo_megabytes_of_what_was_sent(server: ServerProcess) -> None:
    """An unknown field's name, a transfer id: an error names what the client sent,
    cut short, so a reply costs the host no more than the request did."""
    ws = client(server, "amp")
    field = "K" * (1 << 20)
    ws.send(json.dumps({"id": "a", "action": "chat.say", "params": {"text": "x", field: 1}}))
    reply = recv(ws)
    assert reply["data"]["code"] == "validation_error" and "KKKK" in reply["data"]["message"]
    assert len(json.dumps(reply)) < 8192
    piece = {"chunk": {"transfer": "Z" * 1000, "index": 0, "count": 2, "payload": "x"}}
    ws.send(json.dumps(piece))
    refused = recv(ws)
    assert refused["data"]["code"] == "bad_request" and "max_id_bytes" in \
        refused["data"]["message"]
    assert call(ws, "host.ping")["signal"] == "host.pong"
    ws.close()


@pytest.mark.parametrize("name", [None, "empties"])
@pytest.mark.parametrize("first, each", [
    (raw_frame(0x1, b'{"id": "z", "action": "host.ping"', fin=False),
     raw_frame(0x0, b"", fin=False)),
    (b"", raw_frame(0xA, b"")),
], ids=["empty continuation frames", "unasked pongs"])
def test_a_flood_of_frames_that_ask_nothing_is_a_flood(
        tight: ServerProcess, name: str | None, first: bytes, each: bytes) -> None:
    """Pieces of a message that never ends, pongs nobody asked for: each frame counts
    toward the flood rule, before a session and in one, and the flooder is closed."""
    ws = client(tight, name)
    ws.socket.sendall(first)
    try:
        for _ in range(50):
            ws.socket.sendall(each * 2000)
    except OSError:
        pass
    code, reason = close_frame(ws)
    assert code == 1008 and "flooding" in reason
    with client(tight) as other:
        assert call(other, "host.ping")["signal"] == "host.pong"
