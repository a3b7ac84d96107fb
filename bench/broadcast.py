"""A bare trio-websocket broadcaster in its own process: the tick-delivery baseline.

    python bench/broadcast.py CLIENTS SECONDS FRAME_BYTES

Run by bench/simulation.py; prints its port on the first line of stdout. Once
CLIENTS have connected it sends a frame of FRAME_BYTES to every client at 20 Hz
for SECONDS, each client through a queue and a sender task of its own (as the
host's outboxes do), so a slow client does not hold the others back. Each frame
ends with ``"at": <time.time() when it was made>``.
"""

from __future__ import annotations

import json
import math
import sys
import time

import trio
from trio_websocket import serve_websocket


async def main(clients: int, seconds: float, frame_bytes: int) -> None:
    queues: list[trio.MemorySendChannel[str]] = []
    filler = "x" * max(0, frame_bytes - 80)
    connected = trio.Event()

    async def handler(request) -> None:  # type: ignore[no-untyped-def]
        ws = await request.accept()
        send, receive = trio.open_memory_channel[str](math.inf)
        queues.append(send)
        if len(queues) == clients:
            connected.set()
        async for frame in receive:
            await ws.send_message(frame)

    async with trio.open_nursery() as nursery:
        server = await nursery.start(lambda task_status: serve_websocket(
            handler, "127.0.0.1", 0, None, message_queue_size=64, task_status=task_status))
        print(server.port, flush=True)
        await connected.wait()
        next_at = trio.current_time()
        stop_at = next_at + seconds
        while next_at < stop_at:
            frame = json.dumps({"signal": "simulation.ticked", "seq": 1,
                                "data": {"pad": filler, "at": time.time()}})
            for queue in queues:
                queue.send_nowait(frame)
            next_at += 0.05
            await trio.sleep_until(next_at)
        await trio.sleep(2.0)  # let the last frames go out
        nursery.cancel_scope.cancel()


if __name__ == "__main__":
    trio.run(main, int(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3]))
