"""A bare echo server in its own process: the round-trip baseline.

Run by bench/roundtrip.py; prints its port on the first line of stdout. By
default a trio-websocket server that answers each message with itself (the
same library as the host's default transport); with ``--websockets`` the same on
the ``websockets`` library's trio server (the host's other one); with ``--tcp`` a
trio TCP server that answers each newline-terminated line with itself, no
WebSocket at all (the floor for the host's TCP line transport).
"""

from __future__ import annotations

import sys

import trio

from common import echo_server, line_echo_server, websockets_echo_server


async def main() -> None:
    async with trio.open_nursery() as nursery:
        flags = sys.argv[1:]
        serve = line_echo_server if "--tcp" in flags else \
            websockets_echo_server if "--websockets" in flags else echo_server
        server = await nursery.start(serve)
        print(server.port, flush=True)


if __name__ == "__main__":
    trio.run(main)
