"""The host's side of chunked transfers: what unfinished transfers hold, per
connection and in the whole host, is counted exactly and given back."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from host.actions import BadRequest
from host.chunks import Held, Reassembler


def piece(transfer: str, index: int, count: int, payload: str) -> dict[str, Any]:
    return {"transfer": transfer, "index": index, "count": count, "payload": payload}


def test_a_finished_transfer_gives_back_every_byte_it_held() -> None:
    """The last piece too: one connection can finish any number of transfers (each
    finished one used to keep its last piece counted, until none fit)."""
    held = Held(limit=100)
    r = Reassembler(1000, max_open_bytes=100, held=held)
    for t in range(20):
        assert r.add(piece(f"t{t}", 0, 2, "x" * 30), True) is None
        assert r.add(piece(f"t{t}", 1, 2, "y" * 30), True) == "x" * 30 + "y" * 30
        assert r.open_bytes == 0 and held.bytes == 0


def test_every_connection_together_stays_under_the_hosts_bound() -> None:
    held = Held(limit=100)
    first, second = (Reassembler(1000, max_open_bytes=80, held=held) for _ in range(2))
    first.add(piece("a", 0, 3, "x" * 60), True)
    with pytest.raises(BadRequest) as refused:
        second.add(piece("b", 0, 3, "x" * 60), True)
    assert "max_all_transfer_bytes" in str(refused.value) and "'b'" in str(refused.value)
    assert "b" not in second.transfers and held.bytes == 60
    first.clear()  # the first connection went: what it held is free again
    assert held.bytes == 0
    assert second.add(piece("b", 0, 3, "x" * 60), True) is None and held.bytes == 60


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 1), st.sampled_from(["add", "drop", "expire", "clear"]),
                          st.sampled_from(["a", "b", "c"]), st.integers(0, 3),
                          st.integers(1, 3), st.integers(0, 50)), max_size=60))
def test_what_is_held_is_always_what_the_unfinished_transfers_hold(
        steps: list[tuple[int, str, str, int, int, int]]) -> None:
    held = Held(limit=150)
    conns = [Reassembler(120, max_open_bytes=100, timeout_s=1.0, held=held) for _ in range(2)]
    now = 0.0
    for who, what, transfer, index, count, size in steps:
        r = conns[who]
        now += 0.3
        if what == "add":
            try:
                r.add(piece(transfer, index, count, "z" * size), True, now)
            except BadRequest:
                pass
        elif what == "drop":
            r.drop(transfer)
        elif what == "expire":
            r.expire(now)
        else:
            r.clear()
        for c in conns:
            assert c.open_bytes == sum(entry[2] for entry in c.transfers.values())
            assert c.open_bytes <= 100
        assert held.bytes == sum(c.open_bytes for c in conns) <= 150
