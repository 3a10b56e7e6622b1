"""StreamLifecycle's resume id: where each stream starts, as its first frame says.

The whole gateway in-process over the embedded broker, with fake transports and a loop whose
clock stands still (no heartbeat interferes). Every stream's first frame is `connected` with
`id:` (the resume id) and `retry:`: the client's own id after a recovered replay; otherwise
where the player's history ends once the stream is subscribed (`HistoryReader.head`): the id
of its newest entry, or, when it is empty, a position just before the broker's clock
(`<ms>-<2**64-1>`, an id no entry has). Live events at or below an entry resume id are not
sent; a reconnect with the resume id replays what came after it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
from fakes import (
    END_CHUNK,
    FakeTransport,
    advance,
    http_chunk,
    run_in_loop,
    settle,
    split_chunks,
)
from sse_spec_parser import parse_sse

import sse_gateway.broker.memory
import sse_gateway.streams.expiry
from sse_gateway.app import Gateway
from sse_gateway.broker.base import BrokerUnavailable, HistoryEntry
from sse_gateway.broker.memory import MemoryBroker
from sse_gateway.publish.events import PreparedEvent
from sse_gateway.settings import Settings
from sse_gateway.streams.stream import RETRY_SPREAD_MS, PlainStream, Stream, StreamState
from sse_gateway.wire.frames import encode_event
from sse_gateway.wire.ids import format_stream_id, is_position, parse_stream_id, position_id
from sse_gateway.wire.naming import Identity, channel_name

PLAYER = Identity("b1", "p1")
CHANNEL = channel_name(PLAYER.brand_id, PLAYER.player_id)
HEAD = b"HTTP/1.1 200 OK\r\n\r\n"
RETRY_MS = 1500
SIZE = 3
NOW_MS = 1_700_000_000_000

Frame = tuple[str, str, str, int | None]  # (event type, id, data, retry)


class WallClock:
    """The embedded broker's `time` module with a wall clock the test sets (its ids, its
    clock for the head read and for `replay_covers`); `monotonic` (history expiry) is real."""

    monotonic = staticmethod(time.monotonic)

    def __init__(self, now_ms: int = NOW_MS) -> None:
        self.now_ms = now_ms

    def time(self) -> float:
        return (self.now_ms + 0.5) / 1000  # int(time() * 1000) == now_ms, whatever rounding


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Iterator[WallClock]:
    wall = WallClock()
    monkeypatch.setattr(sse_gateway.broker.memory, "time", wall)
    yield wall


async def started(history_size: int = SIZE, history_ttl: float = 86_400.0) -> Gateway:
    settings = Settings(
        jwt_secret="s" * 32, retry_ms=RETRY_MS, history_size=history_size, history_ttl=history_ttl
    )
    gateway = Gateway(settings, MemoryBroker(history_size=history_size), fd_limit=10_000)
    await gateway.start()
    return gateway


async def publish(gateway: Gateway, count: int = 1) -> list[str]:
    events = [PreparedEvent(CHANNEL, "n", str(n)) for n in range(count)]
    published = await gateway.broker.publish_events(events)
    await settle(2)  # the embedded broker hands the messages over on a later turn
    return [str(p) for p in published]


def open_now(gateway: Gateway, last: str | None = None, *, chunked: bool = True) -> Any:
    """Opens a stream and returns (stream, transport) before any history read ran."""
    transport = FakeTransport()
    stream = gateway.lifecycle.open(
        transport,  # type: ignore[arg-type]
        PLAYER,
        last,
        HEAD,
        chunked=chunked,
    )
    return stream, transport


async def open_stream(
    gateway: Gateway, last: str | None = None, *, chunked: bool = True
) -> tuple[Stream, FakeTransport]:
    stream, transport = open_now(gateway, last, chunked=chunked)
    await settle(10)  # a history read, then (not recovered) a read of where it ends
    return stream, transport


def frames(transport: FakeTransport) -> tuple[list[Frame], bool]:
    """Each chunk after the head as one frame, and whether the body ended."""
    output = transport.output
    assert output.startswith(HEAD)
    chunks, ended = split_chunks(output[len(HEAD) :])
    out: list[Frame] = []
    for data in chunks:
        parsed = parse_sse(data)
        [event] = parsed.events  # one frame per chunk
        out.append((event.type, event.id, event.data, parsed.retry))
    return out, ended


def connected_of(transport: FakeTransport) -> tuple[str, dict[str, Any]]:
    """The first frame, which must be `connected` with `retry:`: (its id, its payload)."""
    [(kind, event_id, data, retry), *_], _ = frames(transport)
    assert (kind, retry) == ("connected", RETRY_MS)
    payload: dict[str, Any] = json.loads(data)
    return event_id, payload


def assert_position_of_now(event_id: str, before_ms: int, after_ms: int) -> None:
    """A position id (the resume id of an empty history): the millisecond before the broker's
    clock at the read, which came between `before_ms` and `after_ms` (wall clock)."""
    parsed = parse_stream_id(event_id)
    assert parsed is not None and is_position(parsed), event_id
    assert before_ms - 1 <= parsed[0] <= after_ms - 1, (event_id, before_ms, after_ms)


def now_ms() -> int:
    return int(time.time() * 1000)


def event_ids(transport: FakeTransport) -> list[str]:
    found, _ = frames(transport)
    return [event_id for kind, event_id, _, _ in found[1:] if kind == "n"]


def live_data(transport: FakeTransport) -> list[str]:
    """The data of every frame after `connected`."""
    found, _ = frames(transport)
    return [data for _, _, data, _ in found[1:]]


def deliver(gateway: Gateway, *event_ids: str | None) -> None:
    """Live events of the channel, as Pub/Sub hands them over, data `live <id>`."""
    for event_id in event_ids:
        frame = encode_event("n", f"live {event_id}", event_id)
        gateway.hub.deliver(CHANNEL, http_chunk(frame), event_id)


def next_id(event_id: str) -> str:
    parsed = parse_stream_id(event_id)
    assert parsed is not None
    return format_stream_id((parsed[0], parsed[1] + 1))


# --- no Last-Event-ID: an empty history ---------------------------------------------------------


@run_in_loop
async def test_a_stream_on_an_empty_history_starts_at_a_position_just_before_now() -> None:
    gateway = await started()
    before = now_ms()
    stream, transport = await open_stream(gateway)
    after = now_ms()
    assert stream.state is StreamState.LIVE
    assert type(stream) is Stream
    [chunk], ended = split_chunks(transport.output[len(HEAD) :])
    assert not ended
    [event] = parse_sse(chunk).events
    assert_position_of_now(event.id, before, after)
    payload = json.loads(event.data)
    assert "recovered" not in payload
    # The exact frame: `id:`, `event:`, `retry:`, `data:` in one block, no `retry:` of its own.
    assert chunk == (
        f"id: {event.id}\nevent: connected\nretry: 1500\ndata: ".encode()
        + json.dumps(payload, separators=(",", ":")).encode()
        + b"\n\n"
    )
    assert payload["player_id"] == "p1"
    # What is published next is after the position: sent.
    [live] = await publish(gateway)
    assert event_ids(transport) == [live]


@run_in_loop
async def test_the_position_of_an_empty_history_is_the_millisecond_before_the_brokers_clock(
    clock: WallClock,
) -> None:
    gateway = await started()
    _, transport = await open_stream(gateway)
    event_id, _ = connected_of(transport)
    assert event_id == position_id(NOW_MS - 1)
    # An event published in the same millisecond as the read is after it: sent.
    [live] = await publish(gateway)
    assert live == f"{NOW_MS}-0"
    assert event_ids(transport) == [live]


@run_in_loop
async def test_the_position_is_after_every_id_given_even_if_the_wall_clock_went_back(
    clock: WallClock,
) -> None:
    gateway = await started()
    other = PreparedEvent(channel_name("b1", "other"), "n", "0")
    [given] = await gateway.broker.publish_events([other])  # another player's history
    clock.now_ms -= 5_000  # the wall clock steps back; the broker's ids do not
    _, transport = await open_stream(gateway)
    event_id, _ = connected_of(transport)
    assert event_id == position_id(NOW_MS - 1)
    assert parse_stream_id(event_id) < parse_stream_id(given)  # type: ignore[operator]
    [live] = await publish(gateway)
    assert parse_stream_id(live) > parse_stream_id(event_id)  # type: ignore[operator]
    assert event_ids(transport) == [live]


@run_in_loop
async def test_a_position_is_no_floor_for_plain_publishes_whatever_their_custom_id(
    clock: WallClock,
) -> None:
    # docs/api.md: "an event published after a client has read `connected` always arrives".
    # A plain PUBLISH may carry any custom id, also one shaped like `<ms>-<seq>` and below
    # the position.
    gateway = await started()
    stream, transport = await open_stream(gateway)
    assert connected_of(transport)[0] == position_id(NOW_MS - 1)
    assert stream.floor is None
    deliver(gateway, "9-1", "custom-1", None)
    assert live_data(transport) == ["live 9-1", "live custom-1", "live None"]


@run_in_loop
async def test_plain_publishes_held_during_the_read_of_an_empty_history_are_sent(
    clock: WallClock,
) -> None:
    gateway = await started()
    stream, transport = open_now(gateway)
    assert stream.state is StreamState.REPLAYING  # until the head read answers
    deliver(gateway, "9-1", "custom-1", None)
    await settle(10)
    assert stream.state is StreamState.LIVE
    assert connected_of(transport)[0] == position_id(NOW_MS - 1)
    assert live_data(transport) == ["live 9-1", "live custom-1", "live None"]


# --- no Last-Event-ID: a history with entries ---------------------------------------------------


@run_in_loop
async def test_a_stream_on_a_history_starts_at_its_newest_entry_and_does_not_get_it_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    gateway = await started()
    sent = await publish(gateway, 3)
    history_reads: list[object] = []
    head_reads: list[list[bytes]] = []
    read_heads = MemoryBroker.read_heads

    async def recorded(self: MemoryBroker, channels: list[bytes]) -> Any:
        head_reads.append(list(channels))
        return await read_heads(self, channels)

    monkeypatch.setattr(MemoryBroker, "read_history", lambda *args: history_reads.append(args))
    monkeypatch.setattr(MemoryBroker, "read_heads", recorded)
    stream, transport = open_now(gateway)
    assert stream.state is StreamState.REPLAYING  # not live before it knows where it starts
    assert transport.writes == []
    await settle(10)
    assert stream.state is StreamState.LIVE
    event_id, payload = connected_of(transport)
    assert event_id == sent[-1]
    assert "recovered" not in payload
    assert event_ids(transport) == []  # none of the history: the client has it "up to here"
    assert head_reads == [[CHANNEL]] and history_reads == []
    # A late live copy of the newest entry (published before the read, handed over after it)
    # is not sent again; what is published next is.
    deliver(gateway, sent[-1])
    assert event_ids(transport) == []
    [new] = await publish(gateway)
    assert event_ids(transport) == [new]
    assert gateway.metrics.replays["recovered"] == gateway.metrics.replays["not_recovered"] == 0


@run_in_loop
async def test_live_events_held_during_the_head_read_at_or_below_the_newest_entry_are_left_out(
    clock: WallClock,
) -> None:
    gateway = await started()
    older, newest = await publish(gateway, 2)
    newer = next_id(newest)  # published after the read, handed over before its answer
    stream, transport = open_now(gateway)
    assert stream.state is StreamState.REPLAYING
    deliver(gateway, older, None, newest, "custom", newer, newest)
    await settle(10)
    assert stream.state is StreamState.LIVE
    assert connected_of(transport)[0] == newest
    assert live_data(transport) == ["live None", "live custom", f"live {newer}"]


@run_in_loop
async def test_a_reconnect_with_the_newest_entry_replays_exactly_what_came_after() -> None:
    gateway = await started(history_size=10)
    first = await publish(gateway, 2)
    stream, transport = await open_stream(gateway)
    resume = connected_of(transport)[0]
    assert resume == first[-1]
    stream.connection_lost(None)
    missed = await publish(gateway, 3)
    _, transport = await open_stream(gateway, resume)
    event_id, payload = connected_of(transport)
    assert (event_id, payload["recovered"]) == (resume, True)
    assert event_ids(transport) == missed


# --- Last-Event-ID -----------------------------------------------------------------------------


@run_in_loop
async def test_a_recovered_replay_resumes_from_the_clients_own_id_normalized() -> None:
    gateway = await started()
    sent = await publish(gateway, 3)
    ms, seq = sent[0].split("-")
    _, transport = await open_stream(gateway, f"00{ms}-0{seq}")  # same id, other spelling
    event_id, payload = connected_of(transport)
    assert event_id == sent[0]
    assert payload["recovered"] is True
    assert event_ids(transport) == sent[1:]
    assert gateway.metrics.replays["recovered"] == 1


async def position_of_an_empty_history(gateway: Gateway) -> str:
    """The resume id a stream gets on the player's empty history (the stream then goes)."""
    stream, transport = await open_stream(gateway)
    position, _ = connected_of(transport)
    parsed = parse_stream_id(position)
    assert parsed is not None and is_position(parsed), position
    stream.connection_lost(None)
    return position


