"""OutageRecovery with the history reads and the subscription confirmations under the test's
control: the order of outages, confirmations and read results that a fast channel meets."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable

from fakes import FakeOwner, FakeTransport, dechunk, http_chunk, run_in_loop, split_chunks, turns
from sse_spec_parser import parse_sse

from sse_gateway.broker.base import HistoryEntry
from sse_gateway.metrics import Metrics
from sse_gateway.streams.history import HistoryReader
from sse_gateway.streams.hub import ConnectionHub
from sse_gateway.streams.recovery import OutageRecovery
from sse_gateway.streams.stream import RETRY_SPREAD_MS, Stream
from sse_gateway.wire.frames import encode_event
from sse_gateway.wire.ids import parse_stream_id

CHANNEL = b"SSE::b1::p1"
HISTORY_SIZE = 5
CONNECTED = encode_event("connected", "{}")


class ControlledBroker:
    """Subscriptions confirm when the test says; nothing is read through it."""

    def __init__(self) -> None:
        self.connected = True
        self.waiters: list[Callable[[], None]] = []

    def redis_time_ms(self) -> int:
        return 0

    def subscribe(self, channel: bytes) -> None:
        pass

    def unsubscribe(self, channel: bytes) -> None:
        pass

    def when_subscribed(self, channel: bytes, callback: Callable[[], None]) -> None:
        self.waiters.append(callback)

    def confirm(self) -> None:
        waiters, self.waiters = self.waiters, []
        for waiter in waiters:
            waiter()


class ControlledReader(HistoryReader):
    """Reads return futures that the test completes."""

    def __init__(self, history_size: int = HISTORY_SIZE) -> None:
        super().__init__(None, history_size, Metrics())  # type: ignore[arg-type]
        self.reads: list[tuple[str, asyncio.Future[list[HistoryEntry]]]] = []

    def read(self, channel: bytes, start_id: str) -> asyncio.Future[list[HistoryEntry]]:
        future: asyncio.Future[list[HistoryEntry]] = asyncio.get_running_loop().create_future()
        self.reads.append((start_id, future))
        return future


def entry(n: int) -> HistoryEntry:
    return HistoryEntry(f"{n}-0", "n", str(n))


def live(hub: ConnectionHub, n: int) -> None:
    """A live event, as `Fanout` hands it to the hub: one chunk."""
    hub.deliver(CHANNEL, http_chunk(f"id: {n}-0\nevent: n\ndata: {n}\n\n".encode()), f"{n}-0")


def received(transport: FakeTransport) -> list[int]:
    """The ids of the events written, out of their chunks (every write is whole chunks)."""
    body = dechunk(transport.output).decode()
    ids = [line[4:] for line in body.splitlines() if line.startswith("id: ")]
    return [parsed[0] for parsed in map(parse_stream_id, ids) if parsed is not None]


@run_in_loop
async def test_a_refill_overtaken_by_a_second_outage_is_still_written() -> None:
    broker = ControlledBroker()
    hub = ConnectionHub(broker)  # type: ignore[arg-type]
    reader = ControlledReader()
    recovery = OutageRecovery(
        broker=broker,  # type: ignore[arg-type]
        hub=hub,
        history=reader,
        metrics=Metrics(),
        retry_ms=3000,
    )
    transport = FakeTransport()
    owner = FakeOwner()
    stream = Stream(transport, CHANNEL, 1, b"", owner)  # type: ignore[arg-type]
    hub.join(stream, lambda: None)
    broker.confirm()
    stream.go_live(CONNECTED, [], None)
    for n in range(1, 11):
        live(hub, n)
    # Outage 1: the channel holds; it is subscribed again and its refill reads from 10-0.
    recovery.on_broker_state(False)
    broker.confirm()
    [(start, first_read)] = reader.reads
    assert start == "10-0"
    for n in (13, 14):
        live(hub, n)  # live again, held while the refill runs
    # Outage 2 begins before the first read returns.
    recovery.on_broker_state(False)
    first_read.set_result([entry(n) for n in range(10, 15)])
    await turns(2)
    # The first read and the events held since its subscription are contiguous: written.
    assert received(transport) == list(range(1, 15))
    # Outage 2 ends; by now the history is trimmed far past 10-0 (it keeps 5 + 1 entries).
    broker.confirm()
    start, second_read = reader.reads[-1]
    assert start == "14-0"  # from where the first refill got to, not from the older gap
    second_read.set_result([entry(n) for n in range(14, 20)])
    await turns(2)
    assert received(transport) == list(range(1, 20))
    assert owner.closed == []  # no history_gap: the history never lost an event
    live(hub, 20)
    assert received(transport)[-1] == 20


class Setup:
    """A channel with one live stream that has received events 1..10."""

    def __init__(self, history_size: int = 50) -> None:
        self.broker = ControlledBroker()
        self.hub = ConnectionHub(self.broker)  # type: ignore[arg-type]
        self.reader = ControlledReader(history_size)
        self.recovery = OutageRecovery(
            broker=self.broker,  # type: ignore[arg-type]
            hub=self.hub,
            history=self.reader,
            metrics=Metrics(),
            retry_ms=3000,
        )
        self.transport = FakeTransport()
        self.owner = FakeOwner()
        stream = Stream(self.transport, CHANNEL, 1, b"", self.owner)  # type: ignore[arg-type]
        self.hub.join(stream, lambda: None)
        self.broker.confirm()
        stream.go_live(CONNECTED, [], None)
        for n in range(1, 11):
            live(self.hub, n)

    def outage(self) -> None:
        self.recovery.on_broker_state(False)

    def resubscribed(self) -> asyncio.Future[list[HistoryEntry]]:
        """The channel is subscribed again: its refill's read goes out."""
        self.broker.confirm()
        return self.reader.reads[-1][1]

    def received(self) -> list[int]:
        return received(self.transport)


