"""Chunked transfer: frames larger than the frame limit travel as numbered pieces.

Either side may split one encoded frame (JSON text or CBOR bytes) into pieces
and send each in a small frame of its own; the other side joins the pieces and
handles the result as if it had arrived whole. Host to client a piece is the
signal ``chunk``; client to host it is the envelope ``{"chunk": {...}}``.
See docs/protocol.md ("Chunked transfer").
"""

from __future__ import annotations

from typing import Any

from host.actions import BadRequest
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


class Reassembler:
    """Joins the pieces of transfers on one connection, within a size budget."""

    def __init__(self, max_bytes: int, max_transfers: int = 4) -> None:
        self.max_bytes = max_bytes
        self.max_transfers = max_transfers
        self.transfers: dict[Any, tuple[int, list[Any], int]] = {}  # id -> (count, pieces, size)

    def add(self, chunk: Any, text: bool) -> str | bytes | None:
        """Take one piece; the whole frame once its last piece arrived, else None."""
        if not isinstance(chunk, dict) or set(chunk) != {"transfer", "index", "count", "payload"}:
            raise BadRequest("a chunk has exactly transfer, index, count and payload")
        transfer, index, count, payload = (chunk["transfer"], chunk["index"], chunk["count"],
                                           chunk["payload"])
        if not isinstance(transfer, (str, int)) or isinstance(transfer, bool):
            raise BadRequest("chunk transfer must be a string or an integer")
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (index, count)) \
                or count < 1 or not 0 <= index < count:
            raise BadRequest("chunk index and count must be whole numbers, 0 <= index < count")
        if not isinstance(payload, str if text else bytes):
            raise BadRequest("a chunk's payload is text in a text frame, bytes in a binary one")
        if transfer not in self.transfers:
            if index != 0:
                self.transfers.pop(transfer, None)
                raise BadRequest(f"transfer {transfer!r} must start with piece 0")
            if len(self.transfers) >= self.max_transfers:
                raise BadRequest(f"at most {self.max_transfers} transfers at once")
            self.transfers[transfer] = (count, [], 0)
        expected_count, pieces, size = self.transfers[transfer]
        if count != expected_count or index != len(pieces):
            del self.transfers[transfer]
            raise BadRequest(f"transfer {transfer!r}: expected piece {len(pieces)} of "
                             f"{expected_count}, got {index} of {count}; transfer dropped")
        size += len(payload)
        if size > self.max_bytes:
            del self.transfers[transfer]
            raise BadRequest(f"transfer {transfer!r} is over {self.max_bytes} bytes; dropped")
        pieces.append(payload)
        if len(pieces) < count:
            self.transfers[transfer] = (count, pieces, size)
            return None
        del self.transfers[transfer]
        return ("" if text else b"").join(pieces)
