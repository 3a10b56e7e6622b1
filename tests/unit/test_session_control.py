"""Session control in-process: the whole gateway over the embedded broker, fake sockets.

What the control channel does to the streams of this process, and the race between a stream
request's block check and a disconnect with a block that comes in while it is in flight.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import jwt
from fakes import FakeTransport, advance, run_in_loop, settle, split_chunks, turns
from sse_spec_parser import parse_sse

from sse_gateway.app import Gateway
from sse_gateway.broker.base import BrokerUnavailable
from sse_gateway.broker.control import ControlSubscription
from sse_gateway.broker.memory import MemoryBroker
from sse_gateway.broker.pubsub import PubSubProtocol
from sse_gateway.settings import Settings
from sse_gateway.streams.control import INDEX_RETRY_SECONDS
from sse_gateway.streams.stream import RETRY_SPREAD_MS, Stream, StreamState
from sse_gateway.wire.control import CONTROL_CHANNEL, Disconnect, block_key, encode_control
from sse_gateway.wire.naming import Identity

SECRET = "s" * 32
HEAD = b"HTTP/1.1 200 OK\r\n\r\n"
RETRY_MS = Settings().retry_ms


async def started() -> Gateway:
    gateway = Gateway(Settings(jwt_secret=SECRET), MemoryBroker(), fd_limit=10_000)
    await gateway.start()
    return gateway


def open_stream(gateway: Gateway, brand: str, player: str) -> tuple[Stream, FakeTransport]:
    transport = FakeTransport()
    stream = gateway.lifecycle.open(transport, Identity(brand, player), None, HEAD)  # type: ignore[arg-type]
    return stream, transport


def last_frame(transport: FakeTransport) -> Any:
    chunks, ended = split_chunks(transport.output[len(HEAD) :])
    assert ended and transport.closed and not transport.aborted
    parsed = parse_sse(chunks[-1])
    [event] = parsed.events
    return event, parsed.retry


@run_in_loop
async def test_a_control_message_closes_the_targets_streams_only() -> None:
    gateway = await started()
    targets = [open_stream(gateway, "b1", "p1") for _ in range(2)]
    others = {
        who: open_stream(gateway, *who)[0] for who in [("b1", "p2"), ("b10", "p1"), ("b2", "p1")]
    }
    await settle(3)
    gateway.control.on_control(encode_control(Disconnect("b1", "p1", "account_locked", 60)))
    for stream, transport in targets:
        assert stream.state is StreamState.CLOSED
        event, retry = last_frame(transport)
        assert event.type == "disconnected"
        assert json.loads(event.data) == {
            "reason": "account_locked",
            "blocked": True,
            "block_seconds": 60,
        }
        assert retry is not None and RETRY_MS <= retry < RETRY_MS + RETRY_SPREAD_MS
    assert all(stream.state is StreamState.LIVE for stream in others.values())
    assert gateway.metrics.closed["kicked"] == 2
    assert gateway.control.block_generation == 1
    # The whole brand b1 (not b10, whose id merely starts the same).
    gateway.control.on_control(encode_control(Disconnect("b1", None, "maintenance")))
    assert others[("b1", "p2")].state is StreamState.CLOSED
    assert others[("b10", "p1")].state is StreamState.LIVE
    assert others[("b2", "p1")].state is StreamState.LIVE
    assert gateway.metrics.closed["kicked"] == 3
    assert gateway.control.block_generation == 1  # no block came with it
    # A stream not yet live gets its head and the frame.
    joining, joining_out = open_stream(gateway, "b2", "p1")
    gateway.control.disconnect(Disconnect("b2", "p1", "bye"))
    assert joining.state is StreamState.CLOSED
    assert joining_out.output.startswith(HEAD)
    assert last_frame(joining_out)[0].type == "disconnected"


@run_in_loop
async def test_a_control_message_the_gateway_cannot_read_is_dropped() -> None:
    gateway = await started()
    stream, _ = open_stream(gateway, "b1", "p1")
    await settle(3)
    for payload in (b"junk", b'{"op":"reboot"}', b'{"op":"disconnect","brand_id":"b1"}'):
        gateway.control.on_control(payload)
    assert stream.state is StreamState.LIVE


def stream_request(player: str) -> bytes:
    claims = {"brand_id": "b1", "sub": player, "exp": int(time.time()) + 3600}
    token = jwt.encode(claims, SECRET, "HS256")
    return (f"GET /v1/sse HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {token}\r\n\r\n").encode()


def connect(gateway: Gateway, player: str) -> FakeTransport:
    transport = FakeTransport()
    reader = gateway.protocol_factory()
    reader.connection_made(transport)  # type: ignore[arg-type]
    reader.data_received(stream_request(player))
    return transport


@run_in_loop
async def test_a_block_stored_while_the_check_was_in_flight_refuses_the_stream() -> None:
    """The check read the keys before the block was stored, and its answer is taken after
    the disconnect came in: the stream must not open (it would escape the kill)."""
    gateway = await started()
    await settle(2)
    # The control channel is down: the table may miss blocks, every check asks the broker.
    gateway.control.on_broker_state(False)
    broker = gateway.broker
    assert isinstance(broker, MemoryBroker)
    read_blocks = broker.read_blocks
    checks = 0

    async def stale_first(keys: list[tuple[bytes, bytes]]) -> list[bool]:
        nonlocal checks
        checks += 1
        result = await read_blocks(keys)
        if checks == 1:
            command = Disconnect("b1", "p1", "self_exclusion", 600)
            await broker.publish_disconnect(
                encode_control(command), block_key("b1", "p1"), 600_000, b"{}"
            )
            await turns(2)  # the control message is applied before this answer is taken
        return result

    broker.read_blocks = stale_first  # type: ignore[method-assign]
    transport = connect(gateway, "p1")
    await settle(3)
    assert checks == 2
    assert transport.output.startswith(b"HTTP/1.1 403 Forbidden\r\n"), transport.output[:200]
    assert b'"error":"blocked"' in transport.output
    assert gateway.lifecycle.open_streams == 0
    # Another player's check in flight at the same time is checked again and served.
    other = connect(gateway, "p2")
    await settle(3)
    assert b"event: connected" in other.output


def counting_reads(broker: MemoryBroker) -> list[int]:
    """Counts the broker's block reads (one entry per read, its number of checks)."""
    reads: list[int] = []
    read_blocks = broker.read_blocks

    async def counted(keys: list[tuple[bytes, bytes]]) -> list[bool]:
        reads.append(len(keys))
        return await read_blocks(keys)

    broker.read_blocks = counted  # type: ignore[method-assign]
    return reads


