"""SSE frame encoding: pure functions from values to the bytes written on the wire.

A field value may never contain a line break of its own: `data` is split into one `data:` line
per line, and `id` / `event` are refused, so published content can never end or forge a frame.
"""

from __future__ import annotations

import json
import re
from typing import Any

_LINE_BREAK = re.compile(r"\r\n|\r|\n")
_FORBIDDEN_IN_FIELD = re.compile(r"[\r\n\x00]")


class FrameError(ValueError):
    """A value that cannot be sent as an SSE field."""


def _data_lines(data: str) -> str:
    return "".join(f"data: {line}\n" for line in _LINE_BREAK.split(data))


def encode_event(event: str | None, data: str, event_id: str | None = None) -> bytes:
    """One complete SSE frame: optional `id:`, optional `event:`, `data:` lines, blank line."""
    parts = []
    if event_id is not None:
        if _FORBIDDEN_IN_FIELD.search(event_id):
            raise FrameError("id contains a line break or NUL")
        parts.append(f"id: {event_id}\n")
    if event is not None:
        if not event or _FORBIDDEN_IN_FIELD.search(event):
            raise FrameError("event type is empty or contains a line break")
        parts.append(f"event: {event}\n")
    parts.append(_data_lines(data))
    parts.append("\n")
    return "".join(parts).encode("utf-8")


def encode_json_event(event: str, payload: Any, event_id: str | None = None) -> bytes:
    return encode_event(event, dump_json(payload), event_id)


def encode_retry(retry_ms: int) -> bytes:
    """A `retry:`-only block. Browsers take it silently, but some clients (httpx-sse,
    fetch-event-source) report it as an empty message: streams put `retry:` inside a frame
    (`encode_connected`, `encode_close`) instead."""
    return f"retry: {int(retry_ms)}\n\n".encode("ascii")


def encode_connected(payload: bytes, event_id: str, retry_ms: int) -> bytes:
    """A stream's first frame: `id:` (the resume id), `event: connected`, `retry:`, and the
    payload, JSON on one line. `event_id` is a checked id (ASCII, no line break)."""
    return (
        f"id: {event_id}\nevent: connected\nretry: {int(retry_ms)}\ndata: ".encode("ascii")
        + payload
        + b"\n\n"
    )


def encode_close(reason: str, message: str, retry_ms: int, event: str = "close") -> bytes:
    """The frame a stream ends with when the gateway wants the client back later:
    `event: close` (or `event`, e.g. `session_expired`), `retry:` (milliseconds) and
    `{"reason": …, "message": …}`. `event` is one of the gateway's own (reserved) types."""
    data = dump_json({"reason": reason, "message": message})
    return f"event: {event}\nretry: {int(retry_ms)}\ndata: {data}\n\n".encode()


def encode_disconnected(payload: bytes, retry_ms: int) -> bytes:
    """The last frame of a stream closed by an operator (`POST /v1/disconnect`):
    `event: disconnected`, `retry:` (milliseconds) and the payload, JSON on one line
    (`{"reason": …, "blocked": …}`; JSON escapes every line break)."""
    return (
        f"event: disconnected\nretry: {int(retry_ms)}\ndata: ".encode("ascii") + payload + b"\n\n"
    )


# The size lines of chunks up to 4 KiB, made once: formatting one costs more than the rest of
# a small event's chunk.
_SIZE_LINES = [b"%x\r\n" % size for size in range(4096)]


def chunk_size_line(size: int) -> bytes:
    """The line that opens a chunk of `size` bytes: the size in hex, CRLF."""
    return _SIZE_LINES[size] if size < 4096 else b"%x\r\n" % size


def chunk(frame: bytes) -> bytes:
    """`frame` as one HTTP/1.1 chunk (RFC 9112 §7.1): size in hex, CRLF, bytes, CRLF.

    Streams carry chunks: a frame is made a chunk once per message, and an HTTP/1.0 stream
    (close-delimited body) takes it back out with `unchunk`."""
    return b"".join((chunk_size_line(len(frame)), frame, b"\r\n"))


def unchunk(data: bytes) -> bytes:
    """The frame inside one chunk made by `chunk`."""
    return data[data.index(b"\n") + 1 : -2]


LAST_CHUNK = b"0\r\n\r\n"


def encode_comment(text: str = "") -> bytes:
    return "".join(f": {line}\n" for line in _LINE_BREAK.split(text)).encode("utf-8") + b"\n"


def dump_json(value: Any) -> str:
    """Compact JSON; non-ASCII kept as UTF-8 (SSE streams are UTF-8 by definition)."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
