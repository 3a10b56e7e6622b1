"""Events as publishers give them: validation and serialization, pure (no Redis)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sse_gateway.wire.envelope import EnvelopeError, validate_event_type
from sse_gateway.wire.frames import dump_json
from sse_gateway.wire.naming import channel_name, is_valid_id

DEFAULT_MAX_EVENT_BYTES = 65_536
MAX_BATCH = 1000


class PublishError(Exception):
    """Base of the errors a publish can raise."""


class InvalidEvent(PublishError, ValueError):
    """The event cannot be published; `field` names the culprit."""

    def __init__(self, field: str, message: str, *, too_large: bool = False) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.too_large = too_large


class PublishUnavailable(PublishError, ConnectionError):
    """Redis could not be reached: the event was not stored and not published."""


class PublishedEvent(str):
    """The event id (a Redis stream id, also its SSE `id:`), plus how many received it."""

    receivers: int

    def __new__(cls, event_id: str, receivers: int) -> PublishedEvent:
        self = super().__new__(cls, event_id)
        self.receivers = receivers
        return self


@dataclass(frozen=True, slots=True)
class Event:
    brand_id: str
    player_id: str
    type: str
    data: Any


@dataclass(frozen=True, slots=True)
class PreparedEvent:
    channel: bytes
    type: str
    data_json: str


def prepare_event(
    brand_id: object,
    player_id: object,
    event_type: object,
    data: Any,
    *,
    max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES,
) -> PreparedEvent:
    """Validates one event and serializes its data; raises InvalidEvent."""
    if not is_valid_id(brand_id):
        raise InvalidEvent("brand_id", "must be 1-64 chars of [A-Za-z0-9_.-]")
    if not is_valid_id(player_id):
        raise InvalidEvent("player_id", "must be 1-64 chars of [A-Za-z0-9_.-]")
    try:
        checked_type = validate_event_type(event_type)
    except EnvelopeError as exc:
        raise InvalidEvent("type", str(exc)) from exc
    try:
        data_json = dump_json(data)
        data_bytes = data_json.encode("utf-8")
    except (TypeError, ValueError, RecursionError) as exc:
        raise InvalidEvent("data", f"is not JSON-serializable: {exc}") from exc
    # The envelope adds the type, the id (≤ 41 chars) and 30 bytes of punctuation.
    size = len(data_bytes) + len(checked_type) + 72
    if size > max_event_bytes:
        raise InvalidEvent(
            "data", f"event of about {size} bytes exceeds {max_event_bytes}", too_large=True
        )
    assert isinstance(brand_id, str) and isinstance(player_id, str)
    return PreparedEvent(channel_name(brand_id, player_id), checked_type, data_json)


def event_from_mapping(item: object, *, max_event_bytes: int) -> PreparedEvent:
    """An event given as `{"brand_id", "player_id", "type", "data"}` (the HTTP API's body)."""
    if isinstance(item, Event):
        return prepare_event(
            item.brand_id, item.player_id, item.type, item.data, max_event_bytes=max_event_bytes
        )
    if not isinstance(item, Mapping):
        raise InvalidEvent("body", "must be a JSON object")
    if "data" not in item:
        raise InvalidEvent("data", "is required (any JSON value)")
    return prepare_event(
        item.get("brand_id"),
        item.get("player_id"),
        item.get("type"),
        item["data"],
        max_event_bytes=max_event_bytes,
    )
