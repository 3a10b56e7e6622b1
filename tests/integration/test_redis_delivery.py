"""Events published on Redis reach exactly the right streams, encoded exactly once, safely."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
import redis
from support.procs import Gateway, GatewayFactory, RedisServer, publish, wait_for
from support.sse import SSEClient, SSEEvent

pytestmark = pytest.mark.timeout(90)


def not_heartbeat(frame: SSEEvent) -> bool:
    return frame.event != "heartbeat"


def events_until(client: SSEClient, marker: str, timeout: float = 15.0) -> list[SSEEvent]:
    """Non-heartbeat events up to and including the one of type `marker`."""
    frames = client.read_until(lambda f: f.event == marker and f.has_data, timeout)
    return [f for f in frames if not_heartbeat(f)]


def test_event_with_id(gateway: Gateway, r: redis.Redis, ids: Callable[..., str]) -> None:
    brand, player = ids("b"), ids("p")
    with gateway.stream(brand, player) as client:
        publish(
            r, brand, player, {"type": "notification", "data": {"title": "hi", "n": 1}, "id": "1-0"}
        )
        event = client.read_until(not_heartbeat)[-1]
    assert event.event == "notification"
    assert event.id == "1-0"
    assert event.data == '{"title":"hi","n":1}'  # compact JSON, key order kept


def test_event_without_id_has_no_id_line(
    gateway: Gateway, r: redis.Redis, ids: Callable[..., str]
) -> None:
    brand, player = ids("b"), ids("p")
    with gateway.stream(brand, player) as client:
        publish(r, brand, player, {"type": "with-id", "data": 1, "id": "a:1"})
        publish(r, brand, player, {"type": "no-id", "data": 2})
        events = events_until(client, "no-id")
    assert [(e.event, e.id) for e in events] == [("with-id", "a:1"), ("no-id", None)]


def test_published_json_is_re_serialised_compactly(
    gateway: Gateway, r: redis.Redis, ids: Callable[..., str]
) -> None:
    brand, player = ids("b"), ids("p")
    pretty = '{\n  "type" : "pretty",\n  "data" : {\n    "a" : [ 1 , 2 ],\n    "b" : "x"\n  }\n}'
    with gateway.stream(brand, player) as client:
        publish(r, brand, player, pretty)
        event = client.wait_event("pretty")
    # exactly the compact text: one data line, no whitespace of the pretty input
    assert event.data == '{"a":[1,2],"b":"x"}'


@pytest.mark.parametrize(
    "value",
    [
        None,
        0,
        -1.5,
        True,
        "text",
        "",
        [],
        {},
        [1, {"a": [None, "b"]}],
        "ünïcödé ✓ 🎉 \u2028 \u2029 \u0085 \t",
        {"nested": {"deep": {"k": "v\\n"}}},
    ],
    ids=lambda v: repr(v)[:16],
)
def test_data_values_round_trip(
    gateway: Gateway, r: redis.Redis, ids: Callable[..., str], value: Any
) -> None:
    brand, player = ids("b"), ids("p")
    with gateway.stream(brand, player) as client:
        publish(r, brand, player, {"type": "value", "data": value})
        event = client.wait_event("value")
    assert event.json() == value


FORGERY = "\n\nevent: forged\ndata: x\r\n"
FORGERIES = [
    FORGERY,
    "line1\rline2\r\nline3\nline4",
    "\r\rid: 666\r\r",
    {"k": "\n\nevent: forged\n\n", "v": ["\r\n\r\nretry: 1\r\n\r\n"]},
]


@pytest.mark.parametrize("value", FORGERIES, ids=["lf", "mixed", "cr-id", "nested"])
def test_line_breaks_in_data_cannot_forge_frames(
    gateway: Gateway, r: redis.Redis, ids: Callable[..., str], value: Any
) -> None:
    brand, player = ids("b"), ids("p")
    with gateway.stream(brand, player) as client:
        publish(r, brand, player, {"type": "notification", "data": value, "id": "f-1"})
        publish(r, brand, player, {"type": "after", "data": "end"})
        events = events_until(client, "after")
        # Keep reading briefly: anything forged would sit just behind the real events.
        events += [f for f in client.drain_available(0.3) if not_heartbeat(f)]
    assert [e.event for e in events] == ["notification", "after"], events
    assert events[0].json() == value
    assert events[0].id == "f-1"
    # The one `retry:` of the stream is the configured one, inside `connected`.
    assert client.retries == [3000], f"a forged retry: was parsed: {client.retries}"
    assert client.frames[0].event == "connected" and client.frames[0].retry == 3000


def test_multi_tab_each_connection_gets_every_event(
    gateway: Gateway, r: redis.Redis, ids: Callable[..., str]
) -> None:
    brand, player = ids("b"), ids("p")
    tabs = [gateway.stream(brand, player) for _ in range(3)]
    try:
        for i in range(5):
            publish(r, brand, player, {"type": "tick", "data": i, "id": f"t-{i}"})
        publish(r, brand, player, {"type": "done", "data": None})
        for tab in tabs:
            events = events_until(tab, "done")
            assert [(e.event, e.id, e.data) for e in events] == [
                *[("tick", f"t-{i}", str(i)) for i in range(5)],
                ("done", None, "null"),
            ]
    finally:
        for tab in tabs:
            tab.close()


def test_brand_and_player_isolation(
    gateway: Gateway, r: redis.Redis, ids: Callable[..., str]
) -> None:
    b1, b2, p1, p2 = ids("b1"), ids("b2"), ids("p1"), ids("p2")
    me = gateway.stream(b1, p1)
    same_brand_other_player = gateway.stream(b1, p2)
    same_player_other_brand = gateway.stream(b2, p1)
    try:
        publish(r, b1, p2, {"type": "for-b1-p2", "data": "secret"})
        publish(r, b2, p1, {"type": "for-b2-p1", "data": "secret"})
        r.publish(f"SSE::{b1}::*", json.dumps({"type": "glob", "data": 1}))
        r.publish(f"SSE::{b1}::{p1}*", json.dumps({"type": "glob", "data": 2}))
        r.publish(f"SSE::{b1}", json.dumps({"type": "prefix", "data": 3}))
        r.publish(f"sse::{b1}::{p1}", json.dumps({"type": "case", "data": 4}))
        r.publish(f"SSE::{b1}::{p1}::x", json.dumps({"type": "suffix", "data": 5}))
        publish(r, b1, p1, {"type": "mine", "data": "ok"})
        mine = events_until(me, "mine")
        mine += [f for f in me.drain_available(0.3) if not_heartbeat(f)]
        assert [e.event for e in mine] == ["mine"], mine
        assert [e.event for e in events_until(same_brand_other_player, "for-b1-p2")] == [
            "for-b1-p2"
        ]
        assert [e.event for e in events_until(same_player_other_brand, "for-b2-p1")] == [
            "for-b2-p1"
        ]
    finally:
        for client in (me, same_brand_other_player, same_player_other_brand):
            client.close()


BAD_MESSAGES: list[tuple[str, bytes]] = [
    ("not_json", b"this is not json"),
    ("not_json", b'{"type": "x", "data": '),
    ("not_object", b'["type", "data"]'),
    ("not_object", b'"just a string"'),
    ("not_object", b"42"),
    ("missing_type", b'{"data": 1}'),
    ("bad_type", b'{"type": "a b", "data": 1}'),
    ("bad_type", b'{"type": "", "data": 1}'),
    ("bad_type", b'{"type": "x\\nevent: forged", "data": 1}'),
    ("bad_type", json.dumps({"type": "t" * 65, "data": 1}).encode()),
    ("reserved_type", b'{"type": "connected", "data": {}}'),
    ("reserved_type", b'{"type": "heartbeat", "data": {"ts": 1}}'),
    ("reserved_type", b'{"type": "error", "data": 1}'),
    ("reserved_type", b'{"type": "close", "data": 1}'),
    ("missing_data", b'{"type": "x"}'),
    ("bad_id", b'{"type": "x", "data": 1, "id": "has space"}'),
    ("bad_id", b'{"type": "x", "data": 1, "id": "a\\nb"}'),
    ("bad_id", b'{"type": "x", "data": 1, "id": ""}'),
    ("bad_id", json.dumps({"type": "x", "data": 1, "id": "i" * 129}).encode()),
    ("too_large", json.dumps({"type": "x", "data": "a" * 2000}).encode()),
    ("not_utf8", b'{"type": "x", "data": "\xff\xfe"}'),
]


@pytest.mark.timeout(120)
def test_bad_published_messages_are_dropped_and_counted(
    gateway_factory: GatewayFactory,
    r: redis.Redis,
    redis_server: RedisServer,
    ids: Callable[..., str],
) -> None:
    gw = gateway_factory("--max-event-bytes", "1024", redis=redis_server)
    brand, player = ids("b"), ids("p")
    channel = f"SSE::{brand}::{player}"
    other = ids("bystander")
    with gw.stream(brand, player) as client, gw.stream(brand, other) as bystander:
        for i, (reason, payload) in enumerate(BAD_MESSAGES):
            r.publish(channel, payload)
            publish(r, brand, player, {"type": "good", "data": i, "id": f"g-{i}"})
            events = events_until(client, "good")
            assert [(e.event, e.id, e.data) for e in events] == [("good", f"g-{i}", str(i))], (
                f"after a bad message ({reason}: {payload[:60]!r}) got {events!r}"
            )
        # The largest message that fits is still delivered (the limit is not off by a lot).
        filler = "a" * (1024 - len(json.dumps({"type": "fits", "data": ""})))
        fits = json.dumps({"type": "fits", "data": filler})
        assert len(fits.encode()) == 1024
        r.publish(channel, fits)
        assert client.wait_event("fits").json() == filler
        # Other connections of the gateway carry on.
        publish(r, brand, other, {"type": "still", "data": 1})
        assert bystander.wait_event("still").json() == 1
    assert gw.running()
    metrics = gw.metrics()
    expected: dict[str, int] = {}
    for reason, _ in BAD_MESSAGES:
        expected[reason] = expected.get(reason, 0) + 1
    for reason, count in expected.items():
        assert metrics.value("sse_gateway_events_dropped_total", reason=reason) == count, reason
    assert metrics.total("sse_gateway_events_dropped_total") == len(BAD_MESSAGES)
    warnings = [line for line in gw.logs().splitlines() if "invalid published message" in line]
    assert len(warnings) == len(BAD_MESSAGES), warnings
    assert all(channel in line for line in warnings), warnings


def numsub(r: redis.Redis, channel: str) -> int:
    counts = dict(r.pubsub_numsub(channel))
    return int(counts.get(channel.encode(), 0))


def test_refcounted_subscribe_and_unsubscribe(
    gateway: Gateway, r: redis.Redis, ids: Callable[..., str]
) -> None:
    brand, player = ids("b"), ids("p")
    channel = f"SSE::{brand}::{player}"
    assert numsub(r, channel) == 0
    tab1 = gateway.stream(brand, player)
    tab2 = gateway.stream(brand, player)
    try:
        assert numsub(r, channel) == 1  # subscribed before `connected`, once for both tabs
        tab1.close()
        wait_for(
            lambda: gateway.metrics().total("sse_gateway_connections") == 1,
            what="the gateway to see the first tab close",
        )
        assert numsub(r, channel) == 1
        publish(r, brand, player, {"type": "still-subscribed", "data": 1})
        assert tab2.wait_event("still-subscribed").json() == 1
    finally:
        tab1.close()
        tab2.close()
    wait_for(lambda: numsub(r, channel) == 0, timeout=20, what="UNSUBSCRIBE after the last tab")
    # A new tab subscribes again.
    with gateway.stream(brand, player) as tab3:
        assert numsub(r, channel) == 1
        publish(r, brand, player, {"type": "again", "data": 2})
        assert tab3.wait_event("again").json() == 2
    wait_for(lambda: numsub(r, channel) == 0, timeout=20, what="UNSUBSCRIBE after tab3")


def gateway_clients(r: redis.Redis) -> list[dict[str, Any]]:
    own = r.client_id()
    return [c for c in r.client_list() if int(c["id"]) != own]


@pytest.mark.timeout(180)
def test_one_redis_connection_for_100_clients(
    gateway_factory: GatewayFactory, fresh_redis: RedisServer
) -> None:
    r = fresh_redis.client()
    assert gateway_clients(r) == []
    gw = gateway_factory(redis=fresh_redis)
    wait_for(lambda: gw.readyz()[0] == 200, what="readyz")
    clients: list[SSEClient] = []
    try:
        for i in range(100):
            clients.append(gw.stream("many", f"p{i}", wait_connected=False))
        for client in clients:
            client.wait_connected(timeout=30)
        conns = gateway_clients(r)
        assert 1 <= len(conns) <= 2, conns
        subscribed = max(int(c.get("sub", 0)) for c in conns)
        assert subscribed == 100, f"expected 100 channels on one connection: {conns}"
        counts = dict(r.pubsub_numsub(*[f"SSE::many::p{i}" for i in range(100)]))
        assert set(counts.values()) == {1}, counts
        for i in (0, 42, 99):
            publish(r, "many", f"p{i}", {"type": "hello", "data": i})
            assert clients[i].wait_event("hello").json() == i
        assert gw.metrics().value("sse_gateway_broker_subscribed_channels") == 100
    finally:
        for client in clients:
            client.close()
        r.close()


def test_event_published_right_after_connected_always_arrives(
    gateway: Gateway, r: redis.Redis, ids: Callable[..., str]
) -> None:
    """`connected` is written only once the subscription is active: no window to lose events."""
    brand = ids("b")
    for i in range(40):
        player = f"p{i}"  # a new channel every time: each one needs a fresh SUBSCRIBE
        with gateway.stream(brand, player) as client:
            receivers = publish(r, brand, player, {"type": "first", "data": i})
            assert receivers == 1, f"iteration {i}: nobody subscribed after `connected`"
            assert client.wait_event("first").json() == i


def test_each_message_is_received_once_and_delivered_per_connection(
    gateway_factory: GatewayFactory, redis_server: RedisServer, ids: Callable[..., str]
) -> None:
    gw = gateway_factory("--keepalive-period", "1h", redis=redis_server)
    brand, player = ids("b"), ids("p")
    tabs = [gw.stream(brand, player) for _ in range(3)]
    r = redis_server.client()
    try:
        before = gw.metrics()
        for i in range(2):
            publish(r, brand, player, {"type": "count", "data": i})
        for tab in tabs:
            events_until(tab, "count")
            events_until(tab, "count")
        after = gw.metrics()
    finally:
        for tab in tabs:
            tab.close()
        r.close()
    received = after.value("sse_gateway_events_received_total") - before.value(
        "sse_gateway_events_received_total"
    )
    delivered = after.value("sse_gateway_events_delivered_total") - before.value(
        "sse_gateway_events_delivered_total"
    )
    assert received == 2  # one subscription for the three tabs
    assert delivered == 6
