"""Ids and channel names. One rule for both so a channel name can never be widened or collide."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

ID_PATTERN = re.compile(r"[A-Za-z0-9_.-]{1,64}")
CHANNEL_PREFIX = "SSE::"


def is_valid_id(value: object) -> bool:
    """Brand and player ids: 1-64 chars of [A-Za-z0-9_.-]; `::` and glob chars cannot appear."""
    return isinstance(value, str) and ID_PATTERN.fullmatch(value) is not None


def channel_name(brand_id: str, player_id: str) -> bytes:
    """The Redis Pub/Sub channel of one player: `SSE::{brand_id}::{player_id}`."""
    return f"{CHANNEL_PREFIX}{brand_id}::{player_id}".encode("ascii")


def split_channel(channel: bytes) -> tuple[str, str] | None:
    """(brand_id, player_id) of a channel name, or None when it is not one of ours."""
    try:
        text = channel.decode("ascii")
    except UnicodeDecodeError:
        return None
    if not text.startswith(CHANNEL_PREFIX):
        return None
    parts = text[len(CHANNEL_PREFIX) :].split("::")
    if len(parts) != 2 or not (is_valid_id(parts[0]) and is_valid_id(parts[1])):
        return None
    return parts[0], parts[1]


_BRAND_START = len(CHANNEL_PREFIX)


def brand_of(channel: bytes) -> str:
    """The brand id of a channel `channel_name` made (not checked again: see `split_channel`
    for a name from outside). Cheap: it runs once per stream that closes."""
    return channel[_BRAND_START : channel.index(b"::", _BRAND_START)].decode("ascii")


@dataclass(frozen=True, slots=True)
class Identity:
    """Whom a stream is for: the brand and the player (a token's `brand_id` and `sub`).

    `valid_until`: when the token that proved it stops being accepted (seconds since the
    epoch: its `exp` plus the clock leeway), the moment a stream opened with it is closed
    (`session_expired`); None when nothing bounds it. Not part of the identity: two tokens of
    one player are the same player (equality and hash ignore it).
    """

    brand_id: str
    player_id: str
    valid_until: float | None = field(default=None, compare=False)
