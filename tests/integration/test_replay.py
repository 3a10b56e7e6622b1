"""Last-Event-ID replay: a client that comes back gets what it missed, once, in order, then live."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import quote

import pytest
import redis
from support.asserts import assert_error
from support.procs import Gateway, GatewayFactory, RedisServer, publish, wait_for
from support.sse import (
    SSEClient,
    SSEEvent,
    assert_position_id,
    assert_quiet,
    read_events,
    read_through,
)

from sse_gateway.publish import Event, SyncPublisher

pytestmark = pytest.mark.timeout(90)

API_KEY = "replay-test-publish-key-0123456789abcdef"


# --------------------------------------------------------------------------- helpers


def resume_id(client: SSEClient) -> str | None:
    """The `id:` of the stream's `connected` frame: where a reconnect would resume from."""
    assert client.connected is not None, "no `connected` read yet"
    return client.connected.id


def stream_id(value: str | None) -> tuple[int, int]:
    assert value is not None, "event without id"
    ms, _, seq = value.partition("-")
    return int(ms), int(seq)


class ContinuousPublisher(threading.Thread):
    """Publishes events for one player back to back until stopped; records the ids returned."""

    def __init__(self, url: str, brand: str, player: str, *, limit: int, pause: float) -> None:
        super().__init__(daemon=True)
        self.publisher = SyncPublisher.from_url(url, history_size=5000)
        self.brand, self.player = brand, player
        self.limit, self.pause = limit, pause
        self.ids: list[str] = []
        self.stop_flag = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            n = 0
            while not self.stop_flag.is_set() and n < self.limit:
                self.ids.append(
                    self.publisher.publish(self.brand, self.player, "tick", {"n": n, "pad": "x"})
                )
                n += 1
                if self.pause:
                    time.sleep(self.pause)
        except BaseException as exc:  # reported by finish()
            self.error = exc
        finally:
            self.publisher.close()

    def finish(self, timeout: float = 30.0) -> list[str]:
        self.stop_flag.set()
        self.join(timeout)
        assert not self.is_alive(), "publisher thread did not stop"
        if self.error is not None:
            raise self.error
        return self.ids


# --------------------------------------------------------------------------- tests


@pytest.fixture
def gateway200(gateway_factory: GatewayFactory, redis_server: RedisServer) -> Gateway:
    """A gateway keeping 200 events per player (publishers below use the same size)."""
    return gateway_factory("--history-size", "200", redis=redis_server)


@pytest.fixture
def publisher200(redis_server: RedisServer) -> Iterator[SyncPublisher]:
    pub = SyncPublisher.from_url(redis_server.url, history_size=200)
    try:
        yield pub
    finally:
        pub.close()


@pytest.mark.parametrize("via", ["header", "query"])
def test_missed_events_replayed_in_order_then_live(
    gateway200: Gateway, publisher200: SyncPublisher, ids: Callable[..., str], via: str
) -> None:
    gateway, publisher = gateway200, publisher200
    brand, player = ids("b"), ids("p")
    client, connected = gateway.player_stream(brand, player)
    assert "recovered" not in connected
    assert_position_id(resume_id(client))  # a new player: empty history
    first = publisher.publish(brand, player, "notification", {"n": -1})
    [event] = read_events(client, 1)
    assert event.id == first
    client.close()

    missed = publisher.publish_many(
        [Event(brand, player, "notification", {"n": n, "text": f"event {n}"}) for n in range(100)]
    )
    assert [stream_id(i) for i in missed] == sorted({stream_id(i) for i in missed})

    client, connected = gateway.player_stream(brand, player, event.id, query=via == "query")
    with client:
        assert connected["recovered"] is True
        assert resume_id(client) == event.id  # the client's own id
        replayed = read_events(client, 100)
        assert [e.id for e in replayed] == list(missed)
        assert [e.event for e in replayed] == ["notification"] * 100
        assert [e.json() for e in replayed] == [{"n": n, "text": f"event {n}"} for n in range(100)]
        assert_quiet(client)  # exactly those 100: no duplicate, nothing older

        live = [publisher.publish(brand, player, "live", {"k": k}) for k in range(5)]
        got = read_events(client, 5)
        assert [(e.id, e.event, e.json()) for e in got] == [
            (i, "live", {"k": k}) for k, i in enumerate(live)
        ]
        assert_quiet(client)

    metrics = gateway.metrics()
    assert metrics.value("sse_gateway_replays_total", outcome="recovered") >= 1
    assert metrics.value("sse_gateway_events_replayed_total") >= 100


