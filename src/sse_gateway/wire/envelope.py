"""Published-message envelopes: parsing and validation, pure over bytes."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, cast

import orjson

from sse_gateway.wire.frames import chunk, chunk_size_line, dump_json, encode_event

EVENT_TYPE_PATTERN = re.compile(r"[A-Za-z0-9_.:-]{1,64}")
EVENT_ID_PATTERN = re.compile(r"[A-Za-z0-9_.:-]{1,128}")
# Integers orjson parses exactly fit in 64 bits; a run of 20+ digits (or -19) may not. Found by
# mapping digits and "-" to "0" and searching for 20 in a row: a third of the cost of a regex.
# A false alarm (a date like "-2024...") only takes the exact, slower path.
_DIGITS_AS_ZERO = bytes.maketrans(b"-123456789", b"0000000000")
_RUN_OF_20 = b"0" * 20
# Validated event types and their frame heads, so the hot path checks a type once, not per
# message. Bounded: publishers that invent types without end fall back to validating each.
_FRAME_HEADS: dict[str, bytes] = {}
MAX_CACHED_TYPES = 4096
RESERVED_TYPES = frozenset(
    {"connected", "heartbeat", "error", "close", "session_expired", "disconnected"}
)


class EnvelopeError(ValueError):
    """A published message the gateway drops; `reason` is the metric label."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


# A published message made ready for fan-out (`event_frame`): (frame, id, type, stamp); the
# stamp is the publisher's `ts`, Unix seconds when it was published (publish.lua stamps it).
# A bare tuple, not a NamedTuple: building one is a Python-level call per event on the Pub/Sub
# hot path (measured: +3,000 instructions per delivered event in bench/hotpath.py).
LiveFrame = tuple[bytes, str | None, str, float | None]


@dataclass(frozen=True, slots=True)
class Envelope:
    type: str
    data: Any
    id: str | None = None

    def encode(self) -> bytes:
        """The SSE frame for this event, the same bytes for every connection."""
        head = _FRAME_HEADS.get(self.type) or f"event: {self.type}\ndata: ".encode("ascii")
        return _encode_frame(head, self.type, self.data, self.id)


def _encode_frame(
    head: bytes, event_type: str, data: Any, event_id: str | None, chunked: bool = False
) -> bytes:
    """`head` is `event: <type>\\ndata: `; the frame adds the id line and the data's JSON.
    `chunked`: the frame as one HTTP/1.1 chunk (`frames.chunk`), built in the same step."""
    try:
        # Compact JSON never holds a raw line break, so it is one `data:` line as it is.
        body = orjson.dumps(data)
    except orjson.JSONEncodeError:  # e.g. an integer beyond 64 bits: the general path
        frame = encode_event(event_type, dump_json(data), event_id)
        return chunk(frame) if chunked else frame
    if event_id is None:
        if chunked:
            size = len(head) + len(body) + 2
            return b"".join((chunk_size_line(size), head, body, b"\n\n\r\n"))
        return head + body + b"\n\n"
    id_bytes = event_id.encode("ascii")
    if chunked:
        size = len(id_bytes) + len(head) + len(body) + 7  # "id: ", a line end, a blank line
        return b"".join((chunk_size_line(size), b"id: ", id_bytes, b"\n", head, body, b"\n\n\r\n"))
    return b"id: " + id_bytes + b"\n" + head + body + b"\n\n"


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def validate_event_type(value: object) -> str:
    if value is None:
        raise EnvelopeError("missing_type", "missing field 'type'")
    if not isinstance(value, str) or not EVENT_TYPE_PATTERN.fullmatch(value):
        raise EnvelopeError("bad_type", "'type' must match [A-Za-z0-9_.:-]{1,64}")
    if value in RESERVED_TYPES:
        raise EnvelopeError("reserved_type", f"'type' {value!r} is reserved by the gateway")
    return value


def validate_event_id(value: object) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not EVENT_ID_PATTERN.fullmatch(value):
        raise EnvelopeError("bad_id", "'id' must be a string matching [A-Za-z0-9_.:-]{1,128}")
    return value


