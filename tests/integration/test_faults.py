"""Redis going away and coming back, Redis absent at start, a client that stops reading."""

from __future__ import annotations

import json
import time
from collections.abc import Callable

import pytest
from support.asserts import assert_close_answer, assert_error, assert_retry_after
from support.procs import GatewayFactory, Metrics, RedisServer, free_port, publish, wait_for
from support.sse import SSEClient, request


def readyz(port: int) -> tuple[int, dict[str, object]]:
    response = request(port, "GET", "/readyz", timeout=5)
    return response.status, response.json()


def rejected(port: int, reason: str) -> float:
    response = request(port, "GET", "/metrics", timeout=5)
    return Metrics.parse(response.body.decode()).value(
        "sse_gateway_connections_rejected_total", reason=reason
    )


def assert_broker_unavailable_refusals(port: int, token: str) -> None:
    """A stream request while the broker is down, without and with `Accept:
    text/event-stream`: 503 JSON, then the 200 close answer; both counted as refusals."""
    before = rejected(port, "broker_unavailable")
    auth = {"Authorization": f"Bearer {token}"}
    response = request(port, "GET", "/v1/sse", auth)
    assert_error(response, 503, "broker_unavailable")
    assert_retry_after(response)
    answer = request(port, "GET", "/v1/sse", {**auth, "Accept": "text/event-stream"})
    assert_close_answer(answer, "broker_unavailable", 3000)
    assert rejected(port, "broker_unavailable") == before + 2


@pytest.mark.timeout(150)
def test_redis_killed_and_restarted_while_streaming(
    gateway_factory: GatewayFactory, fresh_redis: RedisServer
) -> None:
    gw = gateway_factory("--keepalive-period", "200ms", redis=fresh_redis)
    wait_for(lambda: readyz(gw.port)[0] == 200, what="readyz 200 before the fault")
    channel = "SSE::fb::fp"
    with gw.stream("fb", "fp") as client:
        r = fresh_redis.client()
        publish(r, "fb", "fp", {"type": "before", "data": 0})
        assert client.wait_event("before").json() == 0
        r.close()
        assert gw.metrics().value("sse_gateway_broker_connected") == 1
        reconnects_before = gw.metrics().value("sse_gateway_broker_reconnects_total")

        fresh_redis.kill()

        wait_for(lambda: readyz(gw.port)[0] == 503, timeout=30, what="/readyz 503 (broker down)")
        body = readyz(gw.port)[1]
        assert body == {"status": "not_ready", "reason": "broker_disconnected"}, body
        assert gw.metrics().value("sse_gateway_broker_connected") == 0
        # The open stream lives on: heartbeats keep coming while Redis is down.
        client.drain_available(0.05)
        for _ in range(3):
            assert client.next_event(timeout=10).event == "heartbeat"
        # New streams are refused while the broker is down (they could not get events): an
        # EventSource with a 200 `event: close` it survives, any other client with a 503.
        assert_broker_unavailable_refusals(gw.port, gw.token("fb", "other"))
        assert gw.get("/healthz").status == 200

        fresh_redis.start()

        wait_for(lambda: readyz(gw.port)[0] == 200, timeout=60, what="/readyz back to 200")
        r = fresh_redis.client()
        try:
            wait_for(
                lambda: dict(r.pubsub_numsub(channel)).get(channel.encode(), 0) == 1,
                timeout=30,
                what="the gateway to resubscribe the open stream's channel",
            )
            publish(r, "fb", "fp", {"type": "after-restart", "data": 1, "id": "r-1"})
            event = client.wait_event("after-restart", timeout=15)
            assert (event.id, event.json()) == ("r-1", 1)
        finally:
            r.close()
        assert not client.eof
        metrics = gw.metrics()
        assert metrics.value("sse_gateway_broker_connected") == 1
        assert metrics.value("sse_gateway_broker_reconnects_total") >= reconnects_before + 1
        # And new streams work again.
        with gw.stream("fb", "new") as newcomer:
            r = fresh_redis.client()
            publish(r, "fb", "new", {"type": "hello", "data": 2})
            r.close()
            assert newcomer.wait_event("hello").json() == 2


