"""Black-box protocol tests: a real ``worldhost serve`` process, an independent client
(the ``websockets`` library), and exactly the frames PROTOCOL.md describes."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import cbor2
import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

from serverproc import ServerProcess


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    proc = ServerProcess(tmp_path_factory.mktemp("protocol") / "world.db",
                         env={"WORLDHOST_ADMIN_TOKEN": "admin-secret"}).start()
    yield proc
    assert proc.stop() == 0


def recv(ws: ClientConnection) -> dict:
    message = ws.recv(timeout=10)
    return json.loads(message) if isinstance(message, str) else cbor2.loads(message)


def call(ws: ClientConnection, action: str, params: dict | None = None, rid: object = None,
         cbor: bool = False) -> dict:
    frame = {"id": rid if rid is not None else action, "action": action, "params": params or {}}
    ws.send(cbor2.dumps(frame) if cbor else json.dumps(frame))
    while True:
        msg = recv(ws)
        if msg.get("re") == frame["id"]:
            return msg


def opened(server: ServerProcess, name: str = "ada", token: str | None = None) -> tuple[ClientConnection, dict]:
    ws = connect(server.url, max_size=None)
    info = recv(ws)
    assert info["signal"] == "server.info"
    params = {"name": name} if token is None else {"name": name, "token": token}
    reply = call(ws, "session.open", params)
    assert reply["signal"] == "session.opened", reply
    assert recv(ws)["signal"] == "sync_state"
    return ws, reply["data"]


def test_server_info_comes_first(server: ServerProcess) -> None:
    with connect(server.url) as ws:
        info = recv(ws)
        assert info["signal"] == "server.info"
        data = info["data"]
        assert data["protocol"] == 1 and data["auth"] == "open"
        assert data["phase"] == "onboarding"
        for action in ("host.ping", "world.snapshot", "session.open", "map.import",
                       "simulation.export_state", "process.start", "nav.push", "chat.say"):
            assert action in data["actions"]
        assert "seq" not in info


def test_ping_before_a_session_and_unauthenticated_otherwise(server: ServerProcess) -> None:
    with connect(server.url) as ws:
        recv(ws)
        assert call(ws, "host.ping", {"a": [1, 2]}, rid=7) == {
            "signal": "host.pong", "re": 7, "data": {"a": [1, 2]}}
        reply = call(ws, "world.snapshot", rid="x")
        assert reply["signal"] == "error" and reply["data"]["code"] == "unauthenticated"
        unknown = call(ws, "foo.bar", rid="y")  # every action but the three, known or not
        assert unknown["data"]["code"] == "unauthenticated" and "foo.bar" in \
            unknown["data"]["message"]
        assert call(ws, "host.ping", rid=8)["signal"] == "host.pong"  # and it stays open


def test_session_open_snapshot_and_seq_without_gaps(server: ServerProcess) -> None:
    ws, data = opened(server)
    assert data["role"] == "player" and data["resumed"] is False
    snapshot = call(ws, "world.snapshot", {"slices": ["map", "chat"]})
    assert set(snapshot["data"]["slices"]) == {"map", "chat"}
    assert isinstance(snapshot["data"]["generation"], int)
    seqs = [snapshot["seq"]]
    for i in range(5):
        seqs.append(call(ws, "host.ping", {"i": i}, rid=f"p{i}")["seq"])
    assert seqs == list(range(seqs[0], seqs[0] + 6))
    assert seqs[0] == 3  # session.opened is 1, sync_state 2
    sessions = call(ws, "world.snapshot", {"slices": ["sessions"]}, rid="s")["data"]["slices"]
    assert data["session_id"] in sessions["sessions"]
    assert all("token_hash" not in record for record in sessions["sessions"].values())
    ws.close()


def test_admin_token_makes_an_admin(server: ServerProcess) -> None:
    ws, data = opened(server, "root", token="admin-secret")
    assert data["role"] == "admin"
    ws.close()
    with connect(server.url) as ws2:
        recv(ws2)
        reply = call(ws2, "session.open", {"name": "eve", "token": "guess"})
        assert reply["data"]["code"] == "unauthenticated"


@pytest.mark.parametrize("frame, code", [
    ("this is not json", "bad_frame"),
    ("[1, 2, 3]", "bad_frame"),
    ('"just a string"', "bad_frame"),
    ('{"id": 1, "action": "host.ping", "params": {"x": NaN}}', "bad_frame"),
    ('{"id": 1, "action": "host.ping", "params": {"x": Infinity}}', "bad_frame"),
    ("[" * 100_000 + "]" * 100_000, "bad_frame"),
    # deeper than the 64 levels a CBOR frame may nest (msgspec alone allows ~1,000)
    ('{"id": 1, "action": "host.ping", "params": {"x": ' + "[" * 70 + "]" * 70 + "}}",
     "bad_frame"),
    ('{"id": 1}', "bad_request"),
    ('{"id": 1, "action": 5}', "bad_request"),
    ('{"id": 1, "action": "host.ping", "params": [1]}', "bad_request"),
    ('{"id": 1, "action": "host.ping", "extra": true}', "bad_request"),
    # the host's own mark of a pipelined request is no envelope field
    ('{"id": 1, "action": "host.ping", "more": true}', "bad_request"),
    ('{"id": [1], "action": "host.ping"}', "bad_request"),
    ('{"id": 1, "action": "no.such_action"}', "unknown_action"),
    ('{"id": 1, "action": "simulation.tick"}', "unknown_action"),
])
def test_bad_text_frames(server: ServerProcess, frame: str, code: str) -> None:
    ws, _ = opened(server)
    ws.send(frame)
    reply = recv(ws)
    assert reply["signal"] == "error" and reply["data"]["code"] == code, reply
    assert "message" in reply["data"]
    assert call(ws, "host.ping", {"still": "here"})["data"] == {"still": "here"}
    ws.close()


@pytest.mark.parametrize("frame", [
    b"\xff\xfe\xfd",                                   # invalid CBOR
    b"\x81" * 100_000 + b"\x00",                       # nested 100,000 deep
    b"\x9f\x01\x02\xff",                               # indefinite-length array
    b"\xbf\x61a\x01\xff",                              # indefinite-length map
    b"\x7f\x61a\xff",                                  # indefinite-length text
    b"\x9b" + (2**63).to_bytes(8, "big"),              # declared length 2^63 (array)
    b"\x5b" + (2**63).to_bytes(8, "big"),              # declared length 2^63 (bytes)
    cbor2.dumps(cbor2.CBORTag(1, 1_000_000)),          # a datetime tag
    cbor2.dumps({"action": cbor2.CBORTag(32, "http://x")}),  # a tag inside
    cbor2.dumps(cbor2.CBORTag(55799, {"action": "host.ping"})),  # self-describe tag
    cbor2.dumps({"id": 1, "action": "host.ping", "params": {"x": float("nan")}}),
    b"\xa2\x61a\x01\x61a\x02",                         # duplicate keys
    cbor2.dumps({"id": 1, "action": "host.ping", "params": {"x": b"bytes"}}),
    cbor2.dumps([1, 2]),                               # not a map
])
def test_bad_cbor_frames(server: ServerProcess, frame: bytes) -> None:
    ws, _ = opened(server)
    ws.send(frame)
    reply = recv(ws)
    assert reply["signal"] == "error" and reply["data"]["code"] == "bad_frame", reply
    assert call(ws, "host.ping", {"ok": 1}, cbor=True)["data"] == {"ok": 1}
    ws.close()


def test_json_and_cbor_frames_nest_to_the_same_depth(server: ServerProcess) -> None:
    """64 levels in either encoding (the envelope counts one), never more in one of them."""
    ws, _ = opened(server)
    for levels, code in ((64, None), (65, "bad_frame")):
        nested: list = [1]
        for _ in range(levels - 3):  # the envelope, params and the innermost list count too
            nested = [nested]
        for cbor in (False, True):
            frame = {"id": f"{levels}{cbor}", "action": "host.ping", "params": {"x": nested}}
            ws.send(cbor2.dumps(frame) if cbor else json.dumps(frame))
            reply = recv(ws)  # (a refused CBOR frame's id cannot be told)
            if code is None:
                assert reply["signal"] == "host.pong", (levels, cbor, reply)
            else:
                assert reply["data"]["code"] == code, (levels, cbor, reply)
                assert "nesting deeper than 64 levels" in reply["data"]["message"]
    ws.close()


def test_params_validation_names_the_field(server: ServerProcess) -> None:
    ws, _ = opened(server)
    wrong_type = call(ws, "nav.push", {"agent_id": "a", "path": 5})
    assert wrong_type["data"]["code"] == "validation_error"
    assert wrong_type["data"]["details"]["path"] == "params.path"
    missing = call(ws, "nav.push", {"agent_id": "a"}, rid="m")
    assert missing["data"]["code"] == "validation_error"
    assert "path" in missing["data"]["details"]["message"]
    extra = call(ws, "nav.push", {"agent_id": "a", "path": "/x", "bogus": 1}, rid="e")
    assert extra["data"]["code"] == "validation_error"
    assert "bogus" in extra["data"]["details"]["message"]
    ws.close()


def test_cbor_requests_get_cbor_replies_and_broadcasts_follow_the_last_frame(
        server: ServerProcess) -> None:
    listener, _ = opened(server, "listener")
    speaker, _ = opened(server, "speaker")
    listener.send(cbor2.dumps({"id": "c", "action": "host.ping"}))
    pong = listener.recv(timeout=10)
    assert isinstance(pong, bytes) and cbor2.loads(pong)["signal"] == "host.pong"
    call(speaker, "chat.say", {"text": "hello"})
    heard = listener.recv(timeout=10)
    assert isinstance(heard, bytes)
    assert cbor2.loads(heard)["data"]["text"] == "hello"
    listener.close()
    speaker.close()


def test_repeated_request_id_is_answered_not_executed_again(server: ServerProcess) -> None:
    ws, _ = opened(server, "dup")
    first = call(ws, "chat.say", {"text": "once"}, rid="say-1")
    again = call(ws, "chat.say", {"text": "once"}, rid="say-1")
    assert first["data"] == again["data"] and again["seq"] > first["seq"]
    history = call(ws, "chat.history", {"limit": 1000})["data"]["messages"]
    assert sum(1 for m in history if m["text"] == "once") == 1
    ws.close()


def test_a_repeated_id_gets_its_first_reply_whatever_the_error(tmp_path: Path) -> None:
    """A request refused by the rate limit is answered so again if its id comes back:
    an id is used once, and the host answers it with the reply it gave first."""
    config = tmp_path / "limits.toml"
    config.write_text("[host.limits]\nrate_per_s = 1.0\nrate_burst = 3\n")
    proc = ServerProcess(tmp_path / "world.db", config=config).start()
    try:
        ws, _ = opened(proc, "eager")  # the open took one token
        replies = [call(ws, "host.ping", rid=f"p{i}") for i in range(4)]
        limited = next(r for r in replies if r["signal"] == "error")
        assert limited["data"]["code"] == "rate_limited"
        time.sleep(2.5)  # tokens again
        again = call(ws, "chat.say", {"text": "later"}, rid=limited["re"])
        assert again["signal"] == "error" and again["data"] == limited["data"]
        assert again["seq"] > limited["seq"]
        said = call(ws, "chat.history", {"limit": 10}, rid="h")["data"]["messages"]
        assert not any(m["text"] == "later" for m in said)
        ws.close()
    finally:
        assert proc.stop() == 0


def test_frame_over_the_limit_closes_with_1009(tmp_path: Path) -> None:
    config = tmp_path / "small.toml"
    config.write_text("[host.limits]\nmax_frame_bytes = 4096\n")
    proc = ServerProcess(tmp_path / "w.db", config=config).start()
    try:
        ws = connect(proc.url, max_size=None)
        recv(ws)
        ws.send(json.dumps({"action": "host.ping", "params": {"x": "y" * 10_000}}))
        with pytest.raises(ConnectionClosed) as closed:
            recv(ws)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009
        with connect(proc.url) as other:  # the server is fine
            recv(other)
            assert call(other, "host.ping")["signal"] == "host.pong"
    finally:
        assert proc.stop() == 0


def test_a_thousand_bad_frames_do_not_disturb_other_clients(server: ServerProcess) -> None:
    bad, _ = opened(server, "noisy")
    good, _ = opened(server, "quiet")
    answers: list[int] = []

    def pinger() -> None:
        for i in range(50):
            answers.append(call(good, "host.ping", {"i": i}, rid=f"g{i}")["data"]["i"])

    codes: set[str] = set()

    def reader() -> None:
        for _ in range(1000):
            codes.add(recv(bad)["data"]["code"])

    threads = [threading.Thread(target=pinger), threading.Thread(target=reader)]
    for thread in threads:
        thread.start()
    for i in range(1000):
        bad.send("not json" if i % 2 else b"\xff")
    for thread in threads:
        thread.join(30)
    assert codes == {"bad_frame"}
    assert answers == list(range(50))
    time.sleep(0.1)  # 1,000 frames spent its rate-limit bucket; 100/s refills one in 10 ms
    assert call(bad, "host.ping", {"alive": True})["data"] == {"alive": True}
    bad.close()
    good.close()


def test_resume_replays_missed_signals_in_order(server: ServerProcess) -> None:
    ws, data = opened(server, "roamer")
    talker, _ = opened(server, "talker")
    last_seq = call(ws, "host.ping")["seq"]
    ws.close()
    for i in range(3):
        call(talker, "chat.say", {"text": f"while away {i}"}, rid=f"t{i}")
    ws2 = connect(server.url)
    recv(ws2)
    resumed = call(ws2, "session.resume", {"session_id": data["session_id"],
                                           "resume_token": data["resume_token"],
                                           "last_seq": last_seq})
    assert resumed["signal"] == "session.resumed"
    body = resumed["data"]
    assert body["session_id"] == data["session_id"] and body["complete"] is True
    assert body["replayed"] == 3
    replayed = [recv(ws2) for _ in range(3)]
    assert [m["seq"] for m in replayed] == [last_seq + 1, last_seq + 2, last_seq + 3]
    assert [m["data"]["text"] for m in replayed] == [f"while away {i}" for i in range(3)]
    assert recv(ws2)["signal"] == "sync_state"
    # the new token works; once it has been presented, the old one no longer does
    ws2.close()
    ws3 = connect(server.url)
    recv(ws3)
    again = call(ws3, "session.resume", {"session_id": data["session_id"],
                                         "resume_token": body["resume_token"], "last_seq": 0})
    assert again["signal"] == "session.resumed"
    ws3.close()
    ws4 = connect(server.url)
    recv(ws4)
    stale = call(ws4, "session.resume", {"session_id": data["session_id"],
                                         "resume_token": data["resume_token"], "last_seq": 0})
    assert stale["data"]["code"] == "unauthenticated"
    for sock in (ws4, talker):
        sock.close()


def test_session_close_ends_the_session_for_good(server: ServerProcess) -> None:
    ws, data = opened(server, "leaver")
    said = call(ws, "chat.say", {"text": "bye"})
    while (last := recv(ws))["signal"] != "chat.message":  # its broadcast follows the reply
        pass
    closed = call(ws, "session.close")
    assert closed["signal"] == "session.closed"
    assert closed["seq"] == last["seq"] + 1 and said["seq"] < last["seq"]  # counted, too
    assert call(ws, "world.snapshot", rid="after")["data"]["code"] == "unauthenticated"
    with connect(server.url) as ws2:
        recv(ws2)
        again = call(ws2, "session.resume", {"session_id": data["session_id"],
                                             "resume_token": data["resume_token"],
                                             "last_seq": 0})
        assert again["data"]["code"] == "unauthenticated"
    ws.close()
