"""Framing shared by every transport: a signal's envelope out, a request's envelope in.

What a transport reads is checked here the same way whatever carried it (a
WebSocket frame, a line of TCP), so the envelope rules cannot drift apart.
"""

from __future__ import annotations

import re
from typing import Any

import trio

from host.actions import ActionError, BadRequest
from host.messages import Request, Signal
from state.codec import (
    INT_MAX,
    INT_MIN,
    DecodeError,
    TooManyItems,
    decode_cbor,
    decode_json,
    encode_cbor,
    encode_json,
    encode_scalar,
    lenient_json,
)

_ENVELOPE_KEYS = frozenset({"id", "action", "params"})
MAX_ACTION_NAME = 128
JSON_CHUNK = re.compile(r'\s*\{\s*"chunk"\s*:')
CBOR_CHUNK = b"\xa1\x65chunk"  # a map of one entry whose key is "chunk"
# Frames above this are decoded in a worker thread, one at a time across the host: the
# checks that walk them are Python, so the event loop keeps its turns meanwhile, and
# however many connections send big frames, one big decode holds memory at a time.
THREAD_BYTES = 256 * 1024
BIG_DECODES = trio.CapacityLimiter(1)


def item_budget(limits: Any, role: str | None) -> tuple[int, str]:
    """How many values a frame may decode to, and the setting that says so: only an
    admin sends frames of millions of values (imports); anyone else is held to a
    bound whose decode cannot stall the loop for long."""
    if role == "admin":
        return limits.max_frame_items, "max_frame_items"
    return limits.max_player_frame_items, "max_player_frame_items"


async def decode_frame(message: str | bytes, budget: tuple[int, str], *, threads: bool,
                       plain: bool = True, encoding: str | None = None) -> Any:
    """A frame decoded within ``budget``: JSON (text, or ``encoding`` "json" for the
    bytes of an HTTP body) or CBOR; a big one in a worker thread where threads are
    allowed. Raises DecodeError naming the limit."""
    if not in_thread(message, threads):
        return decode_now(message, budget, plain, encoding)
    json = encoding == "json" if encoding is not None else isinstance(message, str)
    return await trio.to_thread.run_sync(_decode, message, json, plain, *budget,
                                         limiter=BIG_DECODES)


def in_thread(message: str | bytes, threads: bool) -> bool:
    """Whether ``decode_frame`` decodes this frame in a worker thread."""
    return threads and len(message) > THREAD_BYTES


def decode_now(message: str | bytes, budget: tuple[int, str], plain: bool = True,
               encoding: str | None = None) -> Any:
    """``decode_frame`` here and now, whatever the size: for a frame known to be small
    (the hot path, which awaits nothing) or where threads are not allowed."""
    json = encoding == "json" if encoding is not None else isinstance(message, str)
    return _decode(message, json, plain, *budget)


def _decode(message: str | bytes, json: bool, plain: bool, max_items: int, key: str) -> Any:
    try:
        if json:
            return decode_json(message, max_items=max_items)
        return decode_cbor(message, plain=plain, max_items=max_items)  # type: ignore[arg-type]
    except TooManyItems as exc:
        raise DecodeError(f"{exc} (host.limits.{key})") from None


