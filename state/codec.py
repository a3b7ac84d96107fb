"""Encoding of plain data: canonical CBOR for storage, hardened decoding for the wire.

Plain data is what the protocol calls JSON-compatible: dicts with string keys,
lists, strings, finite numbers, booleans and None. Everything that crosses the
wire or reaches the store is checked to be exactly that.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

import cbor2
import msgspec

MAX_DEPTH = 64
INT_MIN, INT_MAX = -(2**63), 2**63 - 1  # integers are signed 64-bit: every client decodes them
LENIENT_BYTES = 64 * 1024  # the most a refused JSON frame may hold for its id to be recovered
_LONG_DIGITS = re.compile(r"[0-9]{19}")  # |n| < 10**18 cannot be out of range: shorter runs are
_LONG_DIGITS_B = re.compile(rb"[0-9]{19}")


class DecodeError(ValueError):
    """A frame or stored value is not plain data; the message says why."""


class TooManyItems(DecodeError):
    """A frame holds (or declares) more values than the caller's bound."""


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


def decode_cbor(data: bytes, max_depth: int = MAX_DEPTH, plain: bool = True,
                max_items: int | None = None) -> Any:
    """Decode one untrusted CBOR item: no tags, no indefinite lengths, no duplicate keys,
    nothing after it, integers within 64 bits.

    ``max_items`` bounds how many values the item may declare or hold (see
    ``scan_cbor``), checked before anything is built. ``plain=False`` allows byte
    strings (chunk payloads); with ``plain=False`` and no ``max_items`` the frame
    is trusted (the host's own signals, read by the client) and not scanned.
    """
    if plain or max_items is not None:
        scan_cbor(data, max_items, max_depth, allow_bytes=not plain)
    try:
        return cbor2.loads(
            data,
            max_depth=max_depth + 2,  # the scan above is what bounds the depth
            allow_indefinite=False,
            allow_duplicate_keys=False,
            semantic_decoders=_NO_TAGS,
            tag_hook=_refuse_unknown_tag,
            strict_hashable_types=True,
        )
    except (cbor2.CBORError, ValueError, OverflowError, MemoryError, RecursionError, TypeError) as exc:
        raise DecodeError(f"invalid CBOR: {exc}") from None