@run_in_loop
async def test_a_position_replays_what_came_after_it_while_the_history_is_not_full() -> None:
    gateway = await started()
    position = await position_of_an_empty_history(gateway)
    sent = await publish(gateway, SIZE)
    _, transport = await open_stream(gateway, position)
    event_id, payload = connected_of(transport)
    assert (event_id, payload["recovered"]) == (position, True)
    assert event_ids(transport) == sent
    assert gateway.metrics.replays["recovered"] == 1


@run_in_loop
async def test_a_position_with_nothing_after_it_is_recovered_with_nothing_to_replay() -> None:
    gateway = await started()
    position = await position_of_an_empty_history(gateway)
    _, transport = await open_stream(gateway, position)
    event_id, payload = connected_of(transport)
    assert (event_id, payload["recovered"]) == (position, True)
    assert event_ids(transport) == []
    [live] = await publish(gateway)
    assert event_ids(transport) == [live]


@run_in_loop
async def test_a_position_on_a_trimmed_history_is_not_recovered_and_starts_at_its_end() -> None:
    gateway = await started()
    position = await position_of_an_empty_history(gateway)
    sent = await publish(gateway, SIZE + 2)  # the history keeps SIZE + 1: trimmed
    _, transport = await open_stream(gateway, position)
    event_id, payload = connected_of(transport)
    assert payload["recovered"] is False
    assert event_id == sent[-1]  # where the history ends: a reconnect from it misses nothing
    assert event_ids(transport) == []  # no partial replay
    assert gateway.metrics.replays["not_recovered"] == 1
    [live] = await publish(gateway)
    assert event_ids(transport) == [live]


