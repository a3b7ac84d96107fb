"""bench/rawclient.py, the cheap load generator of bench/roundtrip.py: its
hand-rolled WebSocket framing must be what wsproto (the host's transport)
reads and writes, and it must drive a real ``worldhost serve``."""

from __future__ import annotations

from pathlib import Path

from hypothesis import example, given, settings
from hypothesis import strategies as st
from wsproto.frame_protocol import FrameProtocol, Opcode

from common import host_process
from rawclient import Conn, Masker, open_session, parse_frames, requester, run


@settings(deadline=None)  # a loaded machine may take long over a 64 KiB example
@given(st.text(max_size=400))
@example("x" * 125)
@example("x" * 126)
@example("x" * 65535)
@example("x" * 65536)
def test_masked_frames_are_what_wsproto_reads(payload: str) -> None:
    server = FrameProtocol(client=False, extensions=[])
    server.receive_bytes(Masker().frame(payload.encode()))
    frames = list(server.received_frames())
    assert len(frames) == 1
    assert frames[0].opcode == Opcode.TEXT
    assert frames[0].frame_finished and frames[0].message_finished
    assert frames[0].payload == payload


@settings(deadline=None)
@given(st.lists(st.binary(max_size=300), max_size=5), st.lists(st.integers(1, 400), max_size=8))
@example([b"y" * 70000], [3, 9, 200])
def test_server_frames_parse_whatever_the_chunks(payloads: list[bytes], cuts: list[int]) -> None:
    server = FrameProtocol(client=False, extensions=[])
    wire = b"".join(server.send_data(p, fin=True) for p in payloads)
    buf = bytearray()
    got: list[bytes] = []
    at = 0
    for size in [*cuts, len(wire)]:
        buf += wire[at:at + size]
        at += size
        got += [payload for _, payload in parse_frames(buf)]
    assert got == payloads
    assert not buf


def test_drives_a_real_host(tmp_path: Path) -> None:
    server = host_process(tmp_path).start()
    try:
        for action in ("host.ping", "bench.touch"):
            conns = [Conn(server.url, line=False) for _ in range(3)]
            for i, conn in enumerate(conns):
                open_session(conn, f"raw-{action}-{i}")
            latencies = run(conns, 0.3, requester(action), host=True, first_index=0)
            assert len(latencies) >= 3
            assert all(0 < t < 5 for t in latencies)
            for conn in conns:
                conn.sock.close()
    finally:
        server.stop()