@run_in_loop
async def test_no_block_in_force_means_no_broker_read() -> None:
    gateway = await started()
    await settle(2)  # the index of blocks is read: the table is complete
    assert isinstance(gateway.broker, MemoryBroker)
    reads = counting_reads(gateway.broker)
    transports = [connect(gateway, f"p{n}") for n in range(5)]
    await settle(3)
    assert all(b"event: connected" in t.output for t in transports)
    assert reads == []


@run_in_loop
async def test_a_block_in_the_table_is_confirmed_by_the_broker() -> None:
    gateway = await started()
    await settle(2)
    broker = gateway.broker
    assert isinstance(broker, MemoryBroker)
    command = Disconnect("b1", "p1", "lock", 600)
    await broker.publish_disconnect(encode_control(command), block_key("b1", "p1"), 600_000, b"{}")
    await turns(2)  # heard: in the table
    reads = counting_reads(broker)
    refused = connect(gateway, "p1")
    served = connect(gateway, "p2")  # another player of the brand: no read
    await settle(3)
    assert refused.output.startswith(b"HTTP/1.1 403 "), refused.output[:100]
    assert b"event: connected" in served.output
    assert reads == [1]
    # Lifted by hand (the key deleted): the broker says so, and the table forgets it.
    broker._blocks.clear()  # what `DEL SSE:block:b1:p1` does to Redis
    lifted = connect(gateway, "p1")
    await settle(3)
    assert b"event: connected" in lifted.output
    again = connect(gateway, "p1")
    await settle(3)
    assert b"event: connected" in again.output
    assert reads == [1, 1]


@run_in_loop
async def test_blocks_stored_before_the_start_are_read_from_the_index() -> None:
    broker = MemoryBroker()
    await broker.publish_disconnect(b"unheard", block_key("b1"), 600_000, b"{}")
    gateway = Gateway(Settings(jwt_secret=SECRET), broker, fd_limit=10_000)
    await gateway.start()
    await settle(2)
    reads = counting_reads(broker)
    refused = connect(gateway, "p7")
    await settle(3)
    assert refused.output.startswith(b"HTTP/1.1 403 "), refused.output[:100]
    assert reads == [1]