def scan_cbor(data: bytes, max_items: int | None = None, max_depth: int = MAX_DEPTH,
              allow_bytes: bool = False) -> int:
    """Check one CBOR item's structure without building it; return how many values it holds.

    Decoding allocates as the frame declares: ``0x9a`` + four bytes declares an
    array of four billion, and a million one-byte empty maps cost a hundred
    bytes each once built. This walks the headers only, so a frame is refused
    before anything is allocated if it declares (or holds) more than
    ``max_items`` values (every array element and map entry counts one, as does
    the item itself), declares a length its remaining bytes cannot hold, nests
    deeper than ``max_depth``, has bytes after its end, or holds anything but
    plain data: tags, indefinite lengths, ``undefined`` and simple values,
    byte strings (unless ``allow_bytes``), non-string map keys, NaN and
    infinities, integers outside the signed 64-bit range.
    """
    end = len(data)
    limit = max_items if max_items is not None else end
    items = 1
    outer: list[tuple[int, bool]] = []  # (left, in_map) of the enclosing containers
    left = 1  # items still to come in the innermost container (a map has two per entry)
    in_map = False
    pos = 0
    while True:
        if pos >= end:
            raise DecodeError("invalid CBOR: truncated")
        head = data[pos]
        pos += 1
        if 0x60 <= head < 0x78:  # a short text string, the most common item by far
            pos += head - 0x60
        elif head < 0x18 or 0x20 <= head < 0x38 or 0xF4 <= head <= 0xF6:
            if in_map and not left & 1:
                raise DecodeError("map keys must be strings")
        else:
            if in_map and not left & 1 and head >> 5 != 3:
                raise DecodeError("map keys must be strings")
            major, info = head >> 5, head & 31
            if info < 24:
                arg = info
            elif info < 28:
                size = 1 << (info - 24)
                if pos + size > end:
                    raise DecodeError("invalid CBOR: truncated")
                arg = int.from_bytes(data[pos:pos + size], "big")
                pos += size
            elif info == 31:
                raise DecodeError("invalid CBOR: indefinite lengths are not allowed")
            else:
                raise DecodeError(f"invalid CBOR: reserved header byte 0x{head:02x}")
            if major <= 1:
                if arg > INT_MAX:
                    value = arg if major == 0 else -1 - arg
                    raise DecodeError(f"integer {value} is outside the signed 64-bit range")
            elif major <= 3:
                if major == 2 and not allow_bytes:
                    raise DecodeError("byte strings are not allowed")
                if arg > end - pos:
                    raise DecodeError(f"invalid CBOR: a string declares {arg} bytes, "
                                      f"only {end - pos} remain")
                pos += arg
            elif major <= 5:
                if (arg if major == 4 else 2 * arg) > end - pos:
                    raise DecodeError(f"invalid CBOR: {'a map' if major == 5 else 'an array'} "
                                      f"declares {arg} entries, the {end - pos} bytes left "
                                      f"cannot hold them")
                items += arg
                if items > limit:
                    raise TooManyItems(f"more than {limit} items in one frame")
                if arg:
                    if len(outer) >= max_depth:
                        raise DecodeError(f"nesting deeper than {max_depth} levels")
                    outer.append((left - 1, in_map))
                    left, in_map = (arg, False) if major == 4 else (2 * arg, True)
                    continue
            elif major == 6:
                if arg == 2 or arg == 3:
                    raise DecodeError("a bignum (CBOR tag 2 or 3): integers outside the signed "
                                      "64-bit range are not allowed")
                raise DecodeError("CBOR tags are not allowed")
            elif info < 25:
                raise DecodeError("CBOR simple values and undefined are not allowed")
            elif ((info == 25 and arg & 0x7C00 == 0x7C00)
                  or (info == 26 and arg & 0x7F800000 == 0x7F800000)
                  or (info == 27 and arg & 0x7FF0000000000000 == 0x7FF0000000000000)):
                raise DecodeError("numbers must be finite (NaN and Infinity are not allowed)")
        left -= 1
        while not left:
            if not outer:
                if pos != end:
                    raise DecodeError(f"invalid CBOR: {end - pos} bytes after the end of "
                                      f"the item")
                return items
            left, in_map = outer.pop()


def count_json_items(text: str | bytes) -> int:
    """An upper bound on the values a JSON document holds, counted without parsing it.

    Every value after the first follows a ``,`` or opens its container after a
    ``[`` or ``{``; commas and brackets inside strings count too, so this may
    overcount, never undercount.
    """
    if isinstance(text, str):
        return 1 + text.count(",") + text.count("[") + text.count("{")
    return 1 + text.count(b",") + text.count(b"[") + text.count(b"{")


def decode_json(text: str | bytes, max_items: int | None = None) -> Any:
    """Decode one untrusted JSON document: strict syntax, no NaN or Infinity, no
    duplicate keys, integers within 64 bits, at most ``max_items`` values
    (``count_json_items``, checked before parsing), nested at most ``MAX_DEPTH`` levels.

    msgspec only builds plain values and its recursion guard turns absurd nesting
    into an error instead of a crash; it keeps the last of duplicate keys, so the
    keys it kept are counted against the text's. Without ``max_items`` (a document
    the host wrote: signals read by the client) that count and the depth are skipped.
    """
    if max_items is not None and count_json_items(text) > max_items:
        raise TooManyItems(f"more than {max_items} items in one frame")
    try:
        value = _json_decoder.decode(text)
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError, ValueError) as exc:
        raise DecodeError(f"invalid JSON: {exc}") from None
    if type(value) is dict or type(value) is list:
        if max_items is not None:
            long_digits = True  # a walk of the values: a regex over the text holds the GIL
        elif isinstance(text, str):
            long_digits = _LONG_DIGITS.search(text) is not None
        else:
            long_digits = _LONG_DIGITS_B.search(text) is not None
        if max_items is not None or long_digits:
            kept = _walk_json(value, long_digits,
                              MAX_DEPTH if max_items is not None else None)
            # fewer keys kept than ':' in the text: a duplicate, or a ':' inside a string
            colons = text.count(":") if isinstance(text, str) else text.count(b":")
            if max_items is not None and kept != colons:
                _find_duplicate_key(text)
    elif type(value) is int and not INT_MIN <= value <= INT_MAX:
        raise DecodeError(f"integer {value} is outside the signed 64-bit range")
    return value