def encode_frame(sig: Signal, encoding: str) -> str | bytes:
    """The frame for one signal. ``data`` is encoded once per encoding and spliced
    into each session's envelope, so a broadcast is not re-encoded per client."""
    cache = sig.encoded if sig.encoded is not None else {}
    if encoding == "cbor":
        data: bytes | None = cache.get("cbor")
        if data is None:
            data = cache["cbor"] = encode_cbor(sig.data)
        parts = [b"\x66signal", encode_scalar(sig.signal)]
        if sig.has_re:
            parts += [b"\x62re", encode_scalar(sig.re)]
        if sig.seq is not None:
            parts += [b"\x63seq", encode_scalar(sig.seq)]
        parts += [b"\x64data", data]
        return bytes([0xA0 + len(parts) // 2]) + b"".join(parts)
    text: str | None = cache.get("json")
    if text is None:  # kept as text: a broadcast's data is decoded once, not per client
        text = cache["json"] = encode_json(sig.data).decode("utf-8")
    head = _HEADS.get(sig.signal)
    if head is None:
        head = '{"signal":' + encode_json(sig.signal).decode("utf-8")
        if len(_HEADS) < 10_000:  # names are the plugins': few
            _HEADS[sig.signal] = head
    if sig.has_re:
        re = sig.re
        head += ',"re":' + (str(re) if type(re) is int else encode_json(re).decode("utf-8"))
    if sig.seq is not None:
        head += ',"seq":' + str(sig.seq)
    return head + ',"data":' + text + "}"


_HEADS: dict[str, str] = {}  # a signal's name -> the start of its JSON envelope


def is_id(value: Any) -> bool:
    return isinstance(value, (str, int)) and not isinstance(value, bool)


def parse_envelope(message: Any) -> tuple[Any, bool]:
    """The request id (and whether one was given) if it can be told, for the reply."""
    if isinstance(message, dict) and "id" in message:
        rid = message["id"]
        return (rid if is_id(rid) else None), True
    return None, False


def check_envelope(message: Any) -> tuple[str, dict[str, Any]]:
    if not isinstance(message, dict):
        raise ActionError(f"a frame must hold one object, not {type(message).__name__}",
                          code="bad_frame")
    extra = set(message) - _ENVELOPE_KEYS
    if extra:
        raise BadRequest(f"unknown envelope fields: {sorted(extra)}; "
                         f"a request has only id, action and params")
    if "id" in message and not is_id(message["id"]):
        raise BadRequest("id must be a string or an integer")
    action = message.get("action")
    if not isinstance(action, str) or not action:
        raise BadRequest("action is required and must be a non-empty string")
    if len(action) > MAX_ACTION_NAME:  # an unknown name is echoed in its error
        raise BadRequest(f"action names are at most {MAX_ACTION_NAME} characters")
    params = message.get("params", {})
    if not isinstance(params, dict):
        raise BadRequest(f"params must be an object, not {type(params).__name__}")
    return action, params


def request_of(decoded: Any, conn: Any, encoding: str) -> Request:
    """The request a decoded frame (or line, or HTTP body) holds; a bad envelope is a
    request carrying its error, answered with the id and (if short) the name it had."""
    rid, has_id = parse_envelope(decoded)
    try:
        action, params = check_envelope(decoded)
    except ActionError as exc:
        named = decoded.get("action") if isinstance(decoded, dict) else None
        if not isinstance(named, str) or len(named) > MAX_ACTION_NAME:
            named = ""
        return Request(named, None, rid, True, conn, encoding, error=exc)
    return Request(action, params, rid, has_id, conn, encoding)


def undecodable(text: str | bytes | None, exc: Exception, conn: Any, encoding: str,
                max_id_bytes: int) -> Request:
    """The request of a frame that would not decode: a ``bad_frame`` error. A JSON
    frame a lenient parser reads (NaN, Infinity, a duplicate key) has its id
    answered, so a client matching replies by id is not left waiting, if it is an
    id the host would take (else ``re`` is null). It is not remembered as that
    id's reply: the id may be sent again, fixed."""
    rid = parse_envelope(lenient_json(text))[0] if text is not None else None
    if rid is not None and not echoable(rid, max_id_bytes):
        rid = None
    return Request("", None, rid, rid is None, conn, encoding,
                   error=ActionError(str(exc), code="bad_frame"))


def echoable(rid: Any, max_id_bytes: int) -> bool:
    """Whether an id is one a reply may carry as ``re``: a string of at most
    ``max_id_bytes`` bytes, or a signed 64-bit integer (every client decodes one)."""
    if type(rid) is int:
        return INT_MIN <= rid <= INT_MAX
    return type(rid) is str and len(rid.encode("utf-8", "surrogatepass")) <= max_id_bytes