@run_in_loop
async def test_an_index_that_cannot_be_read_is_read_again_meanwhile_the_broker_answers() -> None:
    broker = MemoryBroker()
    read_index = broker.read_block_index
    failures = [BrokerUnavailable("down"), BrokerUnavailable("still down")]

    async def flaky() -> list[tuple[bytes, float]]:
        if failures:
            raise failures.pop(0)
        return await read_index()

    broker.read_block_index = flaky  # type: ignore[method-assign]
    gateway = Gateway(Settings(jwt_secret=SECRET), broker, fd_limit=10_000)
    await gateway.start()
    await settle(2)
    reads = counting_reads(broker)
    served = connect(gateway, "p1")  # the table is not complete: the broker is asked
    await settle(3)
    assert b"event: connected" in served.output and reads == [1]
    await advance(INDEX_RETRY_SECONDS)
    await advance(INDEX_RETRY_SECONDS)
    assert not failures
    connect(gateway, "p2")
    await settle(3)
    assert reads == [1]  # complete now: no read


@run_in_loop
async def test_a_disconnect_after_the_check_closes_the_new_stream() -> None:
    gateway = await started()
    transport = connect(gateway, "p1")
    await settle(3)
    assert b"event: connected" in transport.output
    gateway.control.on_control(encode_control(Disconnect("b1", "p1", "bye", 0)))
    assert b"event: disconnected" in transport.output and transport.closed


@run_in_loop
async def test_a_failed_block_check_is_a_transient_refusal() -> None:
    gateway = await started()
    await settle(2)
    gateway.control.on_broker_state(False)  # the table may miss blocks: the broker is asked
    broker = gateway.broker

    async def down(keys: list[tuple[bytes, bytes]]) -> list[bool]:
        raise BrokerUnavailable("redis is down")

    broker.read_blocks = down  # type: ignore[method-assign]
    transport = connect(gateway, "p1")
    await settle(3)
    assert transport.output.startswith(b"HTTP/1.1 503 "), transport.output[:200]
    assert b"broker_unavailable" in transport.output
    assert gateway.lifecycle.open_streams == 0


def test_control_channel_messages_skip_the_event_path() -> None:
    """Subscribed as a pattern, the control channel's messages are `pmessage` replies: the
    Pub/Sub socket hands them to the reply handler, never to the message handler every
    player's event goes through (which compares no channel name for it)."""

    async def scenario() -> None:
        messages: list[tuple[bytes, bytes]] = []
        replies: list[object] = []
        protocol = PubSubProtocol(
            lambda channel, payload: messages.append((channel, payload)), replies.append
        )
        protocol.connection_made(FakeTransport())  # type: ignore[arg-type]
        protocol.data_received(
            _resp([b"message", b"SSE::b::p", b"{}"])
            + _resp([b"pmessage", CONTROL_CHANNEL, CONTROL_CHANNEL, b"kill"])
            + _resp([b"message", b"SSE::b::q", b"{}"])
        )
        assert messages == [(b"SSE::b::p", b"{}"), (b"SSE::b::q", b"{}")]
        assert replies == [[b"pmessage", CONTROL_CHANNEL, CONTROL_CHANNEL, b"kill"]]
        assert _resp([b"PSUBSCRIBE", CONTROL_CHANNEL]) == ControlSubscription.COMMAND

    asyncio.run(scenario())


def test_control_subscription_runs_its_waiters_once_confirmed() -> None:
    heard: list[bytes] = []
    ran: list[str] = []
    subscription = ControlSubscription(heard.append)
    subscription.when_active(lambda: ran.append("first"))
    assert ran == []
    subscription.on_reply([b"psubscribe", CONTROL_CHANNEL, b"1"])
    assert ran == ["first"]
    subscription.when_active(lambda: ran.append("now"))
    assert ran == ["first", "now"]
    subscription.on_disconnected()
    subscription.when_active(lambda: ran.append("next connection"))
    assert ran == ["first", "now"]
    subscription.on_reply([b"psubscribe", CONTROL_CHANNEL, b"1"])
    assert ran == ["first", "now", "next connection"]
    subscription.on_reply([b"pmessage", CONTROL_CHANNEL, CONTROL_CHANNEL, b"m1"])
    subscription.on_reply([b"pmessage", CONTROL_CHANNEL, b"SSE::other", b"m2"])
    assert heard == [b"m1"]


def _resp(parts: list[bytes]) -> bytes:
    out = [b"*%d\r\n" % len(parts)]
    out += [b"$%d\r\n%b\r\n" % (len(part), part) for part in parts]
    return b"".join(out)