def history(first: int, last: int) -> list[HistoryEntry]:
    return [entry(n) for n in range(first, last + 1)]


@run_in_loop
async def test_an_overtaken_refill_writes_only_what_preceded_the_newer_outage() -> None:
    # Events held after the newer resubscription come after a hole (what was published during
    # the newer outage): the overtaken refill must not write them, or the hole is skipped.
    s = Setup()
    s.outage()  # 11, 12 published meanwhile
    read1 = s.resubscribed()
    live(s.hub, 13)
    live(s.hub, 14)
    s.outage()  # 15, 16 published meanwhile
    read2 = s.resubscribed()
    live(s.hub, 17)
    read1.set_result(history(10, 14))
    await turns(2)
    assert s.received() == list(range(1, 15))
    read2.set_result(history(10, 17))
    await turns(2)
    assert s.received() == list(range(1, 18))
    assert s.owner.closed == []


@run_in_loop
async def test_a_stale_read_after_a_newer_refill_wrote_is_ignored() -> None:
    s = Setup()
    s.outage()  # 11, 12 published meanwhile
    read1 = s.resubscribed()
    live(s.hub, 13)
    s.outage()  # 14 published meanwhile
    read2 = s.resubscribed()
    live(s.hub, 15)
    read2.set_result(history(10, 15))  # the newer read returns first
    await turns(2)
    assert s.received() == list(range(1, 16))
    live(s.hub, 16)
    s.outage()  # 17, 18 published meanwhile
    read3 = s.resubscribed()
    live(s.hub, 19)
    read1.set_result(history(10, 13))  # the first read, stale, returns at last
    await turns(2)
    assert s.received() == list(range(1, 17))  # nothing written out of turn
    read3.set_result(history(16, 19))
    await turns(2)
    assert s.received() == list(range(1, 20))
    assert s.owner.closed == []


@run_in_loop
async def test_a_stale_read_of_a_full_history_is_no_false_gap() -> None:
    s = Setup(history_size=2)
    s.outage()
    read1 = s.resubscribed()
    s.outage()
    read2 = s.resubscribed()
    read2.set_result(history(10, 12))  # full (size + 1 entries), and it holds 10: covered
    await turns(2)
    live(s.hub, 13)
    s.outage()
    read1.set_result(history(10, 12))
    await turns(2)
    assert s.owner.closed == []
    assert s.received() == list(range(1, 14))


@run_in_loop
async def test_a_history_gap_closes_the_streams_with_a_close_event_and_a_retry() -> None:
    s = Setup(history_size=2)
    s.outage()
    read = s.resubscribed()
    read.set_result(history(12, 14))  # trimmed (size + 1 entries) past 10, the last one sent
    await turns(2)
    assert [reason for _, reason in s.owner.closed] == ["history_gap"]
    assert s.transport.closed and not s.transport.aborted
    chunks, ended = split_chunks(s.transport.output)
    assert ended  # a graceful end of the chunked body: the client comes back
    parsed = parse_sse(chunks[-1])
    [close] = parsed.events
    assert close.type == "close"
    assert json.loads(close.data)["reason"] == "history_gap"
    assert parsed.retry is not None and 3000 <= parsed.retry < 3000 + RETRY_SPREAD_MS
    assert s.received() == list(range(1, 11))  # nothing of the trimmed history was written
