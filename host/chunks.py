"""Chunked transfer: frames larger than the frame limit travel as numbered pieces.

Either side may split one encoded frame (JSON text or CBOR bytes) into pieces
and send each in a small frame of its own; the other side joins the pieces and
handles the result as if it had arrived whole. Host to client a piece is the
signal ``chunk``; client to host it is the envelope ``{"chunk": {...}}``.
See docs/protocol.md ("Chunked transfer").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from host.actions import BadRequest
from host.framing import echoable
from state.codec import encode_cbor, encode_json

PIECE = 1 << 20  # characters of JSON text or bytes of CBOR per piece


def split(frame: str | bytes, transfer: str, piece: int = PIECE,
          as_request: bool = False) -> list[str | bytes]:
    """The frames that carry ``frame`` in pieces."""
    pieces = [frame[i:i + piece] for i in range(0, len(frame), piece)] or [frame[:0]]
    out: list[str | bytes] = []
    for index, payload in enumerate(pieces):
        chunk = {"transfer": transfer, "index": index, "count": len(pieces), "payload": payload}
        envelope = {"chunk": chunk} if as_request else {"signal": "chunk", "data": chunk}
        out.append(encode_json(envelope).decode() if isinstance(frame, str)
                   else encode_cbor(envelope))
    return out


def size_of(payload: str | bytes) -> int:
    """Bytes on the wire: UTF-8 for text (a character may take up to four)."""
    if isinstance(payload, bytes) or payload.isascii():
        return len(payload)
    return len(payload.encode("utf-8", "surrogatepass"))


@dataclass
class Held:
    """The bytes every connection's unfinished transfers hold together, against the
    host's bound (``max_all_transfer_bytes``): one bound per connection would let a
    hundred sessions hold a hundred times it."""

    limit: int | None = None
    bytes: int = 0


class Reassembler:
    """Joins the pieces of transfers on one connection, within a size budget.

    ``max_bytes`` bounds one transfer, ``max_open_bytes`` all the connection's
    unfinished transfers together (what it holds in memory), and a transfer not
    finished ``timeout_s`` after its first piece is dropped (``expire``).
    """

    def __init__(self, max_bytes: int, max_transfers: int = 4, max_open_bytes: int | None = None,
                 timeout_s: float | None = None, max_id_bytes: int = 128,
                 held: Held | None = None) -> None:
        self.max_bytes = max_bytes
        self.held = held if held is not None else Held()  # shared with the other connections
        self.max_id_bytes = max_id_bytes  # of a transfer id, as of a request id
        self.max_transfers = max_transfers
        self.max_open_bytes = max_open_bytes
        self.timeout_s = timeout_s
        # id -> (count, pieces, size, deadline)
        self.transfers: dict[Any, tuple[int, list[Any], int, float]] = {}
        self.open_bytes = 0

    def drop(self, transfer: Any) -> None:
        entry = self.transfers.pop(transfer, None)
        if entry is not None:
            self.open_bytes -= entry[2]
            self.held.bytes -= entry[2]

    def clear(self) -> int:
        """Drop every unfinished transfer (the connection is gone); the bytes they held."""
        held, self.open_bytes = self.open_bytes, 0
        self.held.bytes -= held
        self.transfers.clear()
        return held

    def next_deadline(self) -> float:
        """When the oldest unfinished transfer runs out of time (inf if none can)."""
        return min((entry[3] for entry in self.transfers.values()), default=float("inf"))

    def expire(self, now: float) -> list[Any]:
        """Drop the transfers past their deadline; their ids."""
        late = [t for t, entry in self.transfers.items() if entry[3] <= now]
        for transfer in late:
            self.drop(transfer)
        return late

    def add(self, chunk: Any, text: bool, now: float = 0.0) -> str | bytes | None:
        """Take one piece; the whole frame once its last piece arrived, else None."""
        if not isinstance(chunk, dict) or set(chunk) != {"transfer", "index", "count", "payload"}:
            raise BadRequest("a chunk has exactly transfer, index, count and payload")
        transfer, index, count, payload = (chunk["transfer"], chunk["index"], chunk["count"],
                                           chunk["payload"])
        if not isinstance(transfer, (str, int)) or isinstance(transfer, bool):
            raise BadRequest("chunk transfer must be a string or an integer")
        if not echoable(transfer, self.max_id_bytes):  # held, and named in errors
            raise BadRequest(f"chunk transfer is longer than max_id_bytes "
                             f"({self.max_id_bytes} bytes)")
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (index, count)) \
                or count < 1 or not 0 <= index < count:
            raise BadRequest("chunk index and count must be whole numbers, 0 <= index < count")
        if not isinstance(payload, str if text else bytes):
            raise BadRequest("a chunk's payload is text in a text frame, bytes in a binary one")
        if transfer not in self.transfers:
            if index != 0:
                raise BadRequest(f"transfer {transfer!r} must start with piece 0")
            if len(self.transfers) >= self.max_transfers:
                raise BadRequest(f"at most {self.max_transfers} transfers at once")
            deadline = now + self.timeout_s if self.timeout_s is not None else float("inf")
            self.transfers[transfer] = (count, [], 0, deadline)
        expected_count, pieces, size, deadline = self.transfers[transfer]
        if count != expected_count or index != len(pieces):
            self.drop(transfer)
            raise BadRequest(f"transfer {transfer!r}: expected piece {len(pieces)} of "
                             f"{expected_count}, got {index} of {count}; transfer dropped")
        added = size_of(payload)
        if size + added > self.max_bytes:
            self.drop(transfer)
            raise BadRequest(f"transfer {transfer!r} is over {self.max_bytes} bytes "
                             f"(host.limits.max_transfer_bytes); dropped")
        if self.max_open_bytes is not None and self.open_bytes + added > self.max_open_bytes:
            self.drop(transfer)
            raise BadRequest(f"transfer {transfer!r} dropped: unfinished transfers would hold "
                             f"over {self.max_open_bytes} bytes "
                             f"(host.limits.max_open_transfer_bytes)")
        limit = self.held.limit
        if limit is not None and self.held.bytes + added > limit:
            self.drop(transfer)
            raise BadRequest(f"transfer {transfer!r} dropped: the host's unfinished transfers "
                             f"would hold over {limit} bytes "
                             f"(host.limits.max_all_transfer_bytes); try again later")
        pieces.append(payload)
        self.open_bytes += added
        self.held.bytes += added
        self.transfers[transfer] = (count, pieces, size + added, deadline)
        if len(pieces) < count:
            return None
        self.drop(transfer)
        return ("" if text else b"").join(pieces)
