"""Session control, pure parts: the disconnect request and control message, block and ticket
keys, ticket claims, the `disconnected` frame, and the embedded broker's blocks and tickets."""

from __future__ import annotations

import asyncio
import hashlib
import json
from typing import Any

import pytest
from sse_spec_parser import parse_sse

from sse_gateway.broker import memory
from sse_gateway.broker.base import BrokerUnavailable
from sse_gateway.broker.memory import MemoryBroker
from sse_gateway.wire.control import (
    CONTROL_CHANNEL,
    MAX_BLOCK_SECONDS,
    Disconnect,
    InvalidField,
    block_key,
    block_keys,
    block_value,
    decode_control,
    disconnect_from_request,
    encode_control,
)
from sse_gateway.wire.frames import dump_json, encode_disconnected
from sse_gateway.wire.naming import channel_name, split_channel
from sse_gateway.wire.tickets import (
    TICKET_TTL_SECONDS,
    TicketClaims,
    decode_claims,
    encode_claims,
    is_ticket,
    new_ticket,
    ticket_key,
    ticket_ttl,
)

# --------------------------------------------------------------------------- the request


def test_a_player_disconnect() -> None:
    body = {"brand_id": "b1", "player_id": "p1", "reason": "account_locked"}
    assert disconnect_from_request(body) == Disconnect("b1", "p1", "account_locked", 0, None)


def test_a_brand_disconnect_with_block_and_requester() -> None:
    body = {
        "brand_id": "b1",
        "player_id": None,
        "reason": "Wartung ü",
        "block_seconds": MAX_BLOCK_SECONDS,
        "requested_by": "ops@example.com",
    }
    command = disconnect_from_request(body)
    assert command == Disconnect("b1", None, "Wartung ü", MAX_BLOCK_SECONDS, "ops@example.com")
    assert command.target == "b1"
    assert command.matches("b1", "anyone") and not command.matches("b2", "anyone")


def test_block_seconds_null_or_zero_means_no_block() -> None:
    for value in (None, 0):
        body = {"brand_id": "b", "reason": "r", "block_seconds": value}
        assert disconnect_from_request(body).block_seconds == 0


@pytest.mark.parametrize(
    ("field", "body"),
    [
        ("body", []),
        ("body", "text"),
        ("brand_id", {"reason": "r"}),
        ("brand_id", {"brand_id": "a:b", "reason": "r"}),
        ("brand_id", {"brand_id": "x" * 65, "reason": "r"}),
        ("player_id", {"brand_id": "b", "player_id": "", "reason": "r"}),
        ("player_id", {"brand_id": "b", "player_id": 1, "reason": "r"}),
        ("reason", {"brand_id": "b"}),
        ("reason", {"brand_id": "b", "reason": " \t"}),
        ("reason", {"brand_id": "b", "reason": "x" * 257}),
        ("reason", {"brand_id": "b", "reason": "a\r\nb"}),
        ("reason", {"brand_id": "b", "reason": "a\x85b"}),
        ("reason", {"brand_id": "b", "reason": "a\u2028b"}),
        ("reason", {"brand_id": "b", "reason": "a\x7fb"}),
        ("block_seconds", {"brand_id": "b", "reason": "r", "block_seconds": -5}),
        ("block_seconds", {"brand_id": "b", "reason": "r", "block_seconds": 2.0}),
        ("block_seconds", {"brand_id": "b", "reason": "r", "block_seconds": False}),
        ("block_seconds", {"brand_id": "b", "reason": "r", "block_seconds": MAX_BLOCK_SECONDS + 1}),
        ("requested_by", {"brand_id": "b", "reason": "r", "requested_by": "a\nb"}),
        ("requested_by", {"brand_id": "b", "reason": "r", "requested_by": "x" * 129}),
        ("until", {"brand_id": "b", "reason": "r", "until": 5}),
    ],
)
def test_invalid_requests_name_their_field(field: str, body: Any) -> None:
    with pytest.raises(InvalidField) as caught:
        disconnect_from_request(body)
    assert caught.value.field == field


# --------------------------------------------------------------------------- the control message


def test_the_control_message_round_trips_without_the_requester() -> None:
    command = Disconnect("b1", "p1", 'say "hi"\\', 60, "agent-7")
    payload = encode_control(command)
    assert b"agent-7" not in payload  # audit only
    assert json.loads(payload)["op"] == "disconnect"
    assert decode_control(payload) == Disconnect("b1", "p1", 'say "hi"\\', 60, None)
    brand_wide = Disconnect("b1", None, "r")
    assert decode_control(encode_control(brand_wide)) == brand_wide


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"\xff",
        b"[]",
        b'{"op":"unblock","brand_id":"b","reason":"r"}',
        b'{"brand_id":"b","reason":"r"}',
        b'{"op":"disconnect","brand_id":"b::x","reason":"r"}',
        b'{"op":"disconnect","brand_id":"b"}',
    ],
)
def test_a_control_message_the_gateway_cannot_read_is_refused(payload: bytes) -> None:
    with pytest.raises(InvalidField):
        decode_control(payload)


# --------------------------------------------------------------------------- keys