def live_and_replayed(
    gateway: Gateway, publisher: SyncPublisher, brand: str, player: str, data: Any
) -> tuple[str, SSEEvent, SSEEvent]:
    """The same event received live, then again by a replay: (id, live, replayed)."""
    client, _ = gateway.player_stream(brand, player)
    with client:
        anchor = publisher.publish(brand, player, "anchor", 0)
        read_through(client, anchor)
        event_id = publisher.publish(brand, player, "notice.v1:x", data)
        [live] = read_events(client, 1)
    client, connected = gateway.player_stream(brand, player, anchor)
    with client:
        assert connected["recovered"] is True
        [replayed] = read_events(client, 1)
    return event_id, live, replayed


def test_replayed_event_is_identical_to_the_live_one(
    gateway: Gateway, publisher: SyncPublisher, ids: Callable[..., str]
) -> None:
    data = {
        "title": 'héllo ✓ "quoted" \u2028',
        "lines": "a\nb\r\nc",
        "n": 1.5,
        "int64": -(2**63),
        "e": 1e300,
        "z": None,
        "nested": [{"k": [True, False]}],
    }
    event_id, live, replayed = live_and_replayed(gateway, publisher, ids("b"), ids("p"), data)
    assert (replayed.id, replayed.event, replayed.data) == (live.id, live.event, live.data)
    assert replayed.id == event_id
    assert replayed.json() == live.json() == data


def test_big_integers_are_the_same_live_and_replayed(
    gateway: Gateway, publisher: SyncPublisher, ids: Callable[..., str]
) -> None:
    data = {"big": 2**70 + 1, "neg": -(2**64) - 1}
    _, live, replayed = live_and_replayed(gateway, publisher, ids("b"), ids("p"), data)
    assert replayed.json() == data
    assert live.json() == data, f"live frame data: {live.data}"


def test_header_wins_over_query(
    gateway: Gateway, publisher: SyncPublisher, ids: Callable[..., str]
) -> None:
    brand, player = ids("b"), ids("p")
    sent = publisher.publish_many([Event(brand, player, "n", n) for n in range(4)])
    headers = {
        "Authorization": f"Bearer {gateway.token(brand, player)}",
        "Last-Event-ID": sent[2],
    }
    with gateway.open(f"/v1/sse?last_event_id={sent[0]}", headers) as client:
        assert client.status == 200
        assert client.wait_connected()["recovered"] is True
        assert [e.id for e in read_events(client, 1)] == [sent[3]]
        assert_quiet(client)


def test_reconnects_while_publishing_continuously(
    gateway_factory: GatewayFactory, redis_server: RedisServer, ids: Callable[..., str]
) -> None:
    """History -> live switch under load: strictly increasing ids, no gap, no duplicate."""
    gateway = gateway_factory("--history-size", "5000", redis=redis_server)
    brand, player = ids("b"), ids("p")
    pub = ContinuousPublisher(redis_server.url, brand, player, limit=100_000, pause=0.001)
    received: list[SSEEvent] = []
    client, _ = gateway.player_stream(brand, player)
    pub.start()
    try:
        for cycle in range(6):
            received += read_events(client, 20 + 7 * cycle)
            client.close()
            time.sleep(0.05 * (cycle % 3))  # sometimes reconnect at once, sometimes a bit later
            client, connected = gateway.player_stream(brand, player, received[-1].id)
            assert connected["recovered"] is True, f"cycle {cycle}"
        received += read_events(client, 30)
    finally:
        published = pub.finish()
    with client:
        received += read_through(client, published[-1])
        assert_quiet(client)

    got = [e.id for e in received]
    assert len(got) == len(set(got)), "duplicate event"
    assert [stream_id(i) for i in got] == sorted(stream_id(i) for i in got)
    first = published.index(got[0])
    assert got == published[first:], "gap: events published but never received"
    assert [e.json()["n"] for e in received] == list(range(first, len(published)))
    # the reconnects really had something to catch up on
    assert gateway.metrics().value("sse_gateway_events_replayed_total") > 0


