"""Who is online, the pure parts and the aggregation: presence messages, the tally of
replies, `Presence` answering and counting replies, the rate window of `/v1/stats`."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from sse_gateway.broker.memory import MemoryBroker
from sse_gateway.streams.hub import ConnectionHub
from sse_gateway.streams.presence import Presence
from sse_gateway.streams.stats import GatewayStats, RateWindow
from sse_gateway.wire.control import decode_control
from sse_gateway.wire.naming import channel_name
from sse_gateway.wire.presence import (
    InvalidPresence,
    PresenceQuery,
    PresenceReply,
    PresenceTally,
    decode_presence,
    is_presence,
    newest_id,
)

# --------------------------------------------------------------------------- messages


def test_messages_round_trip() -> None:
    query = PresenceQuery("q1", "inst-a", "brand", "player.1")
    reply = PresenceReply("q1", "inst-a", 3, 1_700_000_000.25, "1700000000000-7")
    for message in (query, reply, PresenceReply("q2", "i", 1, None, None)):
        payload = message.encode()
        assert is_presence(payload)
        assert decode_presence(payload) == message


def test_disconnects_are_not_presence_messages() -> None:
    disconnect = b'{"op":"disconnect","brand_id":"b","player_id":null,"reason":"r"}'
    assert not is_presence(disconnect)
    assert decode_control(disconnect).brand_id == "b"


@pytest.mark.parametrize(
    "message",
    [
        {"op": "presence_other"},
        {"op": "presence_query", "id": "q", "reply_to": "a", "brand_id": "b:c", "player_id": "p"},
        {"op": "presence_query", "id": "", "reply_to": "a", "brand_id": "b", "player_id": "p"},
        {
            "op": "presence_query",
            "id": "q",
            "reply_to": "a" * 65,
            "brand_id": "b",
            "player_id": "p",
        },
        {"op": "presence_reply", "id": "q", "to": "a", "connections": -1},
        {"op": "presence_reply", "id": "q", "to": "a", "connections": True},
        # No process holds that many streams; summed and answered as JSON, a number of
        # thousands of digits would break the API's clients.
        {"op": "presence_reply", "id": "q", "to": "a", "connections": 10**4000},
        {"op": "presence_reply", "id": "q", "to": "a", "connections": 1, "since": "now"},
        {"op": "presence_reply", "id": "q", "to": "a", "connections": 1, "last_event_id": "x"},
    ],
)
def test_invalid_messages_are_refused(message: dict[str, Any]) -> None:
    payload = json.dumps(message, separators=(",", ":")).encode()
    assert is_presence(payload)
    with pytest.raises(InvalidPresence):
        decode_presence(payload)


@pytest.mark.parametrize("payload", [b'{"op":"presence_', b'{"op":"presence_x"', b"[1]"])
def test_not_json_objects_are_refused(payload: bytes) -> None:
    with pytest.raises(InvalidPresence):
        decode_presence(payload)


@pytest.mark.parametrize("since", [b"NaN", b"Infinity", b"-Infinity", b"1e999", b"1" + b"0" * 400])
def test_a_reply_since_that_is_no_time_is_refused(since: bytes) -> None:
    # Anyone on the control channel can send one; passed on, NaN or inf made the asker's JSON
    # answer fail (500) and a huge integer raised OverflowError out of the decoder.
    payload = b'{"op":"presence_reply","id":"q","to":"a","connections":1,"since":' + since + b"}"
    with pytest.raises(InvalidPresence):
        decode_presence(payload)


# --------------------------------------------------------------------------- tally


def test_tally_sums_counts_oldest_since_newest_id() -> None:
    tally = PresenceTally()
    tally.add(2, 200.0, "1000-5")
    tally.add(0, 50.0, "9999-0")  # a process with no stream of the player adds nothing
    tally.add(1, 100.0, "999-9")  # ids compare as numbers: 999-9 < 1000-5
    tally.add(3, None, "1000-10")
    assert (tally.connections, tally.answered) == (6, 3)
    assert tally.since == 100.0
    assert tally.last_event_id == "1000-10"


def test_empty_tally() -> None:
    tally = PresenceTally()
    assert (tally.connections, tally.answered, tally.since, tally.last_event_id) == (
        0,
        0,
        None,
        None,
    )


@pytest.mark.parametrize(
    ("a", "b", "newest"),
    [
        (None, None, None),
        ("1-0", None, "1-0"),
        (None, "1-0", "1-0"),
        ("2-0", "10-0", "10-0"),
        ("5-10", "5-9", "5-10"),
        ("bad", "5-9", "5-9"),
        ("5-9", "bad", "5-9"),
    ],
)
def test_newest_id(a: str | None, b: str | None, newest: str | None) -> None:
    assert newest_id(a, b) == newest


# --------------------------------------------------------------------------- Presence


def run(scenario: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(scenario(), 30))


class Subscriber:
    """What the hub keeps of a stream: its channel (nothing is delivered here)."""

    def __init__(self, channel: bytes) -> None:
        self.channel = channel


class SubscribedBroker(MemoryBroker):
    """The embedded broker, but `PUBSUB NUMSUB` counts `others` more processes, and every
    control message published is kept (the other processes are the test)."""

    def __init__(self, others: int) -> None:
        super().__init__()
        self.others = others
        self.published: list[bytes] = []

    async def count_subscribers(self, channel: bytes) -> int:
        return await super().count_subscribers(channel) + self.others

    async def publish_control(self, message: bytes) -> int:
        self.published.append(message)
        return await super().publish_control(message)


async def started(others: int, timeout: float = 5.0) -> tuple[SubscribedBroker, Presence]:
    broker = SubscribedBroker(others)
    hub = ConnectionHub(broker)
    unknown: list[bytes] = []
    presence = Presence(
        broker=broker, hub=hub, instance="me", on_other=unknown.append, timeout=timeout
    )
    await broker.start(lambda *_: None, lambda _: None, presence.on_control)
    for _ in range(2):
        hub.join(Subscriber(channel_name("b", "p")), lambda: None)  # type: ignore[arg-type]
    channel = hub.get(channel_name("b", "p"))
    assert channel is not None
    channel.last = (1000, 1)
    return broker, presence


async def asked(broker: SubscribedBroker) -> PresenceQuery:
    while not broker.published:
        await asyncio.sleep(0)
    query = decode_presence(broker.published[0])
    assert isinstance(query, PresenceQuery)
    return query


def test_the_asker_waits_for_every_other_subscribed_process() -> None:
    run(the_asker_waits_for_every_other_subscribed_process)


async def the_asker_waits_for_every_other_subscribed_process() -> None:
    broker, presence = await started(others=2)
    task = asyncio.create_task(presence.ask("b", "p"))
    query = await asked(broker)
    assert (query.reply_to, query.brand_id, query.player_id) == ("me", "b", "p")
    presence.on_control(PresenceReply(query.id, "someone-else", 7, 1.0, None).encode())
    presence.on_control(PresenceReply("another-query", "me", 7, 1.0, None).encode())
    presence.on_control(b'{"op":"presence_reply","id":"broken"}')
    presence.on_control(PresenceReply(query.id, "me", 1, 10.0, "2000-0").encode())
    assert not task.done()
    presence.on_control(PresenceReply(query.id, "me", 4, 5.0, "999-0").encode())
    found = await task
    assert (found.connections, found.local_connections) == (7, 2)
    assert (found.instances, found.answered, found.online) == (3, 3, True)
    assert found.since == 5.0
    assert found.last_event_id == "2000-0"
    await broker.close()


def test_the_asker_answers_with_what_came_in_time() -> None:
    run(the_asker_answers_with_what_came_in_time)


async def the_asker_answers_with_what_came_in_time() -> None:
    broker, presence = await started(others=2, timeout=0.05)
    task = asyncio.create_task(presence.ask("b", "p"))
    query = await asked(broker)
    presence.on_control(PresenceReply(query.id, "me", 1, None, None).encode())
    found = await task
    assert (found.connections, found.instances, found.answered) == (3, 3, 2)
    # A reply after the answer changes nothing and is not kept.
    presence.on_control(PresenceReply(query.id, "me", 5, None, None).encode())
    assert presence._queries == {}
    await broker.close()


def test_no_query_when_no_other_process_is_subscribed() -> None:
    run(no_query_when_no_other_process_is_subscribed)


async def no_query_when_no_other_process_is_subscribed() -> None:
    broker, presence = await started(others=0)
    found = await presence.ask("b", "p")
    assert (found.connections, found.instances, found.answered) == (2, 1, 1)
    assert found.last_event_id == "1000-1"
    offline = await presence.ask("b", "nobody")
    assert (offline.online, offline.connections, offline.answered, offline.since) == (
        False,
        0,
        0,
        None,
    )
    assert broker.published == []
    await broker.close()


def test_a_holder_replies_to_another_process_only() -> None:
    run(a_holder_replies_to_another_process_only)


async def a_holder_replies_to_another_process_only() -> None:
    broker, presence = await started(others=0)
    presence.on_control(PresenceQuery("q9", "other", "b", "p").encode())
    presence.on_control(PresenceQuery("q10", "other", "b", "nobody").encode())
    presence.on_control(PresenceQuery("q11", "me", "b", "p").encode())  # its own query
    for _ in range(5):
        await asyncio.sleep(0)
    [reply] = [decode_presence(m) for m in broker.published]
    assert isinstance(reply, PresenceReply)
    assert (reply.id, reply.to, reply.connections, reply.last_event_id) == (
        "q9",
        "other",
        2,
        "1000-1",
    )
    assert reply.since is not None
    await broker.close()


def test_other_control_messages_go_on() -> None:
    run(other_control_messages_go_on)


async def other_control_messages_go_on() -> None:
    broker = MemoryBroker()
    others: list[bytes] = []
    presence = Presence(
        broker=broker, hub=ConnectionHub(broker), instance="me", on_other=others.append
    )
    presence.on_control(b'{"op":"disconnect"}')
    assert others == [b'{"op":"disconnect"}']


# --------------------------------------------------------------------------- rates


def test_rate_over_the_window() -> None:
    window = RateWindow(seconds=3)
    assert window.rate(10.0, 50) == 0.0  # no sample yet
    window.sample(0.0, 0)
    assert window.rate(0.0, 0) == 0.0  # no time between
    window.sample(1.0, 10)
    assert window.rate(2.0, 40) == 20.0
    window.sample(2.0, 40)
    window.sample(3.0, 100)  # the sample of 0.0 falls out of a 3-sample window
    assert window.rate(4.0, 100) == 30.0  # (100 - 10) / (4 - 1)


def test_a_counter_that_restarts_starts_the_window_again() -> None:
    window = RateWindow(seconds=60)
    window.sample(0.0, 500)
    window.sample(1.0, 7)
    assert window.rate(2.0, 9) == 2.0
    assert window.rate(2.0, 3) == 0.0  # below the oldest sample: no rate, never negative


def test_stats_snapshot() -> None:
    run(stats_snapshot)


async def stats_snapshot() -> None:
    broker = MemoryBroker()
    hub = ConnectionHub(broker)
    counters = {"received": 0, "delivered": 0}
    now = [100.0]
    stats = GatewayStats(
        hub=hub,
        instance="inst",
        open_streams=lambda: 4,
        received=lambda: counters["received"],
        delivered=lambda: counters["delivered"],
        clock=lambda: now[0],
    )
    for brand, player in (("b1", "p"), ("b1", "p"), ("b1", "q"), ("b2", "p")):
        hub.join(Subscriber(channel_name(brand, player)), lambda: None)  # type: ignore[arg-type]
    stats.start()
    counters.update(received=30, delivered=90)
    now[0] = 110.0
    snapshot = stats.snapshot()
    stats.stop()
    assert snapshot["instance"] == "inst" and snapshot["connections"] == 4
    assert snapshot["connections_by_brand"] == {"b1": 3, "b2": 1}
    assert snapshot["subscribed_channels"] == 3
    assert snapshot["events_received_per_second"] == 3.0
    assert snapshot["events_delivered_per_second"] == 9.0
    assert snapshot["window_seconds"] == 60