def envelope_from_object(obj: object) -> Envelope:
    if not isinstance(obj, dict):
        raise EnvelopeError("not_object", "message is not a JSON object")
    event_type = validate_event_type(obj.get("type"))
    if "data" not in obj:
        raise EnvelopeError("missing_data", "missing field 'data'")
    return Envelope(type=event_type, data=obj["data"], id=validate_event_id(obj.get("id")))


def parse_envelope(payload: bytes, max_bytes: int) -> Envelope:
    """Parses one published message; raises EnvelopeError naming why it is dropped."""
    if len(payload) > max_bytes:
        raise EnvelopeError("too_large", f"message of {len(payload)} bytes exceeds {max_bytes}")
    return envelope_from_object(load_json(payload))


def event_frame(payload: bytes, max_bytes: int, chunked: bool = False) -> LiveFrame:
    """The SSE frame, id, type and publish stamp of one published message: the frame is
    `parse_envelope(...).encode()`; with `chunked`, as one HTTP/1.1 chunk (`frames.chunk`), as
    streams take it. The stamp is the envelope's `ts` (Unix seconds), None when absent or not a
    finite number (a stamp never makes a message invalid).

    The Pub/Sub hot path, in one pass and without building an Envelope; the same checks in the
    same order, so a bad message is refused with the same reason.
    """
    if len(payload) > max_bytes:
        raise EnvelopeError("too_large", f"message of {len(payload)} bytes exceeds {max_bytes}")
    obj = load_json(payload)
    if type(obj) is not dict:
        raise EnvelopeError("not_object", "message is not a JSON object")
    raw_type = obj.get("type")
    head = _FRAME_HEADS.get(raw_type) if type(raw_type) is str else None
    if head is None:
        event_type = validate_event_type(raw_type)
        head = f"event: {event_type}\ndata: ".encode("ascii")
        if len(_FRAME_HEADS) < MAX_CACHED_TYPES:
            _FRAME_HEADS[event_type] = head
    else:
        event_type = cast(str, raw_type)  # only a valid str type is ever cached
    if "data" not in obj:
        raise EnvelopeError("missing_data", "missing field 'data'")
    event_id = obj.get("id")
    if event_id is not None:
        event_id = validate_event_id(event_id)
    stamp = obj.get("ts")
    if type(stamp) is int and 0 < stamp < 10**11:
        stamp = float(stamp)
    elif type(stamp) is not float or not 0.0 < stamp < 1e11:  # NaN, inf, year 5138: no stamp
        stamp = None
    return (
        _encode_frame(head, event_type, obj["data"], event_id, chunked),
        event_id,
        event_type,
        stamp,
    )


def load_json(payload: bytes) -> Any:
    """JSON from bytes, fast (orjson) where that is exact; EnvelopeError names a failure."""
    if _RUN_OF_20 in payload.translate(_DIGITS_AS_ZERO):
        return _parse_strictly(payload)  # orjson would turn such an integer into a float
    try:
        return orjson.loads(payload)
    except orjson.JSONDecodeError:
        return _parse_strictly(payload)  # classifies the error, takes what orjson will not


def _parse_strictly(payload: bytes) -> Any:
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise EnvelopeError("not_utf8", "message is not UTF-8") from exc
    try:
        obj = json.loads(text, parse_constant=_reject_constant)
        # What parses must also serialize: 1e400 parses as inf, "\ud800" as a lone surrogate.
        dump_json(obj).encode("utf-8")
    except (ValueError, RecursionError) as exc:  # UnicodeEncodeError is a ValueError
        raise EnvelopeError("not_json", f"message is not JSON: {exc}") from exc
    return obj


def encode_envelope(event_type: str, data: Any, event_id: str | None = None) -> bytes:
    """The wire form publishers send on a player's channel."""
    body: dict[str, Any] = {"type": event_type, "data": data}
    if event_id is not None:
        body["id"] = event_id
    return dump_json(body).encode("utf-8")