@run_in_loop
async def test_a_position_older_than_the_history_ttl_is_not_recovered(clock: WallClock) -> None:
    # Events published more than the TTL after a position may have expired unsent.
    gateway = await started(history_ttl=0.5)
    position = await position_of_an_empty_history(gateway)
    assert position == position_id(NOW_MS - 1)
    clock.now_ms += 600
    [sent] = await publish(gateway, 1)
    _, transport = await open_stream(gateway, position)
    event_id, payload = connected_of(transport)
    assert payload["recovered"] is False
    assert event_id == sent  # where the history ends
    assert event_ids(transport) == []


@run_in_loop
async def test_a_position_within_the_history_ttl_is_recovered(clock: WallClock) -> None:
    gateway = await started(history_ttl=0.5)
    position = await position_of_an_empty_history(gateway)
    clock.now_ms += 400
    [sent] = await publish(gateway, 1)
    _, transport = await open_stream(gateway, position)
    event_id, payload = connected_of(transport)
    assert (event_id, payload["recovered"]) == (position, True)
    assert event_ids(transport) == [sent]


@pytest.mark.parametrize("last", ["1-0", "custom:id", "99999999999999-0"])
@run_in_loop
async def test_an_id_that_cannot_be_recovered_starts_where_the_history_ends(last: str) -> None:
    gateway = await started()
    sent = await publish(gateway, 2)
    _, transport = await open_stream(gateway, last)
    event_id, payload = connected_of(transport)
    assert payload["recovered"] is False
    assert event_id == sent[-1]  # the head, not the client's id
    assert event_ids(transport) == []
    # The client's id is no floor (it may be from a Redis that restarted): live events below
    # it still reach it.
    [live] = await publish(gateway)
    assert event_ids(transport) == [live]


