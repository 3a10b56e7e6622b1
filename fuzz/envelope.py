"""Fuzz target: the parser of published messages (`wire/envelope.py`).

Each input is taken as a message off Pub/Sub and parsed by `parse_envelope` and by the hot
path `event_frame` (plain and as an HTTP/1.1 chunk). Then it is cut at 0xFF bytes into a
type, an id and a text, and the message a publisher would send for those
(`encode_envelope(type, text, id)`) goes through the same checks, so that arbitrary text
reaches the frame encoder. Invariants (a violation raises `Finding`):

- the parsers return a valid envelope or raise `EnvelopeError` with one of the reasons
  `docs/api.md` lists, nothing else; the hot path gives the same frame, id and type, or the same
  reason;
- a valid envelope's type matches `[A-Za-z0-9_.:-]{1,64}` and is not reserved, its id (if
  any) `[A-Za-z0-9_.:-]{1,128}`;
- its frame, read by a conforming SSE parser (`tests/unit/sse_spec_parser.py`, written from
  the WHATWG text independently of the gateway), is exactly one event with the envelope's
  type, id and data (its JSON), no `retry:` and no comment, and the frame ends that event:
  a following frame is read as its own event (no frame injection);
- `encode_envelope` of a parsed envelope parses back to the same envelope.
"""

from __future__ import annotations

import json
from typing import Any

from fakes import http_chunk
from sse_spec_parser import parse_sse

from sse_gateway.wire.envelope import (
    EVENT_ID_PATTERN,
    EVENT_TYPE_PATTERN,
    RESERVED_TYPES,
    Envelope,
    EnvelopeError,
    encode_envelope,
    event_frame,
    parse_envelope,
)

MAX_BYTES = 65_536  # SSE_MAX_EVENT_BYTES's default
REASONS = frozenset(
    {
        "too_large",
        "not_utf8",
        "not_json",
        "not_object",
        "missing_type",
        "bad_type",
        "reserved_type",
        "missing_data",
        "bad_id",
    }
)
NEXT_FRAME = b"event: next\ndata: 1\n\n"


class Finding(AssertionError):
    """An invariant the envelope parser broke."""


def _reason(call: Any, *args: Any) -> tuple[str | None, Any]:
    """(the EnvelopeError reason, None) or (None, the result); any other exception escapes."""
    try:
        return None, call(*args)
    except EnvelopeError as exc:
        if exc.reason not in REASONS:
            raise Finding(f"undocumented reason {exc.reason!r}") from exc
        return exc.reason, None


def check_message(payload: bytes, max_bytes: int = MAX_BYTES) -> Envelope | None:
    """Checks one published message; returns its envelope, or None when it is dropped."""
    reason, envelope = _reason(parse_envelope, payload, max_bytes)
    fast_reason, fast = _reason(event_frame, payload, max_bytes)
    chunked_reason, chunked = _reason(event_frame, payload, max_bytes, True)
    if not reason == fast_reason == chunked_reason:
        raise Finding(f"reasons differ: {reason}, hot path {fast_reason}, chunked {chunked_reason}")
    if envelope is None:
        return None
    assert isinstance(envelope, Envelope)
    if not isinstance(envelope.type, str) or not EVENT_TYPE_PATTERN.fullmatch(envelope.type):
        raise Finding(f"accepted type {envelope.type!r}")
    if envelope.type in RESERVED_TYPES:
        raise Finding(f"accepted reserved type {envelope.type!r}")
    if envelope.id is not None and (
        not isinstance(envelope.id, str) or not EVENT_ID_PATTERN.fullmatch(envelope.id)
    ):
        raise Finding(f"accepted id {envelope.id!r}")
    frame = envelope.encode()
    # The hot path also gives the type and the publish stamp (`ts`), which is not the frame's.
    if fast[:3] != (frame, envelope.id, envelope.type):
        raise Finding(f"hot path frame {fast!r} differs from {frame!r}")
    if chunked[:3] != (http_chunk(frame), envelope.id, envelope.type):
        raise Finding(f"chunked frame {chunked!r} is not {frame!r} as one chunk")
    check_frame(frame, envelope)
    again = encode_envelope(envelope.type, envelope.data, envelope.id)
    if parse_envelope(again, len(again)) != envelope:
        raise Finding(f"{again!r} does not parse back to {envelope!r}")
    return envelope


def check_frame(frame: bytes, envelope: Envelope) -> None:
    """The frame means exactly the envelope to a conforming client, and ends there."""
    try:
        stream = parse_sse(frame + NEXT_FRAME)
    except UnicodeDecodeError as exc:
        raise Finding(f"frame is not UTF-8: {frame!r}") from exc
    if len(stream.events) != 2 or stream.events[1].type != "next":
        raise Finding(f"frame {frame!r} is read as {stream.events}")
    event = stream.events[0]
    if event.type != envelope.type or event.id != (envelope.id or ""):
        raise Finding(f"frame {frame!r} is read as type {event.type!r}, id {event.id!r}")
    if stream.retry is not None or stream.comments:
        raise Finding(f"frame {frame!r} carries a retry or a comment")
    data = json.loads(event.data)
    if data != envelope.data or json.dumps(data) != json.dumps(envelope.data):
        raise Finding(f"frame data {event.data!r} is not {envelope.data!r}")


def check(data: bytes) -> None:
    """One input: raises `Finding` (or what the parser let out) on a broken invariant."""
    check_message(data)
    if data and check_message(data, len(data) - 1) is not None:
        raise Finding("a message over the size limit was accepted")
    type_bytes, _, rest = data.partition(b"\xff")
    id_bytes, sep, text = rest.partition(b"\xff")
    event_type = type_bytes.decode("utf-8", "replace")
    event_id = id_bytes.decode("utf-8", "replace") if sep else None
    # What a publisher's JSON encoder sends for any text (a lone surrogate it cannot).
    message = encode_envelope(event_type, text.decode("utf-8", "replace"), event_id)
    envelope = check_message(message, max(MAX_BYTES, len(message)))
    if envelope is not None and (envelope.type, envelope.id) != (event_type, event_id):
        raise Finding(f"published {event_type!r}/{event_id!r}, parsed {envelope!r}")