@pytest.mark.timeout(90)
def test_redis_unreachable_at_start(
    gateway_factory: GatewayFactory, tmp_path_factory: pytest.TempPathFactory
) -> None:
    port = free_port()
    gw = gateway_factory(
        "--keepalive-period", "200ms", redis=f"redis://127.0.0.1:{port}/0", ready=False
    )
    assert gw.get("/healthz").status == 200
    assert gw.get("/healthz").json() == {"status": "ok"}
    status, body = readyz(gw.port)
    assert (status, body) == (503, {"status": "not_ready", "reason": "broker_disconnected"})
    assert_broker_unavailable_refusals(gw.port, gw.token("ub", "up"))
    assert gw.running()
    # When Redis shows up on that port later, the gateway connects on its own.
    server = RedisServer(tmp_path_factory.mktemp("late-redis"), port=port).start()
    try:
        wait_for(lambda: readyz(gw.port)[0] == 200, timeout=60, what="readyz after Redis starts")
        with gw.stream("ub", "up") as client:
            r = server.client()
            publish(r, "ub", "up", {"type": "late", "data": "ok"})
            r.close()
            assert client.wait_event("late").json() == "ok"
    finally:
        server.stop()


@pytest.mark.timeout(150)
def test_slow_consumer_is_disconnected_not_buffered(
    gateway_factory: GatewayFactory, redis_server: RedisServer, ids: Callable[..., str]
) -> None:
    gw = gateway_factory("--event-buffer-size", "5", redis=redis_server)
    brand, slow_player, ok_player = ids("b"), ids("slow"), ids("ok")
    slow = SSEClient.connect(
        gw.port,
        "/v1/sse",
        {"Authorization": f"Bearer {gw.token(brand, slow_player)}"},
        rcvbuf=4096,
    )
    healthy = gw.stream(brand, ok_player)
    r = redis_server.client()
    try:
        assert slow.status == 200
        slow.wait_connected()
        payload = json.dumps({"type": "big", "data": "x" * 60_000})
        # Far more than kernel buffers hold; the slow client reads nothing.
        deadline = time.monotonic() + 60
        sent = 0
        while (
            gw.metrics().value("sse_gateway_connections_closed_total", reason="slow_consumer") < 1
        ):
            assert time.monotonic() < deadline, f"not disconnected after {sent} big events"
            for _ in range(50):
                r.publish(f"SSE::{brand}::{slow_player}", payload)
            sent += 50
        assert slow.wait_closed(timeout=60), "the slow stream was not closed"
        # Everything the slow client did get was whole events, then a cut: a reset, so no
        # last chunk (a client must not take it for a graceful end) and no `event: close`.
        assert all(f.event in ("connected", "big", "heartbeat") for f in slow.frames if f.has_data)
        assert not slow.ended
        # The healthy connection and the gateway are fine.
        publish(r, brand, ok_player, {"type": "fine", "data": 1})
        assert healthy.wait_event("fine").json() == 1
        assert gw.metrics().total("sse_gateway_connections") == 1
        assert gw.running()
    finally:
        slow.close()
        healthy.close()
        r.close()


@pytest.mark.timeout(240)
def test_every_channel_resubscribed_after_restart(
    gateway_factory: GatewayFactory, fresh_redis: RedisServer
) -> None:
    """More channels than one SUBSCRIBE batch (~1000): all of them come back after a restart."""
    count = 1100
    gw = gateway_factory(redis=fresh_redis)
    clients: list[SSEClient] = []
    try:
        for i in range(count):
            clients.append(gw.stream("many", f"p{i}", wait_connected=False))
        for client in clients:
            client.wait_connected(timeout=60)
        channels = [f"SSE::many::p{i}" for i in range(count)]
        fresh_redis.kill()
        wait_for(lambda: readyz(gw.port)[0] == 503, timeout=30, what="/readyz 503")
        fresh_redis.start()
        wait_for(lambda: readyz(gw.port)[0] == 200, timeout=60, what="/readyz 200 again")
        r = fresh_redis.client()
        try:
            wait_for(
                lambda: set(dict(r.pubsub_numsub(*channels)).values()) == {1},
                timeout=60,
                what=f"all {count} channels resubscribed",
            )
            assert gw.metrics().value("sse_gateway_broker_subscribed_channels") == count
            for i in range(count):
                publish(r, "many", f"p{i}", {"type": "back", "data": i})
            for i, client in enumerate(clients):
                assert client.wait_event("back", timeout=30).json() == i
        finally:
            r.close()
    finally:
        for client in clients:
            client.close()
