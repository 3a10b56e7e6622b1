"""StreamLifecycle's resume id: where each stream starts, as its first frame says.

The whole gateway in-process over the embedded broker, with fake transports and a loop whose
clock stands still (no heartbeat interferes). Every stream's first frame is `connected` with
`id:` (the resume id) and `retry:`: the client's own id after a recovered replay; otherwise a
position of Redis' clock a second before the stream went live (`<ms>-<2**64-1>`, an id no
entry has), before every event published after the subscription. A reconnect with it replays
what came after it.
"""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
from fakes import END_CHUNK, FakeTransport, http_chunk, run_in_loop, split_chunks, turns
from sse_spec_parser import parse_sse

from sse_gateway.app import Gateway
from sse_gateway.broker.base import BrokerUnavailable
from sse_gateway.broker.memory import MemoryBroker
from sse_gateway.publish.events import PreparedEvent
from sse_gateway.settings import Settings
from sse_gateway.streams.history import POSITION_MARGIN_MS
from sse_gateway.streams.stream import RETRY_SPREAD_MS, PlainStream, Stream, StreamState
from sse_gateway.wire.frames import encode_event
from sse_gateway.wire.ids import is_position, parse_stream_id
from sse_gateway.wire.naming import Identity, channel_name

PLAYER = Identity("b1", "p1")
CHANNEL = channel_name(PLAYER.brand_id, PLAYER.player_id)
HEAD = b"HTTP/1.1 200 OK\r\n\r\n"
RETRY_MS = 1500
SIZE = 3

Frame = tuple[str, str, str, int | None]  # (event type, id, data, retry)


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
    await turns(2)  # the embedded broker hands the messages over on a later turn
    return [str(p) for p in published]


async def open_stream(
    gateway: Gateway, last: str | None = None, *, chunked: bool = True
) -> tuple[Stream, FakeTransport]:
    transport = FakeTransport()
    stream = gateway.lifecycle.open(
        transport,  # type: ignore[arg-type]
        PLAYER,
        last,
        HEAD,
        chunked=chunked,
    )
    await turns(10)  # a history read, then (not recovered) a read of where it ends
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


def assert_position_of_now(event_id: str) -> None:
    """A position id (the resume id of an empty history): Redis' clock, a margin back."""
    parsed = parse_stream_id(event_id)
    assert parsed is not None and is_position(parsed), event_id
    now_ms = int(time.time() * 1000)
    assert now_ms - POSITION_MARGIN_MS - 5_000 <= parsed[0] <= now_ms - POSITION_MARGIN_MS


def event_ids(transport: FakeTransport) -> list[str]:
    found, _ = frames(transport)
    return [event_id for kind, event_id, _, _ in found[1:] if kind == "n"]


# --- no Last-Event-ID --------------------------------------------------------------------------


