"""Issue 9 item 3b: history ids that go backwards never hide live events silently.

A channel whose history no longer holds the newest id it sent starts over when the history
holds nothing at or below that id (Redis restarted empty: every event it holds or gets is
new), and closes its streams with `history_gap` when it does (an older snapshot: which of
those events each stream has cannot be told); a reconnect then gets `recovered: false` and
every live event after.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable

import redis
from support.procs import GatewayFactory, RedisServer, wait_for
from support.sse import SSEClient, read_events

from sse_gateway.publish import Event, SyncPublisher

FAR_FUTURE_ID = "99999999999999-0"


def publish_with_id(r: redis.Redis, brand: str, player: str, entry_id: str, data: int) -> None:
    """What publish.lua does, with an explicit entry id (ids from a clock far ahead)."""
    key = f"SSE::{brand}::{player}"
    r.xadd(key, {"t": "n", "d": str(data)}, id=entry_id)
    r.publish(key, json.dumps({"type": "n", "data": data, "id": entry_id}))


def subscribed(r: redis.Redis, channel: str) -> bool:
    [(_, count)] = r.pubsub_numsub(channel)
    return int(count) > 0


def restart_empty(server: RedisServer, gateway_ready: Callable[[], bool]) -> None:
    server.kill()
    wait_for(lambda: not gateway_ready(), what="the gateway to notice Redis is down")
    server.start()
    wait_for(gateway_ready, timeout=60, what="the gateway to reconnect")


def next_non_heartbeat(client: SSEClient, timeout: float = 20.0) -> str:
    deadline = time.monotonic() + timeout
    while True:
        event = client.next_event(timeout=max(0.1, deadline - time.monotonic()))
        if event.event != "heartbeat":
            return event.event


def test_a_restart_from_an_older_snapshot_closes_the_channels_streams_with_history_gap(
    gateway_factory: GatewayFactory, fresh_redis: RedisServer, ids: Callable[..., str]
) -> None:
    """Redis comes back from a snapshot older than the channel's last id: which of the events it
    holds the stream has cannot be told, so the stream is closed, not fed in silence."""
    gateway = gateway_factory(redis=fresh_redis)
    brand, player = ids("b"), ids("p")
    channel = f"SSE::{brand}::{player}"
    client, _ = gateway.player_stream(brand, player)
    with client:
        publisher = SyncPublisher.from_url(fresh_redis.url)
        try:
            first = str(publisher.publish(brand, player, "n", 0))
        finally:
            publisher.close()
        r = fresh_redis.client()
        r.save()  # the snapshot Redis restarts from: it holds the first event only
        publish_with_id(r, brand, player, FAR_FUTURE_ID, 1)
        assert [e.id for e in read_events(client, 2)] == [first, FAR_FUTURE_ID]
        r.close()

        restart_empty(fresh_redis, lambda: gateway.readyz()[0] == 200)
        close = client.wait_event("close", timeout=20)
        assert close.json()["reason"] == "history_gap"
        assert close.retry is not None
        assert client.wait_closed()
    metrics = gateway.metrics()
    assert metrics.value("sse_gateway_refills_total", outcome="history_gap") == 1
    assert metrics.value("sse_gateway_connections_closed_total", reason="history_gap") == 1

    # The client comes back with the id it had: not recoverable, then every live event.
    client, connected = gateway.player_stream(brand, player, FAR_FUTURE_ID)
    with client:
        assert connected["recovered"] is False
        r = fresh_redis.client()
        wait_for(lambda: subscribed(r, channel), what="the new stream's subscription")
        r.close()
        publisher = SyncPublisher.from_url(fresh_redis.url)
        try:
            sent = [str(publisher.publish(brand, player, "n", n)) for n in range(2, 5)]
        finally:
            publisher.close()
        assert [e.id for e in read_events(client, 3)] == sent


def test_a_restart_empty_with_lower_ids_starts_over_and_delivers_them(
    gateway_factory: GatewayFactory, fresh_redis: RedisServer, ids: Callable[..., str]
) -> None:
    """The channel had sent an id higher than any the restarted Redis gives: on the old code
    every later event was dropped in silence while /readyz said 200."""
    gateway = gateway_factory(redis=fresh_redis)
    brand, player = ids("b"), ids("p")
    channel = f"SSE::{brand}::{player}"
    client, _ = gateway.player_stream(brand, player)
    with client:
        r = fresh_redis.client()
        publish_with_id(r, brand, player, FAR_FUTURE_ID, 0)
        assert [e.id for e in read_events(client, 1)] == [FAR_FUTURE_ID]
        r.close()
        restart_empty(fresh_redis, lambda: gateway.readyz()[0] == 200)
        r = fresh_redis.client()
        wait_for(lambda: subscribed(r, channel), timeout=30, what="the resubscription")
        wait_for(
            lambda: (
                gateway.metrics().value("sse_gateway_refills_total", outcome="history_restarted")
                == 1
            ),
            what="the channel's refill to start over",
        )
        r.close()
        publisher = SyncPublisher.from_url(fresh_redis.url)
        try:
            sent = [str(publisher.publish(brand, player, "n", n)) for n in range(1, 4)]
        finally:
            publisher.close()
        assert [e.id for e in read_events(client, 3)] == sent
        assert not client.eof


def test_a_restart_with_only_newer_ids_starts_over_without_a_close(
    gateway_factory: GatewayFactory, fresh_redis: RedisServer, ids: Callable[..., str]
) -> None:
    gateway = gateway_factory(redis=fresh_redis)
    brand, player = ids("b"), ids("p")
    client, _ = gateway.player_stream(brand, player)
    with client:
        publisher = SyncPublisher.from_url(fresh_redis.url)
        try:
            first = str(publisher.publish(brand, player, "n", 0))
        finally:
            publisher.close()
        assert [e.id for e in read_events(client, 1)] == [first]
        restart_empty(fresh_redis, lambda: gateway.readyz()[0] == 200)
        publisher = SyncPublisher.from_url(fresh_redis.url)
        try:
            after = [
                str(e)
                for e in publisher.publish_many([Event(brand, player, "n", n) for n in range(1, 4)])
            ]
        finally:
            publisher.close()
        assert [e.id for e in read_events(client, 3)] == after
    assert gateway.metrics().value("sse_gateway_refills_total", outcome="history_restarted") == 1
