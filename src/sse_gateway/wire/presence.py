"""Who is online: the presence query between gateway processes and its tally (pure).

`GET /v1/players/{brand}/{player}` asks every gateway process on the same Redis through the
control channel `SSE::control`, which each already subscribes (`wire.control`):

    query  {"op": "presence_query", "id", "reply_to", "brand_id", "player_id"}
    reply  {"op": "presence_reply", "id", "to", "connections", "since", "last_event_id"}

`reply_to`/`to` is the asking process's instance id, `id` the query's own. Only a process
holding streams of the player replies; a reply also reaches every other process (one
channel for all), which drops it after `is_presence` and a look at `to`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from sse_gateway.wire.ids import parse_stream_id
from sse_gateway.wire.naming import is_valid_id

QUERY_OP = "presence_query"
REPLY_OP = "presence_reply"
# Both messages are written by `_encode` with "op" first and no spaces: a prefix check tells
# them from the disconnects of `wire.control` without parsing the JSON.
_PREFIX = b'{"op":"presence_'
_MAX_TOKEN_CHARS = 64
# Far above what one process can hold (its open-file limit), far below what breaks a JSON client.
_MAX_CONNECTIONS = 100_000_000
_MAX_SINCE = 1e11  # Unix seconds, year 5138: as `wire.envelope` bounds the publish stamp


def _encode(message: dict[str, object]) -> bytes:
    return json.dumps(message, separators=(",", ":"), ensure_ascii=True).encode("ascii")


def is_presence(payload: bytes) -> bool:
    """Whether a control channel message is a presence query or reply (else: `wire.control`)."""
    return payload.startswith(_PREFIX)


@dataclass(frozen=True, slots=True)
class PresenceQuery:
    id: str
    reply_to: str
    brand_id: str
    player_id: str

    def encode(self) -> bytes:
        return _encode(
            {
                "op": QUERY_OP,
                "id": self.id,
                "reply_to": self.reply_to,
                "brand_id": self.brand_id,
                "player_id": self.player_id,
            }
        )


@dataclass(frozen=True, slots=True)
class PresenceReply:
    id: str
    to: str
    connections: int
    since: float | None
    """Unix seconds: when the replier's oldest open stream of the player was opened."""
    last_event_id: str | None
    """The newest event id the replier delivered to the player's streams."""

    def encode(self) -> bytes:
        return _encode(
            {
                "op": REPLY_OP,
                "id": self.id,
                "to": self.to,
                "connections": self.connections,
                "since": self.since,
                "last_event_id": self.last_event_id,
            }
        )


class InvalidPresence(ValueError):
    """A presence message this gateway does not understand (dropped with a warning)."""


def _token(message: dict[str, object], field: str) -> str:
    value = message.get(field)
    if not isinstance(value, str) or not 0 < len(value) <= _MAX_TOKEN_CHARS:
        raise InvalidPresence(f"{field}: must be a string of 1-{_MAX_TOKEN_CHARS} characters")
    return value


def decode_presence(payload: bytes) -> PresenceQuery | PresenceReply:
    """A message for which `is_presence` holds; raises InvalidPresence."""
    try:
        message = json.loads(payload)
    except (ValueError, RecursionError) as exc:
        raise InvalidPresence("not UTF-8 JSON") from exc
    if not isinstance(message, dict):
        raise InvalidPresence("not a JSON object")
    op = message.get("op")
    if op == QUERY_OP:
        brand_id, player_id = message.get("brand_id"), message.get("player_id")
        if not (is_valid_id(brand_id) and is_valid_id(player_id)):
            raise InvalidPresence("brand_id, player_id: must be ids")
        assert isinstance(brand_id, str) and isinstance(player_id, str)
        return PresenceQuery(
            _token(message, "id"), _token(message, "reply_to"), brand_id, player_id
        )
    if op != REPLY_OP:
        raise InvalidPresence(f"unknown operation {op!r}")
    connections = message.get("connections")
    if (
        not isinstance(connections, int)
        or isinstance(connections, bool)
        or not 0 <= connections <= _MAX_CONNECTIONS
    ):
        raise InvalidPresence(f"connections: must be an integer from 0 to {_MAX_CONNECTIONS}")
    since = message.get("since")
    if since is not None:
        # json.loads takes NaN, Infinity and integers of any size: none is a time, and NaN or
        # inf would make the asker's JSON answer fail.
        if not isinstance(since, int | float) or isinstance(since, bool):
            raise InvalidPresence("since: must be a number or null")
        if not 0 <= since < _MAX_SINCE:
            raise InvalidPresence("since: must be Unix seconds")
        since = float(since)
    last = message.get("last_event_id")
    if last is not None and (not isinstance(last, str) or parse_stream_id(last) is None):
        raise InvalidPresence("last_event_id: must be a history id or null")
    return PresenceReply(
        _token(message, "id"),
        _token(message, "to"),
        connections,
        since,
        last,
    )


class PresenceTally:
    """The answers to one query summed up: this process's own, then each reply that came in
    time. `answered` counts the processes whose streams are included."""

    __slots__ = ("answered", "connections", "last_event_id", "since")

    def __init__(self) -> None:
        self.connections = 0
        self.answered = 0
        self.since: float | None = None
        self.last_event_id: str | None = None

    def add(self, connections: int, since: float | None, last_event_id: str | None) -> None:
        """One process's streams of the player (a process with none adds nothing)."""
        if connections <= 0:
            return
        self.answered += 1
        self.connections += connections
        if since is not None and (self.since is None or since < self.since):
            self.since = since
        self.last_event_id = newest_id(self.last_event_id, last_event_id)


def newest_id(a: str | None, b: str | None) -> str | None:
    """The later of two history ids (None: unknown); ids compare as (ms, seq), not as text."""
    if a is None:
        return b
    if b is None:
        return a
    pa, pb = parse_stream_id(a), parse_stream_id(b)
    if pa is None:
        return b
    if pb is None:
        return a
    return b if pb > pa else a