@pytest.mark.parametrize("last", ["1-0", "custom:id"])
@run_in_loop
async def test_an_id_that_cannot_be_recovered_on_an_empty_history_starts_at_a_position(
    clock: WallClock, last: str
) -> None:
    gateway = await started()
    _, transport = await open_stream(gateway, last)
    event_id, payload = connected_of(transport)
    assert payload["recovered"] is False
    assert event_id == position_id(NOW_MS - 1)
    [live] = await publish(gateway)
    assert event_ids(transport) == [live]


@run_in_loop
async def test_a_position_later_than_now_is_not_recovered(clock: WallClock) -> None:
    # A forged (or far future) position would otherwise hide every event until then.
    gateway = await started()
    _, transport = await open_stream(gateway, position_id(NOW_MS + 3_600_000))
    event_id, payload = connected_of(transport)
    assert payload["recovered"] is False
    assert event_id == position_id(NOW_MS - 1)
    [live] = await publish(gateway)
    assert event_ids(transport) == [live]


@run_in_loop
async def test_live_events_held_during_an_unrecovered_replay_are_sent_after_the_head() -> None:
    # Held through the replay read and the head read: those above where the history ends
    # (and those without a history id) are sent, each once and in order; those at or below
    # it were published before the head read.
    gateway = await started()
    older, newest = await publish(gateway, 2)
    newer = next_id(newest)
    stream, transport = open_now(gateway, "1-0")
    assert stream.state is StreamState.REPLAYING
    deliver(gateway, older, None, "custom", newest, newer, older, newer)
    await settle(10)
    assert stream.state is StreamState.LIVE
    event_id, payload = connected_of(transport)
    assert (event_id, payload["recovered"]) == (newest, False)
    assert live_data(transport) == ["live None", "live custom", f"live {newer}"]


