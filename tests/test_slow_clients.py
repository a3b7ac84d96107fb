"""Clients that stop reading: dropped in time, and never sent a broken stream.

These speak WebSocket over a raw TCP socket (wsproto for the framing) so that the
client can stop reading in the middle of a frame, which no WebSocket library does.
"""

from __future__ import annotations

import json
from typing import Any

import trio
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, CloseConnection, Event, Request, TextMessage


class RawClient:
    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.ws = WSConnection(ConnectionType.CLIENT)

    @classmethod
    async def connect(cls, port: int) -> RawClient:
        client = cls(await trio.open_tcp_stream("127.0.0.1", port))
        await client.stream.send_all(client.ws.send(Request(host="127.0.0.1", target="/")))
        await client.until(lambda e: isinstance(e, AcceptConnection))
        return client

    async def send(self, message: dict[str, Any]) -> None:
        await self.stream.send_all(self.ws.send(TextMessage(json.dumps(message))))

    async def until(self, wanted: Any) -> Event:
        while True:
            data = await self.stream.receive_some(65536)
            assert data, "connection closed"
            self.ws.receive_data(data)
            for event in self.ws.events():
                if wanted(event):
                    return event


async def test_a_reader_stalled_mid_frame_is_cut_off_without_a_broken_frame(
        worldhost: Any) -> None:
    h = await worldhost.start(listen=True, config={"host": {
        "admin_token": "adm", "limits": {"max_lag_s": 0.5, "socket_send_buffer": 65536}}})
    nodes = [{"id": f"n{i}", "x": i, "y": 0, "building": None} for i in range(60_000)]
    async with h.client("root", token="adm") as root:
        await root.call("map.import", map_data={"nodes": nodes, "edges": []})
        await root.call("simulation.start", tick_hz=50)  # a signal to every session per tick
        client = await RawClient.connect(h.host.port)
        await client.send({"id": 1, "action": "session.open", "params": {"name": "stalls"}})
        await client.until(lambda e: isinstance(e, TextMessage) and '"re":1' in e.data)
        await client.send({"id": 2, "action": "world.snapshot"})  # some 5 MB
        received = [await client.stream.receive_some(65536)]
        await trio.sleep(2)  # stop reading, mid-frame: ticks queue up behind the snapshot
        with trio.fail_after(10):
            while data := await client.stream.receive_some(65536):
                received.append(data)  # what was sent before the host gave up, then EOF
        client.ws.receive_data(b"".join(received))
        client.ws.receive_data(None)
        events = list(client.ws.events())
        # a frame cut short is not followed by anything: no close frame read as its payload
        # (1007, invalid UTF-8), no protocol error (1002)
        closes = [e.code for e in events if isinstance(e, CloseConnection)]
        assert not set(closes) & {1002, 1007}, closes
        assert closes in ([], [1006]), closes  # dropped: the frame never completed
        assert not any(isinstance(e, TextMessage) and '"re":2' in e.data and e.message_finished
                       for e in events)
        assert await root.call("host.ping", n=1) == {"n": 1}  # the host carries on


async def test_signals_written_at_once_keep_their_order_when_the_socket_fills(
        worldhost: Any) -> None:
    """A signal to an idle socket is written from the turn that made it (no task in
    between); what the socket does not take waits and goes first with the next
    write. A reader that pauses while its socket fills still gets every frame,
    whole, in seq order."""
    h = await worldhost.start(listen=True, config={"host": {"limits": {
        "max_lag_s": 60.0, "socket_send_buffer": 4096, "outbox_size": 4096,
        "rate_per_s": 100000, "rate_burst": 100000}}})
    slow = await RawClient.connect(h.host.port)
    await slow.send({"id": 1, "action": "session.open", "params": {"name": "pauses"}})
    await slow.until(lambda e: isinstance(e, TextMessage) and '"re":1' in e.data)
    texts = [f"{i:04d} " + "x" * 400 for i in range(300)]  # some 130 KB, past both buffers
    async with h.client("talker") as talker:
        for text in texts:
            await talker.call("chat.say", text=text)
    said: list[str] = []
    seqs: list[int] = []
    part = ""  # wsproto hands a message over as its bytes arrive
    with trio.fail_after(20):
        while len(said) < len(texts):
            data = await slow.stream.receive_some(65536)
            assert data, "connection closed"
            slow.ws.receive_data(data)
            for event in slow.ws.events():
                if isinstance(event, TextMessage):
                    part += event.data
                    if not event.message_finished:
                        continue
                    signal, part = json.loads(part), ""  # a torn frame would not parse
                    seqs.append(signal["seq"])
                    if signal["signal"] == "chat.message":
                        said.append(signal["data"]["text"])
    assert said == texts
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))
