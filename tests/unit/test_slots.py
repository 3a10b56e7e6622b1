"""Redis Cluster topology parsing, key slots and per-slot batches (broker/slots.py)."""

from __future__ import annotations

import pytest

from sse_gateway.broker.slots import (
    SLOTS,
    Topology,
    group_by_owner,
    key_slot,
    parse_shards,
    split_by_slot,
)
from sse_gateway.broker.subscriptions import SubscriptionBook, SubscriptionCommand


def node(
    port: int, role: bytes = b"master", health: bytes = b"online", **extra: object
) -> list[object]:
    fields: list[object] = [b"id", b"x" * 40, b"port", port, b"ip", b"10.0.0.1"]
    fields += [b"endpoint", b"10.0.0.1", b"role", role, b"replication-offset", 0]
    fields += [b"health", health]
    for name, value in extra.items():
        fields += [name.replace("_", "-").encode(), value]
    return fields


def shard(slots: list[int], *nodes: list[object]) -> list[object]:
    return [b"slots", slots, b"nodes", list(nodes)]


def test_key_slot_is_redis_crc16_with_hash_tags() -> None:
    # Values from the Redis Cluster specification's examples.
    assert key_slot(b"123456789") == 0x31C3 % SLOTS
    assert key_slot(b"{user1000}.following") == key_slot(b"{user1000}.followers")
    assert key_slot(b"foo{{bar}}zap") == key_slot(b"{bar")
    assert key_slot(b"foo{}{bar}") != key_slot(b"bar")  # an empty first tag: the whole key


def test_parse_shards_maps_every_slot_to_its_online_master() -> None:
    reply = [
        shard([0, 5460], node(7000), node(7003, b"replica")),
        shard([5461, 10922], node(7004, b"replica"), node(7001)),
        shard([10923, 12000, 12001, 16383], node(7002)),
    ]
    topology = parse_shards(reply)
    assert set(topology.masters) == {("10.0.0.1", 7000), ("10.0.0.1", 7001), ("10.0.0.1", 7002)}
    assert topology.owner(0) == topology.owner(5460) == ("10.0.0.1", 7000)
    assert topology.owner(5461) == ("10.0.0.1", 7001)
    assert topology.owner(12001) == topology.owner(16383) == ("10.0.0.1", 7002)
    assert topology.covered == SLOTS


def test_a_shard_whose_master_failed_serves_nothing_until_a_replica_is_promoted() -> None:
    reply = [
        shard([0, 8191], node(7000, health=b"fail"), node(7003, b"replica", b"online")),
        shard([8192, 16383], node(7001)),
    ]
    topology = parse_shards(reply)
    assert topology.owner(0) is None
    assert topology.covered == 8192
    assert topology.masters == (("10.0.0.1", 7001),)


def test_tls_uses_the_announced_tls_port_and_unknown_endpoints_fall_back_to_ip() -> None:
    reply = [shard([0, 16383], node(0, tls_port=7443))]
    assert parse_shards(reply, tls=True).owner(5) == ("10.0.0.1", 7443)
    unknown = node(7000)
    unknown[unknown.index(b"endpoint") + 1] = b"?"
    assert parse_shards([shard([0, 16383], unknown)]).owner(5) == ("10.0.0.1", 7000)


@pytest.mark.parametrize(
    "reply",
    [b"ERR unknown command", [[b"slots", [0]]], [shard([0, 20000], node(7000))], [[b"slots"]]],
)
def test_malformed_replies_are_refused(reply: object) -> None:
    with pytest.raises(ValueError):
        parse_shards(reply)


def test_same_as_compares_slot_owners() -> None:
    a = Topology([(0, 16383, ("h", 1))])
    assert a.same_as(Topology([(0, 16383, ("h", 1))]))
    assert not a.same_as(Topology([(0, 100, ("h", 1)), (101, 16383, ("h", 2))]))


def channels_of_distinct_slots(count: int) -> list[bytes]:
    out: list[bytes] = []
    seen: set[int] = set()
    n = 0
    while len(out) < count:
        channel = b"SSE::b::p%d" % n
        n += 1
        if key_slot(channel) not in seen:
            seen.add(key_slot(channel))
            out.append(channel)
    return out


def test_split_by_slot_gives_one_slot_per_command_and_keeps_every_channel_once() -> None:
    a, b = channels_of_distinct_slots(2)
    same_as_a = b"SSE::{" + a + b"}::x"  # a hash tag: the slot of `a`
    commands = [
        SubscriptionCommand(b"SSUBSCRIBE", [a, b, b"{" + a + b"}y"]),
        SubscriptionCommand(b"SUNSUBSCRIBE", [same_as_a]),
    ]
    split = split_by_slot(commands)
    for _, channels in split:
        assert len({key_slot(c) for c in channels}) == 1
    flat = [(verb, c) for verb, channels in split for c in channels]
    assert sorted(flat) == sorted((verb, c) for verb, chans in commands for c in chans)
    assert split[0].channels == [a, b"{" + a + b"}y"] and split[1].channels == [b]


def test_group_by_owner_keeps_positions_and_reports_orphans() -> None:
    topology = Topology([(0, 8191, ("h", 1))])
    keys = channels_of_distinct_slots(40)
    groups, orphans = group_by_owner(keys, topology)
    assert sorted(groups.get(("h", 1), []) + orphans) == list(range(40))
    assert all(key_slot(keys[i]) <= 8191 for i in groups.get(("h", 1), []))
    assert all(key_slot(keys[i]) > 8191 for i in orphans)


def test_book_moves_channels_out_with_their_waiters() -> None:
    book = SubscriptionBook(b"SSUBSCRIBE", b"SUNSUBSCRIBE")
    ran: list[str] = []
    book.subscribe(b"a")
    book.subscribe(b"b")
    book.when_subscribed(b"a", lambda: ran.append("a"))
    (command,) = book.on_connected()
    assert command.verb == b"SSUBSCRIBE"
    # MOVED for the command: no channel active, waiters handed back, nothing counted as due
    _, callbacks = book.subscribe_failed(b"a")
    _, none = book.subscribe_failed(b"b")
    assert len(callbacks) == 1 and not none and book.unconfirmed == 0
    assert book.forget(b"a") == [] and book.wanted() == [b"b"]
    assert not book.flush()  # forgetting writes no SUNSUBSCRIBE
    book.when_subscribed(b"b", lambda: ran.append("b"))
    book.on_disconnected()
    taken = book.take_all()
    assert list(taken) == [b"b"] and len(taken[b"b"]) == 1
    assert book.wanted_count == 0 and ran == []
