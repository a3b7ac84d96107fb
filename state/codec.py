"""Encoding of plain data: canonical CBOR for storage, hardened decoding for the wire.

Plain data is what the protocol calls JSON-compatible: dicts with string keys,
lists, strings, finite numbers, booleans and None. Everything that crosses the
wire or reaches the store is checked to be exactly that.
"""

from __future__ import annotations

import math
from typing import Any

import cbor2
import msgspec

MAX_DEPTH = 64


class DecodeError(ValueError):
    """A frame or stored value is not plain data; the message says why."""


class _NoTags(dict):
    """A semantic-decoder table that refuses every CBOR tag, known or not."""

    def __missing__(self, tag: int) -> Any:
        return _refuse_tag

    def __contains__(self, tag: object) -> bool:
        return True

    def get(self, tag: Any, default: Any = None) -> Any:
        return _refuse_tag


def _refuse_tag(decoder: Any) -> Any:
    raise cbor2.CBORDecodeError("CBOR tags are not allowed")


def _refuse_unknown_tag(*args: Any) -> Any:
    # cbor2 has passed (decoder, tag) and (tag, immutable) in different versions
    tag = next((a for a in args if isinstance(a, cbor2.CBORTag)), None)
    raise cbor2.CBORDecodeError(f"CBOR tag {tag.tag if tag else '?'} is not allowed")


_NO_TAGS = _NoTags()
_json_decoder = msgspec.json.Decoder()
_json_encoder = msgspec.json.Encoder()


def check_plain(value: Any, max_depth: int = MAX_DEPTH) -> None:
    """Raise DecodeError unless value is plain JSON-compatible data."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        kind = type(item)
        if kind is str or kind is bool or item is None:
            continue
        if kind is int:
            continue
        if kind is float:
            if not math.isfinite(item):
                raise DecodeError("numbers must be finite (NaN and Infinity are not allowed)")
            continue
        if depth > max_depth:
            raise DecodeError(f"nesting deeper than {max_depth} levels")
        if kind is dict:
            for key, sub in item.items():
                if type(key) is not str:
                    raise DecodeError(f"map keys must be strings, got {type(key).__name__}")
                stack.append((sub, depth + 1))
        elif kind is list:
            stack.extend((sub, depth + 1) for sub in item)
        else:
            raise DecodeError(f"{kind.__name__} values are not allowed")


def decode_cbor(data: bytes, max_depth: int = MAX_DEPTH, plain: bool = True) -> Any:
    """Decode one untrusted CBOR item: no tags, no indefinite lengths, no duplicate keys.

    ``plain=False`` skips the plain-data walk (the caller checks what it allows).
    """
    try:
        value = cbor2.loads(
            data,
            max_depth=max_depth,
            allow_indefinite=False,
            allow_duplicate_keys=False,
            semantic_decoders=_NO_TAGS,
            tag_hook=_refuse_unknown_tag,
            strict_hashable_types=True,
        )
    except (cbor2.CBORError, ValueError, OverflowError, MemoryError, RecursionError, TypeError) as exc:
        raise DecodeError(f"invalid CBOR: {exc}") from None
    if plain:
        check_plain(value, max_depth)
    return value


def decode_json(text: str | bytes) -> Any:
    """Decode one untrusted JSON document: strict syntax, no NaN or Infinity.

    msgspec only builds plain values, so no walk is needed; its recursion guard
    turns absurd nesting into an error instead of a crash.
    """
    try:
        return _json_decoder.decode(text)
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError, ValueError) as exc:
        raise DecodeError(f"invalid JSON: {exc}") from None


def encode_json(value: Any) -> bytes:
    return _json_encoder.encode(value)


def encode_cbor(value: Any) -> bytes:
    return cbor2.dumps(value)


def canonical(value: Any) -> bytes:
    """Canonical CBOR (RFC 8949 core deterministic encoding): equal data, equal bytes."""
    return cbor2.dumps(value, canonical=True)


def load_stored(data: bytes) -> Any:
    """Decode a value this program stored; trusted, so only the depth is bounded."""
    return cbor2.loads(data, max_depth=10_000)


def clone(value: Any) -> Any:
    """A deep copy of plain data, much faster than copy.deepcopy."""
    kind = type(value)
    if kind is dict:
        return {k: clone(v) for k, v in value.items()}
    if kind is list:
        return [clone(v) for v in value]
    return value
