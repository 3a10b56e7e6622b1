"""No exception in a broker or history callback can stall a stream or a channel (issue 9, 5).

The whole gateway in-process over the embedded broker, with fake transports; a failure is
injected where a bug or an unforeseen entry would raise. The stream or channel hit must end
with `event: close` and its `retry:` (its clients come back and replay from history), as the
chunked body's last chunk; every other one goes on.
"""

from __future__ import annotations

import json
from typing import Any, NoReturn

import pytest
from fakes import FakeTransport, run_in_loop, settle, split_chunks
from sse_spec_parser import parse_sse

from sse_gateway.app import Gateway
from sse_gateway.broker.memory import MemoryBroker
from sse_gateway.publish.events import PreparedEvent
from sse_gateway.settings import Settings
from sse_gateway.streams.history import HistoryReader
from sse_gateway.streams.lifecycle import StreamLifecycle
from sse_gateway.streams.stream import RETRY_SPREAD_MS, Stream, StreamState
from sse_gateway.wire.naming import Identity, channel_name

PLAYER = Identity("b1", "p1")
OTHER = Identity("b1", "p2")
HEAD = b"HTTP/1.1 200 OK\r\n\r\n"


def boom(*_: Any, **__: Any) -> NoReturn:
    raise RuntimeError("injected failure")


async def started() -> Gateway:
    gateway = Gateway(Settings(jwt_secret="s" * 32), MemoryBroker(), fd_limit=10_000)
    await gateway.start()
    return gateway


async def publish(gateway: Gateway, who: Identity, data: str) -> str:
    channel = channel_name(who.brand_id, who.player_id)
    [event_id] = await gateway.broker.publish_events([PreparedEvent(channel, "n", data)])
    await settle(2)  # the embedded broker hands the message over on a later turn
    return str(event_id)


def open_stream(gateway: Gateway, who: Identity, last: str | None = None) -> tuple[Stream, Any]:
    transport = FakeTransport()
    stream = gateway.lifecycle.open(transport, who, last, HEAD)  # type: ignore[arg-type]
    return stream, transport


def ended_with_retry(transport: Any, reason: str) -> bool:
    """Closed after a last frame `event: close` (`reason`, SSE_RETRY_MS plus spread) and the
    chunked body's last chunk."""
    assert transport.closed and not transport.aborted
    output = transport.output
    assert output.startswith(HEAD)
    chunks, ended = split_chunks(output[len(HEAD) :])
    assert ended, f"no last chunk: {output[-80:]!r}"
    parsed = parse_sse(chunks[-1])
    [close] = parsed.events
    assert close.type == "close", close
    assert json.loads(close.data)["reason"] == reason, close
    retry_ms = Settings(jwt_secret="s" * 32).retry_ms
    assert parsed.retry is not None and retry_ms <= parsed.retry < retry_ms + RETRY_SPREAD_MS
    return True


@run_in_loop
async def test_a_replay_that_raises_closes_its_stream_with_a_retry(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    gateway = await started()
    first = await publish(gateway, PLAYER, "1")
    await publish(gateway, PLAYER, "2")
    bystander, bystander_out = open_stream(gateway, PLAYER)
    await settle(3)
    monkeypatch.setattr(HistoryReader, "events", boom)
    replaying, out = open_stream(gateway, PLAYER, first)
    await settle(5)
    assert replaying.state is StreamState.CLOSED
    assert ended_with_retry(out, "replay_failed") and b"event: connected" not in out.output
    assert gateway.metrics.replays["failed"] == 1
    assert gateway.metrics.closed["replay_failed"] == 1
    live = await publish(gateway, PLAYER, "3")
    assert f"id: {live}".encode() in bystander_out.output  # the channel goes on
    assert bystander.state is StreamState.LIVE


@run_in_loop
async def test_a_start_that_raises_closes_its_stream_with_a_retry(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    gateway = await started()
    monkeypatch.setattr(StreamLifecycle, "_go_live", boom)
    stream, out = open_stream(gateway, PLAYER)
    await settle(3)
    assert stream.state is StreamState.CLOSED
    assert ended_with_retry(out, "error")
    assert gateway.metrics.closed["error"] == 1
    assert gateway.lifecycle.open_streams == 0


@run_in_loop
async def test_a_refill_that_raises_does_not_stall_the_channel(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    gateway = await started()
    stream, out = open_stream(gateway, PLAYER)
    other, other_out = open_stream(gateway, OTHER)
    await settle(3)
    monkeypatch.setattr(HistoryReader, "events", boom)
    # A Pub/Sub drop: every channel holds its live events and refills from history once
    # subscribed again (at once, for the embedded broker).
    gateway.recovery.on_broker_state(False)
    await settle(5)
    channel = gateway.hub.get(channel_name(PLAYER.brand_id, PLAYER.player_id))
    assert channel is None or channel.held is None  # not held for ever
    assert stream.state is StreamState.CLOSED and ended_with_retry(out, "error")
    assert other.state is StreamState.CLOSED and ended_with_retry(other_out, "error")
    monkeypatch.undo()
    # The player comes back, and the channel delivers again.
    again, again_out = open_stream(gateway, PLAYER)
    await settle(3)
    live = await publish(gateway, PLAYER, "4")
    assert f"id: {live}".encode() in again_out.output
    assert again.state is StreamState.LIVE
