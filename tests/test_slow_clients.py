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