def _walk_json(value: Any, check_ints: bool, max_depth: int | None) -> int:
    """How many keys the decoded objects kept; checks the nesting against ``max_depth``
    if given (as the CBOR scan does: msgspec's own guard allows hundreds of levels,
    which a CBOR client could not read back) and, if asked, integer range on the way."""
    kept = 0
    stack = [(value, 1)]
    pop, push = stack.pop, stack.append
    while stack:
        item, depth = pop()
        if max_depth is not None and depth > max_depth and item:  # as the CBOR scan counts
            raise DecodeError(f"nesting deeper than {max_depth} levels")
        if type(item) is dict:
            kept += len(item)
            children: Any = item.values()
        else:
            children = item
        for sub in children:
            kind = type(sub)
            if kind is dict or kind is list:
                push((sub, depth + 1))
            elif check_ints and kind is int and not INT_MIN <= sub <= INT_MAX:
                raise DecodeError(f"integer {_short(sub)} is outside the signed 64-bit range")
    return kept


def _short(number: int) -> str:
    digits = str(number)
    return digits if len(digits) <= 40 else f"{digits[:20]}…({len(digits)} digits)"


def _refuse_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        key = next(k for k, _ in pairs if k in seen or seen.add(k))  # type: ignore[func-returns-value]
        raise DecodeError(f"duplicate key {key!r} in a JSON object")
    return obj


def _find_duplicate_key(text: str | bytes) -> None:
    """Raise DecodeError naming a duplicate key, if the (valid) document has one."""
    json.loads(text, object_pairs_hook=_refuse_duplicates)


def lenient_json(text: str | bytes, max_bytes: int = LENIENT_BYTES) -> Any:
    """What a forgiving parser reads in a refused JSON frame (NaN, Infinity, duplicate
    keys), so its reply can carry the request's id; None if it reads nothing.

    Only for frames up to ``max_bytes`` (which also bounds the values it builds);
    nothing read here is ever applied.
    """
    if len(text) > max_bytes:
        return None
    try:
        return json.loads(text)
    except (ValueError, RecursionError, TypeError):
        return None


def encode_json(value: Any) -> bytes:
    return _json_encoder.encode(value)


def encode_cbor(value: Any) -> bytes:
    return cbor2.dumps(value)


def encode_scalar(value: Any) -> bytes:
    """``encode_cbor`` of a string, an integer or None (a request id, a seq, a
    signal's name), byte for byte, written here: cbor2 builds an encoder and a
    buffer for each call, which in a busy server (cold caches) costs several times
    what these few bytes take. Any other value goes to ``encode_cbor``."""
    kind = type(value)
    if kind is str:
        data = value.encode("utf-8")
        return _head(0x60, len(data)) + data
    if kind is int:
        if 0 <= value < 1 << 64:
            return _head(0x00, value)
        if -(1 << 64) <= value < 0:
            return _head(0x20, -1 - value)
    elif value is None:
        return b"\xf6"
    return encode_cbor(value)


def encode_array(items: list[bytes]) -> bytes:
    """``encode_cbor`` of a list, byte for byte, from its items' own encodings: a
    list kept long and grown a little at a time is encoded an item at a time."""
    return _head(0x80, len(items)) + b"".join(items)


def _head(major: int, n: int) -> bytes:
    """A CBOR item's head: its major type and ``n``, in the fewest bytes."""
    if n < 24:
        return bytes((major | n,))
    if n < 0x100:
        return bytes((major | 24, n))
    if n < 0x10000:
        return bytes((major | 25,)) + n.to_bytes(2, "big")
    if n < 0x100000000:
        return bytes((major | 26,)) + n.to_bytes(4, "big")
    return bytes((major | 27,)) + n.to_bytes(8, "big")


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
