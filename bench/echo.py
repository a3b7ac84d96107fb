"""A bare trio-websocket echo server in its own process: the round-trip baseline.

Run by bench/roundtrip.py; prints its port on the first line of stdout.
"""

from __future__ import annotations

import trio

from common import echo_server


async def main() -> None:
    async with trio.open_nursery() as nursery:
        server = await nursery.start(echo_server)
        print(server.port, flush=True)


if __name__ == "__main__":
    trio.run(main)
