"""/metrics during a real run (docs/metrics.md): each close and rejection reason moves its
counter, the publish -> write latency histogram fills, and what the broker and the heartbeats
do is counted. Scraped and read with prometheus-client's parser (support.procs.Metrics)."""

from __future__ import annotations

import json
import re
import socket
import time
from collections.abc import Callable

from prometheus_client.parser import text_string_to_metric_families
from support.procs import Gateway, GatewayFactory, Metrics, RedisServer, free_port, wait_for
from support.sse import request

from integration.test_deploy_monitoring import documented_metrics
from sse_gateway.publish import Event, SyncPublisher

KEY = "metrics-run-publish-key-0123456789"
CLOSED = "sse_gateway_connections_closed_total"
REJECTED = "sse_gateway_connections_rejected_total"
LATENCY = "sse_gateway_delivery_latency_seconds"


def closed(gw: Gateway, reason: str) -> float:
    return gw.metrics().value(CLOSED, reason=reason)


def test_each_close_and_rejection_reason_moves_its_counter(
    gateway_factory: GatewayFactory, redis_server: RedisServer, ids: Callable[..., str]
) -> None:
    gw = gateway_factory(
        "--keepalive-period",
        "1s",
        "--header-timeout",
        "1s",
        "--max-connections-per-player",
        "1",
        "--event-buffer-size",
        "4",
        "--publish-api-key",
        KEY,
        redis=redis_server,
    )
    brand = ids("b")
    before = gw.metrics()
    for reason in ("client", "slow_consumer", "session_expired", "kicked", "drain", "error"):
        assert before.value(CLOSED, reason=reason) == 0, reason

    # client: the client goes away.
    gw.stream(brand, ids("p")).close()
    wait_for(lambda: closed(gw, "client") == 1, what="close reason client")

    # session_expired: a token valid for 2 s.
    player = ids("p")
    short = gw.open(headers={"Authorization": f"Bearer {gw.token(brand, player, ttl=2)}"})
    with short:
        short.wait_connected()
        wait_for(lambda: closed(gw, "session_expired") == 1, timeout=15, what="expiry")

    # kicked: POST /v1/disconnect.
    player = ids("p")
    with gw.stream(brand, player):
        answer = gw.request(
            "POST",
            "/v1/disconnect",
            headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"},
            body=json.dumps({"brand_id": brand, "player_id": player, "reason": "test"}).encode(),
        )
        assert answer.status == 200, answer
        wait_for(lambda: closed(gw, "kicked") == 1, what="close reason kicked")

    # slow_consumer: a client that stops reading, then events it cannot take.
    player = ids("p")
    publisher = SyncPublisher.from_url(redis_server.url)
    try:
        slow, _ = gw.player_stream(brand, player, rcvbuf=4096)
        with slow:
            pad = "z" * 8192
            for _ in range(20):
                events = [Event(brand, player, "big", {"n": n, "pad": pad}) for n in range(100)]
                publisher.publish_many(events)
                if closed(gw, "slow_consumer"):
                    break
            wait_for(lambda: closed(gw, "slow_consumer") == 1, timeout=30, what="slow consumer")

        # The histogram fills: stamped events written to a live stream, by event type.
        player = ids("p")
        with gw.stream(brand, player) as live:
            count_before = gw.metrics().value(LATENCY + "_count", event="bet.settled")
            publisher.publish_many(
                [Event(brand, player, "bet.settled", {"n": n}) for n in range(5)]
            )
            for _ in range(5):
                live.wait_event("bet.settled")
            after = gw.metrics()
            assert after.value(LATENCY + "_count", event="bet.settled") == count_before + 5
            assert after.value(LATENCY + "_bucket", event="bet.settled", le="+Inf") >= 5
            # On loopback, published and written within 10 s: every one in a finite bucket.
            assert after.value(LATENCY + "_bucket", event="bet.settled", le="10.0") >= 5
            assert after.value(LATENCY + "_sum", event="bet.settled") >= 0
    finally:
        publisher.close()

    # Rejections, one per reason, each answered by its status.
    rejected_before = gw.metrics()
    refusals = {
        "missing_token": gw.get("/v1/sse").status,
        "invalid_token": gw.get("/v1/sse", {"Authorization": "Bearer nope"}).status,
        "method_not_allowed": gw.request("DELETE", "/v1/sse").status,
        "request_header_fields_too_large": gw.get("/v1/sse", {"X-Big": "a" * 40_000}).status,
    }
    player = ids("p")
    with gw.stream(brand, player):
        refusals["too_many_connections"] = gw.get(
            "/v1/sse", {"Authorization": f"Bearer {gw.token(brand, player)}"}
        ).status
    # request_timeout: a head that never ends (SSE_HEADER_TIMEOUT 1s).
    with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as sock:
        sock.sendall(b"GET /v1/sse HTTP/1.1\r\nHost: x\r\n")
        refusals["request_timeout"] = int(sock.recv(64).split(b" ")[1])
    assert refusals == {
        "missing_token": 401,
        "invalid_token": 401,
        "method_not_allowed": 405,
        "request_header_fields_too_large": 431,
        "too_many_connections": 429,
        "request_timeout": 408,
    }
    after = gw.metrics()
    for reason in refusals:
        assert (
            after.value(REJECTED, reason=reason)
            == rejected_before.value(REJECTED, reason=reason) + 1
        ), reason

    # The broker and heartbeat counters moved; the process collector is there.
    assert after.value("sse_gateway_broker_subscribe_batches_total") >= 1
    assert after.value("sse_gateway_broker_unsubscribe_batches_total") >= 1
    assert after.value("sse_gateway_broker_connected") == 1
    assert after.value("process_open_fds") > 0
    assert after.value("sse_gateway_event_loop_lag_seconds") >= 0
    with gw.stream(brand, ids("p")) as beating:
        beats = gw.metrics().value("sse_gateway_heartbeats_sent_total")
        beating.wait_event("heartbeat", timeout=10)
        wait_for(
            lambda: gw.metrics().value("sse_gateway_heartbeats_sent_total") > beats,
            what="heartbeats counted",
        )

    # error: a client whose socket resets (RST) while the gateway writes to it.
    player = ids("p")
    sock = socket.create_connection(("127.0.0.1", gw.port))
    sock.sendall(
        f"GET /v1/sse HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {gw.token(brand, player)}"
        "\r\n\r\n".encode()
    )
    assert b" 200 " in sock.recv(4096)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    sock.close()  # linger 0: a reset, not a FIN
    wait_for(lambda: closed(gw, "error") == 1, what="the reset stream closed with error")