def test_history_smaller_than_gap_is_not_recovered(
    gateway_factory: GatewayFactory, redis_server: RedisServer, ids: Callable[..., str]
) -> None:
    gateway = gateway_factory("--history-size", "5", redis=redis_server)
    publisher = SyncPublisher.from_url(redis_server.url, history_size=5)
    brand, player = ids("b"), ids("p")
    try:
        client, _ = gateway.player_stream(brand, player)
        with client:
            last = publisher.publish(brand, player, "n", -1)
            read_through(client, last)

        newest = publisher.publish_many([Event(brand, player, "n", n) for n in range(20)])[-1]

        client, connected = gateway.player_stream(brand, player, last)
        with client:
            assert connected["recovered"] is False
            assert resume_id(client) == newest  # live from where the history ends
            assert_quiet(client)  # no partial replay of the 5 that are left
            live = publisher.publish(brand, player, "live", 1)
            assert [e.id for e in read_events(client, 1)] == [live]
    finally:
        publisher.close()
    assert gateway.metrics().value("sse_gateway_replays_total", outcome="not_recovered") >= 1


def test_unknown_ids_are_not_recovered(
    gateway: Gateway, publisher: SyncPublisher, ids: Callable[..., str]
) -> None:
    brand, player, other = ids("b"), ids("p"), ids("o")
    sent = [publisher.publish(brand, player, "n", 0)]
    time.sleep(0.005)
    # exists, but in another player's history (ids are per stream; this one is not in ours)
    foreign = publisher.publish(brand, other, "n", 0)
    time.sleep(0.005)
    sent += publisher.publish_many([Event(brand, player, "n", n) for n in (1, 2)])
    assert stream_id(sent[0]) < stream_id(foreign) < stream_id(sent[1])
    for last_id in ("1-0", "99999999999999-0", "custom:id.1", "17", foreign):
        client, connected = gateway.player_stream(brand, player, last_id)
        with client:
            assert connected["recovered"] is False, last_id
            assert resume_id(client) == sent[-1], last_id  # where the history ends
            assert_quiet(client, 0.2)
    # the real one still works
    client, connected = gateway.player_stream(brand, player, sent[0])
    with client:
        assert connected["recovered"] is True
        assert [e.id for e in read_events(client, 2)] == sent[1:]


def test_expired_history_is_not_recovered(
    gateway_factory: GatewayFactory,
    redis_server: RedisServer,
    r: redis.Redis,
    ids: Callable[..., str],
) -> None:
    gateway = gateway_factory("--history-ttl", "1s", redis=redis_server)
    brand, player = ids("b"), ids("p")
    publisher = SyncPublisher.from_url(redis_server.url, history_ttl=1)
    try:
        sent = publisher.publish_many([Event(brand, player, "n", n) for n in range(3)])
    finally:
        publisher.close()
    key = f"SSE::{brand}::{player}"
    wait_for(lambda: r.exists(key) == 0, timeout=10, what="history expiry")
    client, connected = gateway.player_stream(brand, player, sent[0])
    with client:
        assert connected["recovered"] is False
        assert_position_id(resume_id(client))  # the history is gone: a position of now
        assert_quiet(client, 0.2)


def test_without_last_event_id_there_is_no_replay(
    gateway: Gateway, publisher: SyncPublisher, ids: Callable[..., str]
) -> None:
    brand, player = ids("b"), ids("p")
    old = publisher.publish_many([Event(brand, player, "n", n) for n in range(5)])
    client, connected = gateway.player_stream(brand, player)
    with client:
        assert "recovered" not in connected
        # The history's newest entry (not sent): a reconnect from here misses nothing.
        assert resume_id(client) == old[-1]
        assert_quiet(client)
        live = publisher.publish(brand, player, "n", 5)
        assert [e.id for e in read_events(client, 1)] == [live]


MALFORMED_IDS = ["a b", "x" * 129, "é1-0", "1-0/2", "<script>", "1-0;2", "a,b", "1-0\x00"]


def test_malformed_last_event_id_is_refused(gateway: Gateway, ids: Callable[..., str]) -> None:
    brand, player = ids("b"), ids("p")
    auth = ("Authorization", f"Bearer {gateway.token(brand, player)}")
    cases: list[tuple[str, list[tuple[str, str]]]] = []
    for value in MALFORMED_IDS:
        cases.append(("/v1/sse?last_event_id=" + quote(value, safe=""), [auth]))
        if value.isascii() and value.isprintable():
            cases.append(("/v1/sse", [auth, ("Last-Event-ID", value)]))
    for target, headers in cases:
        response = gateway.request("GET", target, headers=headers, timeout=5)
        assert_error(response, 400, "invalid_last_event_id")
    rejected = gateway.metrics().value(
        "sse_gateway_connections_rejected_total", reason="invalid_last_event_id"
    )
    assert rejected == len(cases)
    assert gateway.metrics().total("sse_gateway_connections") == 0


