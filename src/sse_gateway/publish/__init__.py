"""Publishing events for players from Python, as `sse-gateway publish` and the HTTP API do.

    from sse_gateway.publish import Publisher

    publisher = Publisher.from_url("redis://127.0.0.1:6379")
    event_id = await publisher.publish("brand1", "player42", "notification", {"title": "Hi"})
    event_id.receivers  # gateway processes that received it (0: nobody connected right now)

`SyncPublisher` is the same for code that is not async. `events` validates and serializes
(pure), `publisher` talks to Redis through the shipped `lua/publish.lua`, `cli` is the command.
"""

from sse_gateway.publish.events import (
    DEFAULT_MAX_EVENT_BYTES,
    MAX_BATCH,
    Event,
    InvalidEvent,
    PreparedEvent,
    PublishedEvent,
    PublishError,
    PublishUnavailable,
    event_from_mapping,
    prepare_event,
)
from sse_gateway.publish.publisher import (
    DEFAULT_HISTORY_SIZE,
    DEFAULT_HISTORY_TTL,
    PUBLISH_SCRIPT,
    PUBLISH_SCRIPT_PATH,
    PUBLISH_SCRIPT_SHA,
    Publisher,
    SyncPublisher,
    async_no_retry,
)
from sse_gateway.publish.target import client_kwargs

__all__ = [
    "DEFAULT_HISTORY_SIZE",
    "DEFAULT_HISTORY_TTL",
    "DEFAULT_MAX_EVENT_BYTES",
    "MAX_BATCH",
    "PUBLISH_SCRIPT",
    "PUBLISH_SCRIPT_PATH",
    "PUBLISH_SCRIPT_SHA",
    "Event",
    "InvalidEvent",
    "PreparedEvent",
    "PublishError",
    "PublishUnavailable",
    "PublishedEvent",
    "Publisher",
    "SyncPublisher",
    "async_no_retry",
    "client_kwargs",
    "event_from_mapping",
    "prepare_event",
]
