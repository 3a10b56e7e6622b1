"""broker/reads.py without a Redis: `xrange_entries` on replies as hiredis parses them,
`ReadProtocol` on a fake transport (batches answered in order however the bytes arrive, a lost
connection), and `HistoryReads` on a scripted Redis (the commands it writes, retries after a
closed connection, never after a timeout, replies that say Redis is not ready)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import hiredis
import pytest
from fakes import FakeTransport, run_in_loop, turns

from sse_gateway.broker.base import BrokerUnavailable, HistoryEntry
from sse_gateway.broker.reads import HistoryReads, ReadConnectionLost, ReadProtocol, xrange_entries
from sse_gateway.settings import RedisAddress

CH = b"SSE::b1::p1"

# --- xrange_entries ----------------------------------------------------------------------------


def test_xrange_entries_read_t_and_d_in_any_order() -> None:
    reply = [
        [b"1-0", [b"t", b"note", b"d", b'{"a":1}']],
        [b"2-0", [b"d", b"2", b"t", b"score"]],  # written by another publisher: d first
        [b"3-5", [b"x", b"1", b"t", b"n", b"y", b"2", b"d", b"3"]],  # other fields around
    ]
    assert xrange_entries(reply) == [
        HistoryEntry("1-0", "note", '{"a":1}'),
        HistoryEntry("2-0", "score", "2"),
        HistoryEntry("3-5", "n", "3"),
    ]


def test_xrange_entries_skip_entries_without_t_or_d() -> None:
    reply = [
        [b"1-0", [b"t", b"n"]],  # no data
        [b"2-0", [b"d", b"2"]],  # no type
        [b"3-0", []],
        [b"4-0", [b"x", b"t", b"y", b"d", b"z", b"w"]],  # `t` and `d` as values: no fields
        [b"5-0", [b"t", b"n", b"d", b"5"]],
        [b"6-0", [b"t", b"n", b"d"]],  # `d` without a value (odd field list)
    ]
    assert xrange_entries(reply) == [HistoryEntry("5-0", "n", "5")]
    assert xrange_entries([]) == []


def test_xrange_entries_decode_invalid_utf8_with_replacement() -> None:
    [entry] = xrange_entries([[b"1-0", [b"t", b"n\xff", b"d", b'"\xfe"']]])
    assert entry == HistoryEntry("1-0", "n\ufffd", '"\ufffd"')


# --- ReadProtocol on a fake transport ------------------------------------------------------------


def connected() -> tuple[ReadProtocol, FakeTransport]:
    protocol = ReadProtocol()
    transport = FakeTransport()
    protocol.connection_made(transport)  # type: ignore[arg-type]
    return protocol, transport


@run_in_loop
async def test_replies_answer_the_batches_in_the_order_they_were_sent() -> None:
    protocol, transport = connected()
    first = protocol.send(b"*1\r\n$4\r\nPING\r\n*1\r\n$4\r\nTIME\r\n", 2)
    second = protocol.send(b"*1\r\n$4\r\nPING\r\n", 1)
    assert transport.writes == [
        b"*1\r\n$4\r\nPING\r\n*1\r\n$4\r\nTIME\r\n",  # one write per batch
        b"*1\r\n$4\r\nPING\r\n",
    ]
    assert not first.done() and not second.done()
    protocol.data_received(b"+PONG\r\n*2\r\n$2\r\n17\r\n$1\r\n5\r\n+PONG\r\n")
    assert first.result() == [b"PONG", [b"17", b"5"]]
    assert second.result() == [b"PONG"]
    assert not protocol.batches


@run_in_loop
async def test_an_error_reply_is_a_reply_not_a_failed_batch() -> None:
    protocol, _ = connected()
    batch = protocol.send(b"...", 3)
    protocol.data_received(b"+OK\r\n-WRONGTYPE not a stream\r\n:7\r\n")
    ok, error, number = batch.result()
    assert (ok, number) == (b"OK", 7)
    assert isinstance(error, Exception) and "WRONGTYPE" in str(error)


@run_in_loop
async def test_replies_split_over_many_reads_answer_a_batch_once_all_came() -> None:
    protocol, _ = connected()
    batch = protocol.send(b"...", 2)
    later = protocol.send(b"...", 1)
    replies = b"*2\r\n*2\r\n$3\r\n1-0\r\n*0\r\n$5\r\nhello\r\n+OK\r\n"
    for n in range(len(replies)):  # byte by byte
        assert not batch.done(), n
        protocol.data_received(replies[n : n + 1])
    assert batch.result() == [[[b"1-0", []], b"hello"], b"OK"]
    assert not later.done()
    protocol.data_received(b"$3\r\nb")
    protocol.data_received(b"ye\r\n")
    assert later.result() == [b"bye"]


@run_in_loop
async def test_replies_of_several_batches_in_one_read_and_across_reads() -> None:
    protocol, _ = connected()
    one = protocol.send(b"...", 1)
    two = protocol.send(b"...", 2)
    three = protocol.send(b"...", 1)
    protocol.data_received(b":1\r\n:2\r\n:")  # one's reply, half of two's
    assert one.result() == [1] and not two.done()
    protocol.data_received(b"3\r\n:4\r\n")
    assert two.result() == [2, 3] and three.result() == [4]


@run_in_loop
async def test_a_batch_whose_waiter_gave_up_still_takes_its_own_replies() -> None:
    # A timed-out read (its future cancelled): its replies must not answer the next batch.
    protocol, _ = connected()
    gone = protocol.send(b"...", 2)
    kept = protocol.send(b"...", 1)
    gone.cancel()
    protocol.data_received(b":1\r\n:2\r\n:3\r\n")
    assert gone.cancelled()
    assert kept.result() == [3]


@run_in_loop
async def test_a_lost_connection_fails_every_pending_batch_with_read_connection_lost() -> None:
    protocol, transport = connected()
    answered = protocol.send(b"...", 1)
    pending = protocol.send(b"...", 2)
    waiting = protocol.send(b"...", 1)
    protocol.data_received(b":1\r\n:2\r\n")  # answered, and half of pending
    protocol.connection_lost(ConnectionResetError("reset"))
    assert answered.result() == [1]
    for future in (pending, waiting):
        with pytest.raises(ReadConnectionLost):
            future.result()
    assert issubclass(ReadConnectionLost, ConnectionError)
    assert protocol.closed and protocol.transport is None and not protocol.batches
    # A send after the close fails at once, and writes nothing.
    late = protocol.send(b"*1\r\n$4\r\nPING\r\n", 1)
    assert late.done()
    with pytest.raises(ReadConnectionLost):
        late.result()
    assert len(transport.writes) == 3 and transport.late_writes == []


@run_in_loop
async def test_a_send_before_the_connection_is_made_fails_at_once() -> None:
    protocol = ReadProtocol()
    future = protocol.send(b"...", 1)
    with pytest.raises(ReadConnectionLost):
        future.result()


@run_in_loop
async def test_abort_drops_the_connection_and_later_sends_fail() -> None:
    protocol, transport = connected()
    pending = protocol.send(b"...", 1)
    protocol.abort()
    assert transport.aborted and protocol.closed
    with pytest.raises(ReadConnectionLost):
        protocol.send(b"...", 1).result()
    protocol.connection_lost(None)  # what the transport reports after the abort
    with pytest.raises(ReadConnectionLost):
        pending.result()


@run_in_loop
async def test_a_protocol_error_aborts_the_connection() -> None:
    protocol, transport = connected()
    pending = protocol.send(b"...", 1)
    protocol.data_received(b"?what\r\n")  # no RESP type
    assert transport.aborted and protocol.closed and not pending.done()
    protocol.connection_lost(None)
    with pytest.raises(ReadConnectionLost):
        pending.result()


# --- HistoryReads on a scripted Redis ------------------------------------------------------------


def parse_commands(data: bytes) -> list[list[bytes]]:
    """The RESP commands in `data` (arrays of bulk strings)."""
    reader = hiredis.Reader()
    reader.feed(data)
    commands = []
    while (command := reader.gets()) is not False:
        commands.append(command)
    return commands


def resp(value: object) -> bytes:
    """`value` as a RESP reply: bytes a bulk string, int an integer, list an array, an
    Exception an error reply."""
    if isinstance(value, Exception):
        return b"-%s\r\n" % str(value).encode()
    if isinstance(value, bytes):
        return b"$%d\r\n%b\r\n" % (len(value), value)
    if isinstance(value, int):
        return b":%d\r\n" % value
    assert isinstance(value, list)
    return b"*%d\r\n" % len(value) + b"".join(resp(item) for item in value)


Answer = Callable[[list[bytes]], object]


class ScriptedRedis:
    """Connections whose commands `answer` replies to (None: no reply at all) on a later loop
    turn; `drop` the connections so far as a restarted Redis would."""

    def __init__(self, answer: Answer) -> None:
        self.answer = answer
        self.commands: list[list[bytes]] = []
        self.writes: list[bytes] = []
        self.connections: list[ReadProtocol] = []

    async def connect(self) -> ReadProtocol:
        protocol = ReadProtocol()
        redis = self

        class Transport(FakeTransport):
            def write(self, data: bytes) -> None:
                super().write(data)
                redis.writes.append(bytes(data))
                replies = []
                for command in parse_commands(bytes(data)):
                    redis.commands.append(command)
                    reply = redis.answer(command)
                    if reply is not None:
                        replies.append(resp(reply))
                if replies:
                    asyncio.get_running_loop().call_soon(protocol.data_received, b"".join(replies))

            def abort(self) -> None:
                super().abort()
                asyncio.get_running_loop().call_soon(protocol.connection_lost, None)

        protocol.connection_made(Transport())  # type: ignore[arg-type]
        self.connections.append(protocol)
        return protocol

    def drop(self) -> None:
        """The server went away: every connection so far is closed (without a reply)."""
        for protocol in self.connections:
            if not protocol.closed:
                protocol.connection_lost(ConnectionResetError("reset by peer"))


def reads_on(redis: ScriptedRedis, monkeypatch: pytest.MonkeyPatch) -> HistoryReads:
    reads = HistoryReads(RedisAddress("127.0.0.1", 1))
    monkeypatch.setattr(reads, "_connect", redis.connect)
    return reads


STREAMS: dict[bytes, list[tuple[bytes, list[bytes]]]] = {
    CH: [
        (b"1700000000000-0", [b"t", b"n", b"d", b"0"]),
        (b"1700000000000-1", [b"t", b"n", b"d", b"1"]),
        (b"1700000000005-0", [b"d", b"2", b"t", b"m"]),
    ],
    b"SSE::b1::p2": [],
    b"SSE::b1::empty-list": [],
}


def redis_of(streams: dict[bytes, list[tuple[bytes, list[bytes]]]]) -> Answer:
    """TIME, XRANGE and XREVRANGE (as HistoryReads sends them) of `streams`; a key named
    `...::wrong` is not a stream. TIME is 1700000000.123456, a second later at each call."""
    times = iter(range(1_700_000_000, 1_800_000_000))

    def key(entry_id: bytes) -> tuple[int, int]:
        ms, _, seq = entry_id.partition(b"-")
        return int(ms), int(seq or 0)

    def answer(command: list[bytes]) -> object:
        name = command[0]
        if name == b"TIME":
            return [str(next(times)).encode(), b"123456"]
        if command[1].endswith(b"::wrong"):
            return Exception("WRONGTYPE Operation against a key holding the wrong kind of value")
        entries = streams.get(command[1], [])
        if name == b"XRANGE":
            _, _, start, end, count_word, count = command
            assert (end, count_word) == (b"+", b"COUNT")
            found = [e for e in entries if key(e[0]) >= key(start)][: int(count)]
            return [[entry_id, fields] for entry_id, fields in found]
        if name == b"XREVRANGE":
            assert command[2:] == [b"+", b"-", b"COUNT", b"1"]
            return [[entries[-1][0], entries[-1][1]]] if entries else []
        raise AssertionError(f"unexpected command {command!r}")

    return answer


@run_in_loop
async def test_read_history_sends_one_xrange_per_request_in_one_write(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    redis = ScriptedRedis(redis_of(STREAMS))
    reads = reads_on(redis, monkeypatch)
    results = await reads.read_history(
        [(CH, "1700000000000-1"), (b"SSE::b1::p2", "0-0"), (CH, "0-0")], 2
    )
    assert redis.commands == [
        [b"XRANGE", CH, b"1700000000000-1", b"+", b"COUNT", b"2"],
        [b"XRANGE", b"SSE::b1::p2", b"0-0", b"+", b"COUNT", b"2"],
        [b"XRANGE", CH, b"0-0", b"+", b"COUNT", b"2"],
    ]
    assert len(redis.writes) == 1  # a pipeline: one buffer
    assert results == [
        [HistoryEntry("1700000000000-1", "n", "1"), HistoryEntry("1700000000005-0", "m", "2")],
        [],
        [HistoryEntry("1700000000000-0", "n", "0"), HistoryEntry("1700000000000-1", "n", "1")],
    ]


@run_in_loop
async def test_a_refused_xrange_fails_only_its_own_read(monkeypatch: pytest.MonkeyPatch) -> None:
    reads = reads_on(ScriptedRedis(redis_of(STREAMS)), monkeypatch)
    results = await reads.read_history([(b"SSE::b1::wrong", "0-0"), (CH, "1700000000005-0")], 5)
    assert results == [[], [HistoryEntry("1700000000005-0", "m", "2")]]


@run_in_loop
async def test_read_heads_sends_time_then_one_xrevrange_per_channel(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    redis = ScriptedRedis(redis_of(STREAMS))
    reads = reads_on(redis, monkeypatch)
    heads, now_ms = await reads.read_heads([CH, b"SSE::b1::p2", b"SSE::b1::wrong", CH])
    assert redis.commands == [
        [b"TIME"],
        [b"XREVRANGE", CH, b"+", b"-", b"COUNT", b"1"],
        [b"XREVRANGE", b"SSE::b1::p2", b"+", b"-", b"COUNT", b"1"],
        [b"XREVRANGE", b"SSE::b1::wrong", b"+", b"-", b"COUNT", b"1"],
        [b"XREVRANGE", CH, b"+", b"-", b"COUNT", b"1"],
    ]
    assert len(redis.writes) == 1  # TIME first, in the same pipeline as the heads
    assert heads == ["1700000000005-0", None, None, "1700000000005-0"]
    assert now_ms == 1_700_000_000_123  # seconds and microseconds, in milliseconds


@run_in_loop
async def test_reads_go_in_pipelines_of_at_most_pipeline_commands(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    redis = ScriptedRedis(redis_of(STREAMS))
    reads = reads_on(redis, monkeypatch)
    monkeypatch.setattr(HistoryReads, "PIPELINE", 3)
    channels = [CH, b"SSE::b1::p2"] * 3  # 6 heads: TIME + 2 per pipeline
    heads, now_ms = await reads.read_heads(channels)
    assert [len(parse_commands(write)) for write in redis.writes] == [3, 3, 3]
    assert [parse_commands(write)[0] for write in redis.writes] == [[b"TIME"]] * 3
    assert heads == ["1700000000005-0", None] * 3
    assert now_ms == 1_700_000_000_123  # the first TIME: before every head was read
    redis.writes.clear()
    results = await reads.read_history([(CH, "0-0")] * 7, 1)
    assert [len(parse_commands(write)) for write in redis.writes] == [3, 3, 1]
    assert results == [[HistoryEntry("1700000000000-0", "n", "0")]] * 7
    assert len(redis.connections) == 1  # one connection for all of them


@run_in_loop
async def test_a_closed_connection_is_retried_on_a_new_one(monkeypatch: pytest.MonkeyPatch) -> None:
    redis = ScriptedRedis(redis_of(STREAMS))
    reads = reads_on(redis, monkeypatch)
    assert (await reads.read_heads([CH]))[0] == ["1700000000005-0"]
    redis.drop()  # Redis restarted: the first send after it finds the connection closed
    assert (await reads.read_heads([CH]))[0] == ["1700000000005-0"]
    assert len(redis.connections) == 2


@run_in_loop
async def test_a_connection_lost_before_the_reply_is_retried(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    answer = redis_of(STREAMS)
    losses = [1]

    def lossy(command: list[bytes]) -> object:
        if losses[0] and command[0] == b"TIME":
            losses[0] -= 1
            asyncio.get_running_loop().call_soon(redis.drop)  # gone before it answers
            return None
        return answer(command)

    redis = ScriptedRedis(lossy)
    reads = reads_on(redis, monkeypatch)
    heads, _ = await reads.read_heads([CH])
    assert heads == ["1700000000005-0"]
    assert len(redis.connections) == 2 and [c[0] for c in redis.commands].count(b"TIME") == 2


@run_in_loop
async def test_a_connection_lost_every_time_is_broker_unavailable_after_the_attempts(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def never(command: list[bytes]) -> object:
        asyncio.get_running_loop().call_soon(redis.drop)
        return None

    redis = ScriptedRedis(never)
    reads = reads_on(redis, monkeypatch)
    with pytest.raises(BrokerUnavailable):
        await reads.read_history([(CH, "0-0")], 5)
    assert len(redis.connections) == HistoryReads.ATTEMPTS


@pytest.mark.parametrize(
    "error",
    [
        "LOADING Redis is loading the dataset in memory",
        "BUSY Redis is busy running a script",
        "MASTERDOWN Link with MASTER is down",
        "NOAUTH Authentication required.",
        # Not about readiness, but no more about the history: an empty read would pass for
        # an empty or restarted one (a position replay would say recovered with events lost).
        "NOPERM this user has no permissions to run the 'xrange' command",
        "ERR max number of clients reached",
    ],
)
@run_in_loop
async def test_a_redis_not_ready_for_its_data_fails_the_read_not_an_empty_one(
    monkeypatch: pytest.MonkeyPatch, error: str
) -> None:
    answer = redis_of(STREAMS)

    def loading(command: list[bytes]) -> object:
        return Exception(error) if command[0] != b"TIME" else answer(command)

    reads = reads_on(ScriptedRedis(loading), monkeypatch)
    with pytest.raises(BrokerUnavailable):
        await reads.read_history([(CH, "0-0")], 5)
    with pytest.raises(BrokerUnavailable):
        await reads.read_heads([CH])


@run_in_loop
async def test_a_redis_that_does_not_answer_is_broker_unavailable_after_the_timeout(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    redis = ScriptedRedis(lambda command: None)
    reads = reads_on(redis, monkeypatch)
    monkeypatch.setattr(HistoryReads, "TIMEOUT", 0.05)
    loop: Any = asyncio.get_running_loop()
    task = asyncio.ensure_future(reads.read_heads([CH]))
    await turns(8)  # connected, and the read sent (its timeout runs from now)
    assert not task.done() and len(redis.writes) == 1
    loop.now += 0.06  # the test loop's clock (fakes.FakeClockLoop)
    await turns(5)
    with pytest.raises(BrokerUnavailable):
        task.result()
    # Not sent again (a Redis that does not answer would only hold the reads longer), and the
    # connection is dropped: replies that come late would answer the wrong reads.
    assert len(redis.writes) == 1
    [connection] = redis.connections
    assert connection.closed


@run_in_loop
async def test_reads_waiting_for_one_connect_share_its_failure(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    attempts: list[int] = []

    async def failing_connect() -> ReadProtocol:
        attempts.append(1)
        await asyncio.sleep(0)
        raise BrokerUnavailable("redis unavailable: refused")

    reads = HistoryReads(RedisAddress("127.0.0.1", 1))
    monkeypatch.setattr(reads, "_connect", failing_connect)
    results = await asyncio.gather(
        *(reads.read_heads([CH]) for _ in range(5)), return_exceptions=True
    )
    assert all(isinstance(r, BrokerUnavailable) for r in results), results
    assert len(attempts) == 1  # not one connect after another, each failing in its turn


@run_in_loop
async def test_after_close_reads_fail_and_no_connection_is_made(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    redis = ScriptedRedis(redis_of(STREAMS))
    reads = reads_on(redis, monkeypatch)
    await reads.read_heads([CH])
    reads.close()
    with pytest.raises(BrokerUnavailable):
        await reads.read_heads([CH])
    assert len(redis.connections) == 1


@run_in_loop
async def test_a_timeout_fails_the_other_reads_on_its_connection_without_sending_them_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    redis = ScriptedRedis(lambda command: None)
    reads = reads_on(redis, monkeypatch)
    monkeypatch.setattr(HistoryReads, "TIMEOUT", 0.05)
    loop: Any = asyncio.get_running_loop()
    first = asyncio.ensure_future(reads.read_heads([CH]))
    await turns(8)
    loop.now += 0.03
    second = asyncio.ensure_future(reads.read_history([(CH, "0-0")], 5))
    await turns(8)
    assert len(redis.writes) == 2
    loop.now += 0.03  # the first read times out; the second is on the same connection
    await turns(8)
    for task in (first, second):
        assert task.done()
        with pytest.raises(BrokerUnavailable):
            task.result()
    assert len(redis.writes) == 2  # the second read was not sent again