# --- failures and races ------------------------------------------------------------------------


async def down(self: MemoryBroker, *args: object) -> Any:
    raise BrokerUnavailable("down")


def assert_closed_replay_failed(gateway: Gateway, stream: Stream, transport: Any) -> None:
    assert stream.state is StreamState.CLOSED
    found, ended = frames(transport)
    assert ended and transport.closed and not transport.aborted
    [(kind, event_id, data, retry)] = found  # no `connected`: the client comes back
    assert (kind, event_id, json.loads(data)["reason"]) == ("close", "", "replay_failed")
    assert retry is not None and RETRY_MS <= retry < RETRY_MS + RETRY_SPREAD_MS
    assert gateway.metrics.closed["replay_failed"] == 1
    assert gateway.lifecycle.open_streams == 0


@run_in_loop
async def test_a_failed_history_read_closes_with_a_close_event(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    gateway = await started()
    sent = await publish(gateway, 2)
    monkeypatch.setattr(MemoryBroker, "read_history", down)
    stream, transport = await open_stream(gateway, sent[0])
    assert_closed_replay_failed(gateway, stream, transport)
    assert gateway.metrics.replays["failed"] == 1


@pytest.mark.parametrize("last", [None, "custom:id", "1-0"])
@run_in_loop
async def test_a_failed_head_read_closes_with_a_close_event(
    monkeypatch: pytest.MonkeyPatch, last: str | None
) -> None:
    # Without an id, with one that is no history id, and after a replay that was not
    # recovered: the stream cannot know where it starts, the client is asked to come back.
    gateway = await started()
    await publish(gateway, 2)
    monkeypatch.setattr(MemoryBroker, "read_heads", down)
    stream, transport = await open_stream(gateway, last)
    assert_closed_replay_failed(gateway, stream, transport)
    assert gateway.metrics.replays["recovered"] == 0


@pytest.mark.parametrize("last", [None, "1-0"])
@run_in_loop
async def test_a_stream_gone_while_its_history_is_read_writes_nothing(last: str | None) -> None:
    gateway = await started()
    await publish(gateway, 2)
    stream, transport = open_now(gateway, last)
    assert stream.state is StreamState.REPLAYING
    stream.connection_lost(None)
    await settle(10)
    assert stream.state is StreamState.CLOSED
    assert transport.writes == [] and transport.late_writes == []
    assert gateway.metrics.closed["client"] == 1
    assert gateway.lifecycle.open_streams == 0


@run_in_loop
async def test_heads_of_streams_opened_in_one_turn_are_read_together(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    gateway = await started()
    sent = await publish(gateway, 2)
    head_reads: list[list[bytes]] = []
    read_heads = MemoryBroker.read_heads

    async def recorded(self: MemoryBroker, channels: list[bytes]) -> Any:
        head_reads.append(list(channels))
        return await read_heads(self, channels)

    monkeypatch.setattr(MemoryBroker, "read_heads", recorded)
    opened = [open_now(gateway) for _ in range(3)]
    await settle(10)
    assert head_reads == [[CHANNEL] * 3]
    for stream, transport in opened:
        assert stream.state is StreamState.LIVE
        assert connected_of(transport)[0] == sent[-1]


# --- HTTP/1.0 ------------------------------------------------------------------------------------


@run_in_loop
async def test_an_http10_stream_is_plain_from_connected_to_close() -> None:
    gateway = await started()
    sent = await publish(gateway, 2)
    stream, transport = await open_stream(gateway, sent[0], chunked=False)
    assert type(stream) is PlainStream
    [live] = await publish(gateway)
    gateway.lifecycle.close_all("shutdown")
    output = transport.output
    assert output.startswith(HEAD)
    body = output[len(HEAD) :]
    assert b"\r\n" not in body and not body.endswith(END_CHUNK)  # no chunk framing
    parsed = parse_sse(body)
    assert [(e.type, e.id) for e in parsed.events] == [
        ("connected", sent[0]),
        ("n", sent[1]),
        ("n", live),
        ("close", live),  # (the spec parser's id persists: the close frame has none)
    ]
    assert body.startswith(f"id: {sent[0]}\nevent: connected\nretry: {RETRY_MS}\n".encode())
    assert json.loads(parsed.events[-1].data)["reason"] == "shutdown"
    assert transport.closed


@run_in_loop
async def test_an_http10_stream_on_a_history_starts_at_its_newest_entry() -> None:
    gateway = await started()
    sent = await publish(gateway, 2)
    stream, transport = await open_stream(gateway, chunked=False)
    assert type(stream) is PlainStream
    body = transport.output[len(HEAD) :]
    assert body.startswith(f"id: {sent[-1]}\nevent: connected\nretry: {RETRY_MS}\n".encode())
    assert [e.type for e in parse_sse(body).events] == ["connected"]


# --- the embedded broker's heads ---------------------------------------------------------------


@run_in_loop
async def test_memory_broker_heads_are_newest_entries_and_its_clock(clock: WallClock) -> None:
    broker = MemoryBroker(history_size=SIZE)
    other = channel_name("b1", "other")
    published = await broker.publish_events([PreparedEvent(CHANNEL, "n", str(n)) for n in range(2)])
    heads, now = await broker.read_heads([CHANNEL, other, CHANNEL])
    assert heads == [published[-1], None, published[-1]]
    assert now == NOW_MS
    clock.now_ms += 7
    assert (await broker.read_heads([other]))[1] == NOW_MS + 7
    # Entries: what read_history gives from the start, the newest last.
    [entries] = await broker.read_history([(CHANNEL, "0-0")], 10)
    assert [e.id for e in entries] == list(published)
    assert entries[-1] == HistoryEntry(published[-1], "n", "1")


# --- session expiry (issue 10 item 5) and the per-player cap (item 12) --------------------------


class WallSeconds:
    """The session expiry's `time` module, with a wall clock the test moves."""

    def __init__(self) -> None:
        self.now = time.time()

    def time(self) -> float:
        return self.now


@pytest.fixture
def wall(monkeypatch: pytest.MonkeyPatch) -> WallSeconds:
    clock = WallSeconds()
    monkeypatch.setattr(sse_gateway.streams.expiry, "time", clock)
    return clock


def open_until(gateway: Gateway, valid_until: float, player: str = "p1") -> Any:
    transport = FakeTransport()
    identity = Identity("b1", player, valid_until)
    stream = gateway.lifecycle.open(transport, identity, None, HEAD)  # type: ignore[arg-type]
    return stream, transport


@run_in_loop
async def test_a_live_stream_ends_with_session_expired_when_its_token_expires(
    wall: WallSeconds,
) -> None:
    gateway = await started()
    stream, transport = open_until(gateway, wall.now + 10)
    await settle(10)
    assert stream.state is StreamState.LIVE
    [live] = await publish(gateway)
    wall.now += 9
    await advance(9)
    assert stream.state is StreamState.LIVE  # not yet
    wall.now += 2
    await advance(2)
    assert stream.state is StreamState.CLOSED
    found, ended = frames(transport)
    assert [(kind, event_id) for kind, event_id, _, _ in found] == [
        ("connected", found[0][1]),
        ("n", live),
        ("session_expired", ""),  # no `id:`: the client keeps its last event id
    ]
    _, _, data, retry = found[-1]
    assert json.loads(data)["reason"] == "session_expired"
    assert retry == RETRY_MS
    assert ended and transport.closed and not transport.aborted
    assert gateway.metrics.closed["session_expired"] == 1
    assert gateway.hub.get(CHANNEL) is None
    assert len(gateway.lifecycle.expiry) == 0
    await publish(gateway)  # nothing is written after the close
    assert transport.late_writes == []


@run_in_loop
async def test_a_stream_whose_token_expires_before_it_is_live_gets_only_session_expired(
    wall: WallSeconds,
) -> None:
    gateway = await started()
    stream, transport = open_until(gateway, wall.now - 1)
    await settle(10)
    assert stream.state is StreamState.CLOSED
    found, ended = frames(transport)
    assert [kind for kind, *_ in found] == ["session_expired"]
    assert ended
    assert gateway.metrics.closed["session_expired"] == 1
    assert gateway.lifecycle.open_streams == 0


@run_in_loop
async def test_a_stream_that_closes_first_leaves_the_expiry() -> None:
    gateway = await started()
    stream, _ = open_until(gateway, time.time() + 3600)
    await settle(10)
    assert len(gateway.lifecycle.expiry) == 1
    stream.connection_lost(None)
    assert len(gateway.lifecycle.expiry) == 0
    assert stream.expires_at == 0.0
    assert gateway.metrics.closed["client"] == 1


@run_in_loop
async def test_a_stream_without_a_deadline_is_not_in_the_expiry() -> None:
    gateway = await started()
    stream, _ = open_now(gateway)
    await settle(10)
    assert stream.state is StreamState.LIVE
    assert len(gateway.lifecycle.expiry) == 0


@pytest.mark.parametrize("cap", [0, 1, 3])
@run_in_loop
async def test_player_at_cap_counts_the_players_open_streams_in_this_process(cap: int) -> None:
    settings = Settings(jwt_secret="s" * 32, max_connections_per_player=cap)
    gateway = Gateway(settings, MemoryBroker(), fd_limit=10_000)
    await gateway.start()
    lifecycle = gateway.lifecycle
    me, other = Identity("b1", "p1"), Identity("b1", "p2")
    streams = []
    for _ in range(cap or 5):
        assert not lifecycle.player_at_cap(me)
        streams.append(open_now(gateway)[0])  # counted from the hand-over on, while joining
    assert lifecycle.player_at_cap(me) is (cap > 0)
    assert not lifecycle.player_at_cap(other)
    await settle(10)
    assert lifecycle.player_at_cap(me) is (cap > 0)
    streams[0].connection_lost(None)
    assert not lifecycle.player_at_cap(me)
