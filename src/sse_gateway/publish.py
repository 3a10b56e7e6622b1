"""Publishing events for players: history + PUBLISH in one Redis round trip per event.

    from sse_gateway.publish import Publisher

    publisher = Publisher.from_url("redis://127.0.0.1:6379")
    event_id = await publisher.publish("brand1", "player42", "notification", {"title": "Hi"})
    event_id.receivers  # gateway processes that received it (0: nobody connected right now)

`SyncPublisher` is the same for code that is not async. Both run `lua/publish.lua` (called
by its SHA, loaded when Redis does not know it yet): XADD to the player's history stream
(capped, expiring), then PUBLISH the envelope with the new entry's id. Publishers in other
languages can EVAL the same file; a plain PUBLISH of an envelope still works, but is live
only and cannot be replayed.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from importlib import resources
from typing import Any

import redis
import redis.asyncio as aioredis
import redis.asyncio.retry
import redis.exceptions
import redis.retry
from redis.backoff import NoBackoff
from redis.exceptions import NoScriptError

from .envelope import EnvelopeError, validate_event_type
from .frames import dump_json
from .naming import channel_name, is_valid_id
from .settings import RedisAddress, parse_redis_address

DEFAULT_HISTORY_SIZE = 100
DEFAULT_HISTORY_TTL = 24 * 3600
DEFAULT_MAX_EVENT_BYTES = 65_536
MAX_BATCH = 1000

PUBLISH_SCRIPT = resources.files("sse_gateway").joinpath("lua/publish.lua").read_text()
PUBLISH_SCRIPT_SHA = hashlib.sha1(PUBLISH_SCRIPT.encode()).hexdigest()

_REDIS_DOWN = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError)


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


def async_no_retry() -> redis.asyncio.retry.Retry:
    # A retried EVALSHA after a lost reply would store and deliver the event twice.
    return redis.asyncio.retry.Retry(NoBackoff(), 0)


def client_kwargs(address: RedisAddress) -> dict[str, Any]:
    return {
        "host": address.host,
        "port": address.port,
        "db": address.db,
        "username": address.username,
        "password": address.password,
        "ssl": address.tls,
        "socket_connect_timeout": 5.0,
        "socket_timeout": 5.0,
    }


def _result(reply: Any) -> PublishedEvent:
    if isinstance(reply, Exception):  # READONLY after a failover, OOM, NOPERM, WRONGTYPE...
        raise PublishUnavailable(f"redis refused the publish: {reply}")
    event_id, receivers = reply
    if isinstance(event_id, bytes):
        event_id = event_id.decode("ascii")
    return PublishedEvent(str(event_id), int(receivers))


def _missing_script(replies: list[Any]) -> list[int]:
    return [i for i, reply in enumerate(replies) if isinstance(reply, NoScriptError)]


class _PublisherBase:
    def __init__(
        self,
        *,
        history_size: int = DEFAULT_HISTORY_SIZE,
        history_ttl: int = DEFAULT_HISTORY_TTL,
        max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES,
    ) -> None:
        self.history_size = history_size
        self.history_ttl = history_ttl
        self.max_event_bytes = max_event_bytes

    def _prepare(self, brand_id: str, player_id: str, type: str, data: Any) -> PreparedEvent:
        return prepare_event(brand_id, player_id, type, data, max_event_bytes=self.max_event_bytes)

    def _prepare_many(self, events: Iterable[Event | Mapping[str, Any]]) -> list[PreparedEvent]:
        return [event_from_mapping(e, max_event_bytes=self.max_event_bytes) for e in events]

    def _evalsha_args(self, event: PreparedEvent) -> tuple[Any, ...]:
        return (
            PUBLISH_SCRIPT_SHA,
            1,
            event.channel,
            event.type,
            event.data_json,
            self.history_size,
            self.history_ttl,
        )


class Publisher(_PublisherBase):
    """Async publisher over redis-py's asyncio client.

    Every publish is an EVALSHA in a pipeline: one round trip for one event or a batch. Only
    when Redis answers NOSCRIPT (a restart, a failover, SCRIPT FLUSH) is the script loaded
    and those events sent again; NOSCRIPT means they did not run.
    """

    def __init__(self, client: aioredis.Redis, **options: Any) -> None:
        super().__init__(**options)
        self._client = client

    @classmethod
    def from_url(cls, url: str, **options: Any) -> Publisher:
        client = aioredis.Redis(**client_kwargs(parse_redis_address(url)), retry=async_no_retry())
        return cls(client, **options)

    async def publish(self, brand_id: str, player_id: str, type: str, data: Any) -> PublishedEvent:
        return await self.publish_prepared(self._prepare(brand_id, player_id, type, data))

    async def publish_prepared(self, event: PreparedEvent) -> PublishedEvent:
        return (await self.publish_many_prepared([event]))[0]

    async def publish_many(
        self, events: Iterable[Event | Mapping[str, Any]]
    ) -> list[PublishedEvent]:
        """Publishes a batch in one pipelined round trip; all are validated before any is sent."""
        return await self.publish_many_prepared(self._prepare_many(events))

    async def publish_many_prepared(self, events: list[PreparedEvent]) -> list[PublishedEvent]:
        if not events:
            return []
        try:
            replies = await self._send(events)
            missing = _missing_script(replies)
            if missing:
                await self._client.script_load(PUBLISH_SCRIPT)
                again = await self._send([events[i] for i in missing])
                for index, reply in zip(missing, again, strict=True):
                    replies[index] = reply
        except _REDIS_DOWN as exc:
            raise PublishUnavailable(f"redis unavailable: {exc}") from exc
        return [_result(reply) for reply in replies]

    async def _send(self, events: list[PreparedEvent]) -> list[Any]:
        async with self._client.pipeline(transaction=False) as pipe:
            for event in events:
                pipe.evalsha(*self._evalsha_args(event))
            return list(await pipe.execute(raise_on_error=False))

    async def aclose(self) -> None:
        await self._client.aclose()


class SyncPublisher(_PublisherBase):
    """The same as Publisher, for code that is not async."""

    def __init__(self, client: redis.Redis, **options: Any) -> None:
        super().__init__(**options)
        self._client = client

    @classmethod
    def from_url(cls, url: str, **options: Any) -> SyncPublisher:
        client = redis.Redis(
            **client_kwargs(parse_redis_address(url)), retry=redis.retry.Retry(NoBackoff(), 0)
        )
        return cls(client, **options)

    def publish(self, brand_id: str, player_id: str, type: str, data: Any) -> PublishedEvent:
        return self.publish_many_prepared([self._prepare(brand_id, player_id, type, data)])[0]

    def publish_many(self, events: Iterable[Event | Mapping[str, Any]]) -> list[PublishedEvent]:
        return self.publish_many_prepared(self._prepare_many(events))

    def publish_many_prepared(self, events: list[PreparedEvent]) -> list[PublishedEvent]:
        if not events:
            return []
        try:
            replies = self._send(events)
            missing = _missing_script(replies)
            if missing:
                self._client.script_load(PUBLISH_SCRIPT)
                again = self._send([events[i] for i in missing])
                for index, reply in zip(missing, again, strict=True):
                    replies[index] = reply
        except _REDIS_DOWN as exc:
            raise PublishUnavailable(f"redis unavailable: {exc}") from exc
        return [_result(reply) for reply in replies]

    def _send(self, events: list[PreparedEvent]) -> list[Any]:
        with self._client.pipeline(transaction=False) as pipe:
            for event in events:
                pipe.evalsha(*self._evalsha_args(event))
            return list(pipe.execute(raise_on_error=False))

    def close(self) -> None:
        self._client.close()
