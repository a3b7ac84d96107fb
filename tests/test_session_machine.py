"""The session state machine, on its own."""

from __future__ import annotations

import itertools
from collections import OrderedDict
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from host.sessions import (
    Session,
    Signal,
    State,
    StateMachine,
    TransitionError,
    hash_matches,
    new_token,
    token_hash,
)
from state.codec import encode_cbor, load_stored

ALLOWED = {
    (State.NONE, State.OPEN),
    (State.OPEN, State.DISCONNECTED),
    (State.OPEN, State.CLOSED),
    (State.DISCONNECTED, State.OPEN),
    (State.DISCONNECTED, State.CLOSED),
}


@pytest.mark.parametrize("start, target", list(itertools.product(State, State)))
def test_every_transition_is_allowed_or_refused(start: State, target: State) -> None:
    machine = StateMachine(start)
    if (start, target) in ALLOWED:
        machine.move(target)
        assert machine.state is target
    else:
        with pytest.raises(TransitionError):
            machine.move(target)
        assert machine.state is start


def test_closed_is_final() -> None:
    machine = StateMachine(State.OPEN)
    machine.move(State.CLOSED)
    assert not any(machine.can(s) for s in State)


class Sink:
    def __init__(self, room: int) -> None:
        self.room = room
        self.got: list[Signal] = []

    def deliver(self, sig: Signal) -> bool:
        if len(self.got) >= self.room:
            return False
        self.got.append(sig)
        return True


def test_seq_counts_every_signal_and_replay_is_bounded() -> None:
    s = Session("s1", "ada", "player", buffer_size=3)
    s.outbox = Sink(100)
    for i in range(5):
        s.deliver(Signal("x", {"i": i}))
    assert [sig.seq for sig in s.outbox.got] == [1, 2, 3, 4, 5]
    held, complete = s.missed(3)
    assert [sig.seq for sig in held] == [4, 5] and complete
    held, complete = s.missed(0)
    assert [sig.seq for sig in held] == [3, 4, 5] and not complete
    held, complete = s.missed(5)
    assert held == [] and complete


def test_a_full_outbox_detaches_the_session_but_keeps_its_signals() -> None:
    s = Session("s1", "ada", "player")
    s.outbox = Sink(1)
    s.deliver(Signal("a", {}))
    s.deliver(Signal("b", {}))
    assert s.outbox is None and s.next_seq == 3 and len(s.buffer) == 2


def test_remembered_replies_are_bounded_and_typed() -> None:
    s = Session("s1", "ada", "player", replies_size=2)
    s.remember(1, "a", {})
    s.remember("1", "b", {})
    assert s.recall(1) == ("a", {}) and s.recall("1") == ("b", {})
    s.remember(2, "c", {})
    assert s.recall(1) is None


_ids = st.one_of(st.integers(-(1 << 70), 1 << 70), st.text(max_size=8))
_data = st.dictionaries(st.text(max_size=4), st.one_of(st.integers(), st.text(), st.none(),
                                                       st.floats(allow_nan=False)), max_size=3)
_steps = st.lists(st.one_of(
    st.tuples(st.just("remember"), _ids, st.text(max_size=6), _data, st.booleans()),
    st.tuples(st.just("deliver"), st.integers(0, 3)),
), max_size=40)


def _saved(s: Session, replies: list[list[Any]]) -> dict[str, Any]:
    """What a checkpoint keeps of a session: its counters and these replies."""
    return {"next_seq": s.next_seq, "last_active": s.last_active,
            "actions_applied": s.actions_applied, "signals_sent": s.signals_sent,
            "replies": replies}


def _durable(model: OrderedDict[tuple[str, Any], list[Any]]) -> list[list[Any]]:
    return [[kind, key, sig, data] for (kind, key), (sig, data, durable) in model.items()
            if durable]


@settings(max_examples=200, deadline=None)
@given(_steps, st.integers(1, 6))
def test_the_saved_runtime_is_its_encoding_however_the_replies_change(
        steps: list[tuple], size: int) -> None:
    """A checkpoint writes ``runtime_blob()``, which encodes each remembered reply once
    and keeps it: after any mix of remembering (new, repeated, trimmed by the bound)
    and sending, each save is, byte for byte, the encoding of the session's counters
    and of the replies to world-changing actions it still remembers (a model: the
    newest ``size`` ids, a repeated id counting as new), and reads back as them."""
    s = Session("s1", "ada", "player", replies_size=size)
    s.outbox = Sink(1000)
    model: OrderedDict[tuple[str, Any], list[Any]] = OrderedDict()
    for step in steps:
        if step[0] == "remember":
            _, request_id, signal, data, durable = step
            key = (type(request_id).__name__, request_id)
            model.pop(key, None)
            model[key] = [signal, data, durable]
            while len(model) > size:
                model.popitem(last=False)
            s.remember(request_id, signal, data, durable=durable)
        elif step[0] == "deliver":
            for _ in range(step[1]):
                s.deliver(Signal("x", {}))
        assert s.runtime_blob() == encode_cbor(_saved(s, _durable(model)))
    restored = Session("s2", "ada", "player", replies_size=size)
    restored.restore_runtime(load_stored(s.runtime_blob()))
    assert restored.runtime_blob() == encode_cbor(_saved(restored, _durable(model)))


def test_tokens_are_hashed_and_compared_safely() -> None:
    token = new_token()
    assert len(token) >= 43 and token != new_token()
    assert hash_matches(token, token_hash(token))
    assert not hash_matches(token + "x", token_hash(token))
