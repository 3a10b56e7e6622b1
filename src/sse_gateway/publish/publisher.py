"""Publisher and SyncPublisher: history + PUBLISH in one Redis round trip per event.

On a Redis Cluster (`redis+cluster://` URL) the client is redis-py's cluster client, which
sends each event to the master of its player's slot, and the script publishes with SPUBLISH.

Both run `lua/publish.lua` (called
by its SHA, loaded when Redis does not know it yet): XADD to the player's history stream
(capped, expiring), then PUBLISH the envelope with the new entry's id. Publishers in other
languages can EVAL the same file; a plain PUBLISH of an envelope still works, but is live
only and cannot be replayed.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterable, Mapping
from importlib import resources
from typing import Any

import redis
import redis.asyncio as aioredis
import redis.asyncio.cluster
import redis.asyncio.retry
import redis.cluster
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
from sse_gateway.publish.target import client_kwargs, command_pool, sync_client
from sse_gateway.settings import RedisAddress, parse_redis_address

DEFAULT_HISTORY_SIZE = 100
DEFAULT_HISTORY_TTL = 24 * 3600

PUBLISH_SCRIPT_PATH = str(resources.files("sse_gateway").joinpath("lua/publish.lua"))
"""Where the installed package keeps publish.lua (`sse-gateway publish-script --path`)."""
PUBLISH_SCRIPT = resources.files("sse_gateway").joinpath("lua/publish.lua").read_text()
PUBLISH_SCRIPT_SHA = hashlib.sha1(PUBLISH_SCRIPT.encode()).hexdigest()

# RedisClusterException: no seed node answered as a cluster's (down, or not a cluster node).
_REDIS_DOWN = (
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    OSError,
    redis.exceptions.RedisClusterException,
)


# Refusals of a command Redis did not run: safe to send again once the slots are read anew.
_NOT_RUN = (redis.exceptions.AskError, redis.exceptions.TryAgainError)


def async_no_retry() -> redis.asyncio.retry.Retry:
    # A retried EVALSHA after a lost reply would store and deliver the event twice.
    return redis.asyncio.retry.Retry(NoBackoff(), 0)


def cluster_kwargs(address: RedisAddress) -> dict[str, Any]:
    """`client_kwargs` for redis-py's RedisCluster: no host, port or db (a cluster has only
    db 0; its nodes come from the topology), slots without a master tolerated (a failover)."""
    kwargs = client_kwargs(address)
    for name in ("host", "port", "db"):
        kwargs.pop(name)
    kwargs["require_full_coverage"] = False
    return kwargs


def _result(reply: Any) -> PublishedEvent:
    if isinstance(reply, redis.exceptions.AskError):
        # redis-py drops the word itself ("15953 127.0.0.1:7001"): only a cluster node
        # answers this, to a client that was given one Redis's URL.
        kind = "MOVED" if isinstance(reply, redis.exceptions.MovedError) else "ASK"
        raise PublishUnavailable(
            f"redis refused the publish: {kind} {reply}: the slot is another node's (given"
            " a Redis Cluster node as one Redis? use redis+cluster://)"
        )
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
        sharded: bool = False,
    ) -> None:
        self.history_size = history_size
        self.history_ttl = history_ttl
        self.max_event_bytes = max_event_bytes
        # SPUBLISH instead of PUBLISH (publish.lua's 5th argument): on a Redis Cluster.
        self.sharded = sharded

    def _prepare(self, brand_id: str, player_id: str, type: str, data: Any) -> PreparedEvent:
        return prepare_event(brand_id, player_id, type, data, max_event_bytes=self.max_event_bytes)

    def _prepare_many(self, events: Iterable[Event | Mapping[str, Any]]) -> list[PreparedEvent]:
        return [event_from_mapping(e, max_event_bytes=self.max_event_bytes) for e in events]

    def _evalsha_args(self, event: PreparedEvent) -> tuple[Any, ...]:
        args = (
            PUBLISH_SCRIPT_SHA,
            1,
            event.channel,
            event.type,
            event.data_json,
            self.history_size,
            self.history_ttl,
        )
        return (*args, "sharded") if self.sharded else args


class Publisher(_PublisherBase):
    """Async publisher over redis-py's asyncio client.

    Every publish is an EVALSHA in a pipeline: one round trip for one event or a batch. Only
    when Redis answers NOSCRIPT (a restart, a failover, SCRIPT FLUSH) is the script loaded
    and those events sent again; NOSCRIPT means they did not run.
    """

    def __init__(self, client: aioredis.Redis | aioredis.RedisCluster, **options: Any) -> None:
        super().__init__(**options)
        self._client = client

    @classmethod
    def from_url(cls, url: str, **options: Any) -> Publisher:
        """A `redis+cluster://` URL gives a cluster client that publishes with SPUBLISH."""
        address = parse_redis_address(url)
        if address.mode == "cluster":
            options.setdefault("sharded", True)
            cluster = aioredis.RedisCluster(
                startup_nodes=[aioredis.cluster.ClusterNode(h, p) for h, p in address.all_nodes],
                retry=async_no_retry(),
                **cluster_kwargs(address),
            )
            return cls(cluster, **options)
        client = aioredis.Redis.from_pool(command_pool(address, async_no_retry()))
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
            if isinstance(self._client, aioredis.RedisCluster):
                # redis-py re-reads the slots only every few failures of one pipeline: a
                # failover would otherwise be followed late, or not at all.
                with contextlib.suppress(Exception):
                    await self._client.nodes_manager.initialize()
            raise PublishUnavailable(f"redis unavailable: {exc}") from exc
        return [_result(reply) for reply in replies]

    async def _send(self, events: list[PreparedEvent]) -> list[Any]:
        async with self._client.pipeline(transaction=False) as pipe:
            for event in events:
                pipe.execute_command("EVALSHA", *self._evalsha_args(event))
            return list(await pipe.execute(raise_on_error=False))

    async def aclose(self) -> None:
        await self._client.aclose()


class SyncPublisher(_PublisherBase):
    """The same as Publisher, for code that is not async."""

    def __init__(self, client: redis.Redis | redis.RedisCluster, **options: Any) -> None:
        super().__init__(**options)
        self._client = client

    @classmethod
    def from_url(cls, url: str, **options: Any) -> SyncPublisher:
        """A `redis+cluster://` URL gives a cluster client that publishes with SPUBLISH."""
        address = parse_redis_address(url)
        if address.mode == "cluster":
            options.setdefault("sharded", True)
            try:  # redis-py's sync client reads the slots now, not at the first command
                cluster = redis.RedisCluster(
                    startup_nodes=[
                        redis.cluster.ClusterNode(h, p)  # type: ignore[no-untyped-call]
                        for h, p in address.all_nodes
                    ],
                    retry=redis.retry.Retry(NoBackoff(), 0),
                    **cluster_kwargs(address),
                )
            except _REDIS_DOWN as exc:
                raise PublishUnavailable(f"redis cluster unavailable: {exc}") from exc
            return cls(cluster, **options)
        client = sync_client(address, redis.retry.Retry(NoBackoff(), 0))
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
            if isinstance(self._client, redis.RedisCluster):
                with contextlib.suppress(Exception):  # as in Publisher
                    self._client.nodes_manager.initialize()
            raise PublishUnavailable(f"redis unavailable: {exc}") from exc
        return [_result(reply) for reply in replies]

    def _send(self, events: list[PreparedEvent]) -> list[Any]:
        if isinstance(self._client, redis.RedisCluster):
            return self._send_by_node(self._client, events)
        with self._client.pipeline(transaction=False) as pipe:
            for event in events:
                pipe.execute_command("EVALSHA", *self._evalsha_args(event))  # type: ignore[no-untyped-call]
            return list(pipe.execute(raise_on_error=False))

    def _send_by_node(self, client: redis.RedisCluster, events: list[PreparedEvent]) -> list[Any]:
        """One plain pipeline per master, not redis-py's sync ClusterPipeline: after a lost
        reply (a timeout, a connection cut) that one sends each command again, one by one, so
        an event Redis ran would be stored twice, and a stuck master holds the batch for
        `socket_timeout` per event. Only what Redis did not run (MOVED, ASK, TRYAGAIN) is
        sent again here, once, after the slots are read anew."""
        replies: list[Any] = [None] * len(events)
        todo = list(range(len(events)))
        for attempt in (1, 2):
            groups: dict[str, tuple[Any, list[int]]] = {}
            for position in todo:
                node = client.get_node_from_key(events[position].channel)  # type: ignore[no-untyped-call]
                groups.setdefault(node.name, (node, []))[1].append(position)
            for node, positions in groups.values():
                with node.redis_connection.pipeline(transaction=False) as pipe:
                    for position in positions:
                        pipe.execute_command("EVALSHA", *self._evalsha_args(events[position]))
                    for position, reply in zip(
                        positions, pipe.execute(raise_on_error=False), strict=True
                    ):
                        replies[position] = reply
            todo = [i for i in todo if isinstance(replies[i], _NOT_RUN)]
            if not todo or attempt == 2:
                break
            client.nodes_manager.initialize()
        return replies

    def close(self) -> None:
        self._client.close()
