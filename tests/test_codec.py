"""Hardened decoding of untrusted frames, and the canonical encoding of stored data."""

from __future__ import annotations

import math

import cbor2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from state.codec import (
    DecodeError,
    canonical,
    check_plain,
    clone,
    decode_cbor,
    decode_json,
    encode_scalar,
)

plain = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner, max_size=5),
    max_leaves=30,
)


@given(st.binary(max_size=200))
@settings(max_examples=500)
def test_random_bytes_never_crash_the_cbor_decoder(data: bytes) -> None:
    try:
        check_plain(decode_cbor(data))
    except DecodeError:
        pass


@given(st.text(max_size=200))
@settings(max_examples=500)
def test_random_text_never_crashes_the_json_decoder(text: str) -> None:
    try:
        decode_json(text)
    except DecodeError:
        pass


@given(plain)
def test_plain_data_round_trips_through_both_codecs(value: object) -> None:
    assert decode_cbor(cbor2.dumps(value)) == value
    assert clone(value) == value
    assert canonical(value) == canonical(clone(value))


def test_canonical_encoding_ignores_key_order() -> None:
    assert canonical({"a": 1, "b": [1, {"y": 2, "x": 1}]}) == \
        canonical({"b": [1, {"x": 1, "y": 2}], "a": 1})


@pytest.mark.parametrize("value", [float("nan"), float("inf"), b"bytes", {1: "int key"},
                                   {"s": {1, 2}}, cbor2.undefined])
def test_check_plain_refuses_what_json_cannot_carry(value: object) -> None:
    with pytest.raises(DecodeError):
        check_plain(value)


def test_depth_is_bounded() -> None:
    deep: object = 1
    for _ in range(100):
        deep = [deep]
    with pytest.raises(DecodeError):
        decode_cbor(cbor2.dumps(deep))
    assert not math.isnan(decode_cbor(cbor2.dumps(1.5)))


scalars = (st.none() | st.text() | st.integers(-(2**64), 2**64 - 1)
           | st.sampled_from([0, 23, 24, 255, 256, 65535, 65536, 2**32 - 1, 2**32, 2**64 - 1,
                              -1, -24, -25, -256, -257, -(2**64), 2**64, -(2**64) - 1])
           | st.text(min_size=20, max_size=70000).filter(lambda t: len(t.encode()) > 23))


@given(scalars | st.booleans() | st.floats(allow_nan=False) | st.binary(max_size=30))
@settings(max_examples=1000)
def test_a_scalar_is_encoded_as_cbor2_encodes_it(value: object) -> None:
    assert encode_scalar(value) == cbor2.dumps(value)