def test_plain_publish_delivered_after_a_replay(
    gateway: Gateway, publisher: SyncPublisher, r: redis.Redis, ids: Callable[..., str]
) -> None:
    """Live events without a history id (plain PUBLISH) reach a replayed stream too."""
    brand, player = ids("b"), ids("p")
    sent = publisher.publish_many([Event(brand, player, "n", n) for n in range(3)])
    client, connected = gateway.player_stream(brand, player, sent[0])
    with client:
        assert connected["recovered"] is True
        publish(r, brand, player, {"type": "plain", "data": 1})
        publish(r, brand, player, {"type": "plain", "data": 2, "id": "custom:2"})
        events = read_events(client, 4)
    assert [(e.id, e.event) for e in events] == [
        (sent[1], "n"),
        (sent[2], "n"),
        (None, "plain"),
        ("custom:2", "plain"),
    ]


def test_embedded_broker_keeps_history(
    gateway_factory: GatewayFactory, ids: Callable[..., str]
) -> None:
    gateway = gateway_factory("--publish-api-key", API_KEY)  # no --redis: embedded broker
    brand, player = ids("b"), ids("p")
    auth = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}

    def post(body: Any) -> dict[str, Any]:
        response = gateway.request(
            "POST", "/v1/publish", headers=auth, body=json.dumps(body).encode()
        )
        assert response.status == 202, response
        result: dict[str, Any] = response.json()
        return result

    client, _ = gateway.player_stream(brand, player)
    with client:
        first = post({"brand_id": brand, "player_id": player, "type": "n", "data": -1})
        assert first["receivers"] == 1
        [event] = read_events(client, 1)
        assert event.id == first["id"]
    wait_for(lambda: gateway.metrics().total("sse_gateway_connections") == 0, what="stream closed")
    batch = post(
        [{"brand_id": brand, "player_id": player, "type": "n", "data": n} for n in range(5)]
    )
    assert len(batch["ids"]) == 5

    client, connected = gateway.player_stream(brand, player, first["id"])
    with client:
        assert connected["recovered"] is True
        replayed = read_events(client, 5)
        assert [e.id for e in replayed] == batch["ids"]
        assert [e.json() for e in replayed] == list(range(5))
        assert_quiet(client)
        live = post({"brand_id": brand, "player_id": player, "type": "live", "data": 9})
        assert [e.id for e in read_events(client, 1)] == [live["id"]]

    # a restarted embedded gateway has lost its history: the client is told so
    gateway.stop()
    gateway.start()
    client, connected = gateway.player_stream(brand, player, live["id"])
    with client:
        assert connected["recovered"] is False
        assert_position_id(resume_id(client))  # the new history is empty
        assert_quiet(client, 0.2)


def test_default_history_recovers_a_gap_of_history_size(
    gateway: Gateway, publisher: SyncPublisher, ids: Callable[..., str]
) -> None:
    """Defaults everywhere (SSE_HISTORY_SIZE=100): miss 100 events, get those 100 back."""
    brand, player = ids("b"), ids("p")
    client, _ = gateway.player_stream(brand, player)
    with client:
        last = publisher.publish(brand, player, "n", -1)
        read_through(client, last)
    missed = publisher.publish_many([Event(brand, player, "n", n) for n in range(100)])
    client, connected = gateway.player_stream(brand, player, last)
    with client:
        assert connected["recovered"] is True
        assert [e.id for e in read_events(client, 100)] == missed


def test_never_recovered_true_with_a_gap(
    gateway: Gateway, redis_server: RedisServer, ids: Callable[..., str]
) -> None:
    """A publisher keeping more history than the gateway reads: recovered true must mean all."""
    brand, player = ids("b"), ids("p")
    publisher = SyncPublisher.from_url(redis_server.url, history_size=1000)
    try:
        client, _ = gateway.player_stream(brand, player)
        with client:
            last = publisher.publish(brand, player, "n", -1)
            read_through(client, last)
        missed = publisher.publish_many([Event(brand, player, "n", n) for n in range(150)])
        client, connected = gateway.player_stream(brand, player, last)
        with client:
            live = publisher.publish(brand, player, "live", 0)
            got = [e.id for e in read_through(client, live)]
    finally:
        publisher.close()
    if connected["recovered"]:
        assert got == [*missed, live], f"recovered:true but {151 - len(got)} events missing"
    else:
        assert got == [live]