def test_drain_is_counted_before_the_process_exits(
    gateway_factory: GatewayFactory, redis_server: RedisServer, ids: Callable[..., str]
) -> None:
    """The drain closes streams with `event: close` `shutdown`: the metric says `drain`. Read
    on the metrics listener, which serves until the drain ends."""
    metrics_port = free_port()
    gw = gateway_factory(
        "--metrics-port", str(metrics_port), "--drain-seconds", "5s", redis=redis_server
    )
    stream = gw.stream(ids("b"), ids("p"))
    with stream:
        gw.terminate()
        stream.wait_event("close", timeout=15)
        seen = 0.0
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not seen:
            try:
                body = request(metrics_port, "GET", "/metrics", timeout=2).body.decode()
            except OSError:
                break
            seen = Metrics.parse(body).value(CLOSED, reason="drain")
        assert seen == 1


def test_every_documented_metric_is_served_and_every_served_one_is_documented(
    gateway: Gateway, ids: Callable[..., str]
) -> None:
    """docs/metrics.md is what the dashboard and alerts are checked against
    (test_deploy_monitoring): here it is checked against a running gateway."""
    with gateway.stream(ids("b"), ids("p")):
        families = {
            family.name: family.type
            for family in text_string_to_metric_families(gateway.metrics_text())
        }
    documented = documented_metrics()
    for name, doc in documented.items():
        if "_shard_" in name:  # Redis Cluster only: test_cluster checks them
            continue
        # The text parser names a counter family without its `_total`.
        if doc.kind in ("counter", ""):
            name = name.removesuffix("_total")
        if doc.kind:
            assert families.get(name) == doc.kind, (name, families.get(name))
        else:  # prometheus-client's process collector: the document does not give the type
            assert name in families, name
    ours = {name for name in families if name.startswith("sse_gateway_")}
    undocumented = {
        name for name in ours if name not in documented and f"{name}_total" not in documented
    }
    assert not undocumented, f"served but not in docs/metrics.md: {undocumented}"


def test_publish_lua_stamps_each_envelope_with_redis_time(
    redis_server: RedisServer, publisher: SyncPublisher, ids: Callable[..., str]
) -> None:
    brand, player = ids("b"), ids("p")
    r = redis_server.client()
    pubsub = r.pubsub()
    pubsub.subscribe(f"SSE::{brand}::{player}")
    try:
        assert pubsub.get_message(timeout=5)["type"] == "subscribe"
        seconds, micros = r.time()
        published = publisher.publish(brand, player, "t", {"n": 1})
        message = pubsub.get_message(timeout=5)
        assert message is not None and message["type"] == "message"
        envelope = json.loads(message["data"])
        assert envelope["id"] == published
        # Microseconds, written by hand (cjson would round to 14 digits): six decimals.
        assert re.fullmatch(rb".*\"ts\":\d{10}\.\d{6}\}", message["data"])
        assert seconds + micros / 1e6 <= envelope["ts"] < seconds + micros / 1e6 + 5
        # The stamp is not part of the history entry: replays never carry it.
        assert set(r.xrange(f"SSE::{brand}::{player}")[0][1]) == {b"t", b"d"}
    finally:
        pubsub.close()


def test_the_embedded_broker_stamps_too(
    gateway_factory: GatewayFactory, ids: Callable[..., str]
) -> None:
    gw = gateway_factory("--publish-api-key", KEY)  # no Redis: the embedded broker
    brand, player = ids("b"), ids("p")
    with gw.stream(brand, player) as live:
        answer = gw.request(
            "POST",
            "/v1/publish",
            headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"},
            body=json.dumps(
                {"brand_id": brand, "player_id": player, "type": "t", "data": 1}
            ).encode(),
        )
        assert answer.status == 202, answer
        live.wait_event("t")
    assert gw.metrics().value(LATENCY + "_count", event="t") == 1


def test_metrics_max_brands_sums_the_rest_under_other(
    gateway_factory: GatewayFactory, redis_server: RedisServer, ids: Callable[..., str]
) -> None:
    gw = gateway_factory("--metrics-max-brands", "1", redis=redis_server)
    first, second, third = ids("b"), ids("b"), ids("b")
    with gw.stream(first, ids("p")), gw.stream(second, ids("p")), gw.stream(third, ids("p")):
        metrics = gw.metrics()
        assert metrics.value("sse_gateway_connections", brand=first) == 1
        assert metrics.value("sse_gateway_connections", brand="other") == 2
        assert metrics.get("sse_gateway_connections", brand=second) is None