@run_in_loop
async def test_a_stream_starts_at_a_position_of_now() -> None:
    gateway = await started()
    stream, transport = await open_stream(gateway)
    assert stream.state is StreamState.LIVE
    assert type(stream) is Stream
    [chunk], ended = split_chunks(transport.output[len(HEAD) :])
    assert not ended
    [event] = parse_sse(chunk).events
    assert_position_of_now(event.id)
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
async def test_a_stream_without_an_id_replays_nothing_and_reads_no_history(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    gateway = await started()
    old = await publish(gateway, 3)
    reads: list[object] = []
    monkeypatch.setattr(MemoryBroker, "read_history", lambda *args: reads.append(args))
    transport = FakeTransport()
    stream = gateway.lifecycle.open(transport, PLAYER, None, HEAD)  # type: ignore[arg-type]
    assert stream.state is StreamState.LIVE  # at once: no read is needed to know where
    event_id, payload = connected_of(transport)
    assert_position_of_now(event_id)
    assert "recovered" not in payload
    assert event_ids(transport) == []  # not even those published within the margin: `old`
    assert old and reads == []
    [new] = await publish(gateway)
    assert event_ids(transport) == [new]
    assert stream.floor is None
    assert gateway.metrics.replays["recovered"] == gateway.metrics.replays["not_recovered"] == 0


@run_in_loop
async def test_a_plain_publish_after_connected_arrives_whatever_its_custom_id() -> None:
    # docs/api.md: "an event published after a client has read `connected` always arrives".
    # A plain PUBLISH may carry any custom id, also one shaped like `<ms>-<seq>` and below
    # the position.
    gateway = await started()
    _, transport = await open_stream(gateway)
    assert_position_of_now(connected_of(transport)[0])
    for event_id in ("9-1", "custom-1", None):
        frame = encode_event("n", f"live {event_id}", event_id)
        gateway.hub.deliver(CHANNEL, http_chunk(frame), event_id)
    found, _ = frames(transport)
    assert [data for _, _, data, _ in found[1:]] == ["live 9-1", "live custom-1", "live None"]


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
    assert_position_of_now(position)
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
    await publish(gateway, SIZE + 2)  # the history keeps SIZE + 1: trimmed
    _, transport = await open_stream(gateway, position)
    event_id, payload = connected_of(transport)
    assert payload["recovered"] is False
    assert_position_of_now(event_id)  # from now: a reconnect from it misses nothing new
    assert event_ids(transport) == []  # no partial replay
    assert gateway.metrics.replays["not_recovered"] == 1


@run_in_loop
async def test_a_position_older_than_the_history_ttl_is_not_recovered() -> None:
    # The position is a second back; with a TTL shorter than that, events published after it
    # may have expired unsent.
    gateway = await started(history_ttl=0.5)
    position = await position_of_an_empty_history(gateway)
    await publish(gateway, 1)
    _, transport = await open_stream(gateway, position)
    event_id, payload = connected_of(transport)
    assert payload["recovered"] is False
    assert_position_of_now(event_id)
    assert event_ids(transport) == []


@pytest.mark.parametrize("last", ["1-0", "custom:id", "99999999999999-0"])
@run_in_loop
async def test_an_id_that_cannot_be_recovered_starts_at_a_position_of_now(last: str) -> None:
    gateway = await started()
    await publish(gateway, 2)
    _, transport = await open_stream(gateway, last)
    event_id, payload = connected_of(transport)
    assert payload["recovered"] is False
    assert_position_of_now(event_id)
    assert event_ids(transport) == []
    # The client's id is no floor (it may be from a Redis that restarted): live events below
    # it still reach it.
    [live] = await publish(gateway)
    assert event_ids(transport) == [live]


@run_in_loop
async def test_a_position_later_than_now_is_not_recovered() -> None:
    # A forged (or far future) position would otherwise hide every event until then.
    gateway = await started()
    future_ms = int(time.time() * 1000) + 3_600_000
    _, transport = await open_stream(gateway, f"{future_ms}-{2**64 - 1}")
    event_id, payload = connected_of(transport)
    assert payload["recovered"] is False
    assert_position_of_now(event_id)
    [live] = await publish(gateway)
    assert event_ids(transport) == [live]


@run_in_loop
async def test_live_events_held_during_an_unrecovered_replay_are_all_sent() -> None:
    # They came by Pub/Sub after the subscription: published after the position the stream
    # is given, whatever their ids.
    gateway = await started()
    older, newest = await publish(gateway, 2)
    transport = FakeTransport()
    stream = gateway.lifecycle.open(transport, PLAYER, "1-0", HEAD)  # type: ignore[arg-type]
    assert stream.state is StreamState.REPLAYING
    for event_id in (older, None, "custom", newest, older):
        frame = encode_event("n", f"live {event_id}", event_id)
        gateway.hub.deliver(CHANNEL, http_chunk(frame), event_id)
    await turns(10)
    assert stream.state is StreamState.LIVE
    found, _ = frames(transport)
    assert found[0][0] == "connected" and json.loads(found[0][2])["recovered"] is False
    assert [data for _, _, data, _ in found[1:]] == [
        f"live {older}",
        "live None",
        "live custom",
        f"live {newest}",  # each stream id once, ascending: the second copy of `older` is not
    ]


# --- failures and races ------------------------------------------------------------------------


@run_in_loop
async def test_a_failed_history_read_closes_with_a_close_event(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    gateway = await started()
    sent = await publish(gateway, 2)

    async def down(self: MemoryBroker, *args: object) -> list[object]:
        raise BrokerUnavailable("down")

    monkeypatch.setattr(MemoryBroker, "read_history", down)
    stream, transport = await open_stream(gateway, sent[0])
    assert stream.state is StreamState.CLOSED
    found, ended = frames(transport)
    assert ended and transport.closed and not transport.aborted
    [(kind, event_id, data, retry)] = found  # no `connected`: the client comes back
    assert (kind, event_id, json.loads(data)["reason"]) == ("close", "", "replay_failed")
    assert retry is not None and RETRY_MS <= retry < RETRY_MS + RETRY_SPREAD_MS
    assert gateway.metrics.closed["replay_failed"] == 1
    assert gateway.metrics.replays["failed"] == 1
    assert gateway.lifecycle.open_streams == 0


@run_in_loop
async def test_a_stream_gone_while_its_history_is_read_writes_nothing() -> None:
    gateway = await started()
    sent = await publish(gateway, 2)
    transport = FakeTransport()
    stream = gateway.lifecycle.open(transport, PLAYER, sent[0], HEAD)  # type: ignore[arg-type]
    assert stream.state is StreamState.REPLAYING
    stream.connection_lost(None)
    await turns(10)
    assert stream.state is StreamState.CLOSED
    assert transport.writes == [] and transport.late_writes == []
    assert gateway.metrics.closed["client"] == 1
    assert gateway.lifecycle.open_streams == 0


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
