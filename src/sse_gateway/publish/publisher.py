"""Publisher and SyncPublisher: history + PUBLISH in one Redis round trip per event.

Both run `lua/publish.lua` (called
by its SHA, loaded when Redis does not know it yet): XADD to the player's history stream
(capped, expiring), then PUBLISH the envelope with the new entry's id. Publishers in other
languages can EVAL the same file; a plain PUBLISH of an envelope still works, but is live
only and cannot be replayed.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from importlib import resources
from typing import Any

import redis
import redis.asyncio as aioredis
import redis.asyncio.retry
import redis.exceptions
import redis.retry
from redis.backoff import NoBackoff
from redis.exceptions import NoScriptError

from sse_gateway.publish.events import (
    DEFAULT_MAX_EVENT_BYTES,
    Event,
    PreparedEvent,
    PublishedEvent,
    PublishUnavailable,
    event_from_mapping,
    prepare_event,
)
from sse_gateway.settings import RedisAddress, parse_redis_address

DEFAULT_HISTORY_SIZE = 100
DEFAULT_HISTORY_TTL = 24 * 3600

PUBLISH_SCRIPT_PATH = str(resources.files("sse_gateway").joinpath("lua/publish.lua"))
"""Where the installed package keeps publish.lua (`sse-gateway publish-script --path`)."""
PUBLISH_SCRIPT = resources.files("sse_gateway").joinpath("lua/publish.lua").read_text()
PUBLISH_SCRIPT_SHA = hashlib.sha1(PUBLISH_SCRIPT.encode()).hexdigest()

_REDIS_DOWN = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError)


def async_no_retry() -> redis.asyncio.retry.Retry:
    # A retried EVALSHA after a lost reply would store and deliver the event twice.
    return redis.asyncio.retry.Retry(NoBackoff(), 0)


def client_kwargs(address: RedisAddress) -> dict[str, Any]:
    kwargs: dict[str, Any] = {
        "host": address.host,
        "port": address.port,
        "db": address.db,
        "username": address.username,
        "password": address.password,
        "ssl": address.tls,
        "socket_connect_timeout": 5.0,
        "socket_timeout": 5.0,
    }
    if address.tls:  # a plain connection takes no TLS options at all
        kwargs["ssl_ca_certs"] = address.ssl_ca_certs
        kwargs["ssl_certfile"] = address.ssl_certfile
        kwargs["ssl_keyfile"] = address.ssl_keyfile
    return kwargs


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