@pytest.mark.parametrize(
    ("brand", "player"), [("b", "p"), ("block", "x"), ("x", "block"), ("control", "p")]
)
def test_block_keys_are_never_a_players_channel(brand: str, player: str) -> None:
    for key in (*block_keys(brand, player), block_key(player)):
        assert split_channel(key) is None
        assert key != CONTROL_CHANNEL
    assert split_channel(CONTROL_CHANNEL) is None
    assert block_keys(brand, player) == (
        f"SSE:block:{brand}".encode(),
        f"SSE:block:{brand}:{player}".encode(),
    )
    # A brand-wide block key is not any player's block key, and back.
    assert block_key(brand) != block_key(brand, player)
    assert channel_name(brand, player) not in block_keys(brand, player)


def test_block_value_says_why_who_and_when() -> None:
    value = json.loads(block_value(Disconnect("b", "p", "r", 60, "ops"), 1700000000.7))
    assert value == {"reason": "r", "requested_by": "ops", "at": 1700000000}


# --------------------------------------------------------------------------- the frame


def test_disconnected_frame_is_one_event_whatever_the_reason() -> None:
    data = dump_json({"reason": "line\n\nevent: forged\ndata: x", "blocked": True})
    parsed = parse_sse(encode_disconnected(data.encode(), 4500))
    [event] = parsed.events
    assert event.type == "disconnected"
    assert parsed.retry == 4500
    assert json.loads(event.data)["reason"] == "line\n\nevent: forged\ndata: x"
    assert event.id == ""


# --------------------------------------------------------------------------- tickets


def test_tickets_are_256_random_bits_in_base64url() -> None:
    tickets = {new_ticket() for _ in range(1000)}
    assert len(tickets) == 1000
    assert all(len(t) == 43 and is_ticket(t) for t in tickets)


@pytest.mark.parametrize(
    "value", ["", "A" * 42, "A" * 44, "A" * 42 + "=", "A" * 42 + "+", "é" * 43]
)
def test_is_ticket_refuses_other_shapes(value: str) -> None:
    assert not is_ticket(value)


def test_ticket_key_is_a_hash_of_the_ticket() -> None:
    ticket = new_ticket()
    key = ticket_key(ticket)
    assert key == b"SSE:ticket:" + hashlib.sha256(ticket.encode()).hexdigest().encode()
    assert ticket.encode() not in key
    assert split_channel(key) is None


def test_ticket_ttl_never_outlives_the_token() -> None:
    assert ticket_ttl(None, 1000.0) == TICKET_TTL_SECONDS
    assert ticket_ttl(1000.0 + 3600, 1000.0) == TICKET_TTL_SECONDS
    assert ticket_ttl(1000.0 + 12.9, 1000.0) == 12
    assert ticket_ttl(1000.0 + 0.2, 1000.0) == 1
    assert ticket_ttl(990.0, 1000.0) == 1  # the token passed within its leeway


def test_ticket_claims_round_trip() -> None:
    for claims in (TicketClaims("b", "p", 1700000000.0), TicketClaims("b", "p", None)):
        assert decode_claims(encode_claims(claims)) == claims


@pytest.mark.parametrize(
    "value",
    [
        b"",
        b"nope",
        b"[]",
        b'{"b":"b"}',
        b'{"b":"b::x","p":"p","u":null}',
        b'{"b":"b","p":"p","u":"soon"}',
        b'{"b":"b","p":"p","u":true}',
    ],
)
def test_ticket_claims_that_are_not_ours_are_refused(value: bytes) -> None:
    assert decode_claims(value) is None


# --------------------------------------------------------------------------- embedded broker


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_memory_blocks_expire_and_are_never_shortened() -> None:
    async def scenario() -> None:
        clock = Clock()
        broker = MemoryBroker(clock=clock)
        heard: list[bytes] = []
        await broker.start(lambda *_: None, lambda _: None, heard.append)
        key = block_key("b", "p")
        outcome = await broker.publish_disconnect(b"m1", key, 60_000, b"{}")
        assert outcome.receivers == 1 and outcome.block_ms == 60_000
        shorter = await broker.publish_disconnect(b"m2", key, 5_000, b"{}")
        assert shorter.block_ms == 60_000
        assert await broker.read_blocks([block_keys("b", "p"), block_keys("b", "q")]) == [
            True,
            False,
        ]
        await broker.publish_disconnect(b"m3", block_key("c"), 10_000, b"{}")
        assert await broker.read_blocks([block_keys("c", "anyone")]) == [True]
        clock.now += 60
        assert await broker.read_blocks([block_keys("b", "p"), block_keys("c", "x")]) == [
            False,
            False,
        ]
        none = await broker.publish_disconnect(b"m4", key, 0, b"{}")
        assert none.block_ms is None
        await asyncio.sleep(0)
        assert heard == [b"m1", b"m2", b"m3", b"m4"]
        await broker.close()

    asyncio.run(scenario())


def test_memory_tickets_are_single_use_and_expire(monkeypatch: pytest.MonkeyPatch) -> None:
    async def scenario() -> None:
        clock = Clock()
        broker = MemoryBroker(clock=clock)
        await broker.put_ticket(b"k1", b"v1", 30)
        assert await broker.take_ticket(b"k1") == b"v1"
        assert await broker.take_ticket(b"k1") is None
        await broker.put_ticket(b"k2", b"v2", 30)
        clock.now += 30
        assert await broker.take_ticket(b"k2") is None
        monkeypatch.setattr(memory, "MAX_TICKETS", 2)
        await broker.put_ticket(b"a", b"", 30)
        await broker.put_ticket(b"b", b"", 30)
        with pytest.raises(BrokerUnavailable):
            await broker.put_ticket(b"c", b"", 30)
        clock.now += 31  # expired ones make room
        await broker.put_ticket(b"c", b"", 30)

    asyncio.run(scenario())
