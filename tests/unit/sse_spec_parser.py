"""A small, spec-following SSE stream parser (WHATWG HTML, "Interpreting an event stream").

Used by the unit tests to check that the gateway's frames mean what they are meant to mean to a
conforming client; deliberately independent of the gateway's own code.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

# The only line terminators of the SSE grammar: CRLF, LF, CR (not U+2028, U+0085, ...).
_LINE = re.compile(r"\r\n|\r|\n")


@dataclass(frozen=True)
class Event:
    type: str
    data: str
    id: str


@dataclass
class ParsedStream:
    events: list[Event] = field(default_factory=list)
    retry: int | None = None
    comments: list[str] = field(default_factory=list)
    last_event_id: str = ""


def parse_sse(payload: bytes | str) -> ParsedStream:
    """Parses a complete stream; an unterminated last block is discarded, as by a browser."""
    text = payload.decode("utf-8") if isinstance(payload, bytes) else payload
    text = text.removeprefix("\ufeff")
    out = ParsedStream()
    data = ""
    event_type = ""
    # A stream that does not end in a line terminator leaves its last line incomplete.
    pieces = _LINE.split(text)
    complete_lines = pieces[:-1]
    for line in complete_lines:
        if line == "":
            if data == "":
                event_type = ""
                continue
            out.events.append(
                Event(type=event_type or "message", data=data[:-1], id=out.last_event_id)
            )
            data = ""
            event_type = ""
            continue
        if line.startswith(":"):
            out.comments.append(line[1:].removeprefix(" "))
            continue
        name, colon, value = line.partition(":")
        if colon:
            value = value.removeprefix(" ")
        if name == "data":
            data += value + "\n"
        elif name == "event":
            event_type = value
        elif name == "id":
            if "\x00" not in value:
                out.last_event_id = value
        elif name == "retry" and value and all("0" <= c <= "9" for c in value):
            out.retry = int(value)
        # any other field is ignored
    return out
