"""Event ids and the merge of replayed history with live events: pure functions.

History lives in a Redis stream per player, so an event id is the stream entry id
`<ms>-<seq>`: ids of one player are strictly increasing and can be compared. A replay reads
the entries after a client's last id while live events are already arriving; `ReplayMerge`
turns both into one sequence with no gap and no duplicate.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

_STREAM_ID = re.compile(r"(\d{1,20})-(\d{1,20})")

StreamId = tuple[int, int]
_U64_MAX = 2**64 - 1


def parse_stream_id(value: str | None) -> StreamId | None:
    """(ms, seq) of a Redis stream id, or None for any other id (live-only events)."""
    if value is None:
        return None
    match = _STREAM_ID.fullmatch(value)
    if match is None:
        return None
    parsed = int(match.group(1)), int(match.group(2))
    # Redis refuses stream ids beyond 64 bits; such an id never came from a history.
    if parsed[0] > _U64_MAX or parsed[1] > _U64_MAX:
        return None
    return parsed


def format_stream_id(stream_id: StreamId) -> str:
    return f"{stream_id[0]}-{stream_id[1]}"


# The sequence part of every `position_id`, as it ends the id.
POSITION_SEQ = f"-{_U64_MAX}"


def position_id(ms: int) -> str:
    """A position in a history that is not an entry: the end of millisecond `ms`, after every
    entry of that millisecond (no entry has the largest sequence number: that would take
    2**64 entries in one millisecond). The resume id of a stream whose history was empty."""
    return f"{ms}{POSITION_SEQ}"


def is_position(stream_id: StreamId) -> bool:
    """Whether an id is a `position_id`, not an entry id."""
    return stream_id[1] == _U64_MAX


@dataclass(frozen=True, slots=True)
class HistoryEvent:
    id: str
    frame: bytes


@dataclass(slots=True)
class ReplayMerge:
    """Orders replayed and live events of one stream: each id once, ascending, nothing lost.

    `last` is the newest stream id already sent. Live events without a stream id (a plain
    PUBLISH) cannot be replayed or compared, so they always pass.
    """

    last: StreamId | None = None

    def admit(self, event_id: str | None) -> bool:
        """Whether an event must be sent; advances `last` when it is."""
        parsed = parse_stream_id(event_id)
        if parsed is None:
            return True
        if self.last is not None and parsed <= self.last:
            return False
        self.last = parsed
        return True

    def merge(
        self, replayed: Sequence[HistoryEvent], held: Sequence[tuple[str | None, bytes]]
    ) -> list[tuple[str | None, bytes]]:
        """(id, frame) to write, in order: replayed entries, then held live ones not yet sent."""
        out: list[tuple[str | None, bytes]] = [
            (event.id, event.frame) for event in replayed if self.admit(event.id)
        ]
        out.extend((event_id, frame) for event_id, frame in held if self.admit(event_id))
        return out
