"""broker/reads.py's HistoryReads against a real redis-server: the replies hiredis parses,
the connection's handshake, a Redis restart (the first read after it succeeds), and a server
that never answers (BrokerUnavailable after the timeout, not a hang)."""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import Coroutine
from typing import Any

import pytest
import redis
from support.procs import RedisServer

from sse_gateway.broker.base import BrokerUnavailable, HistoryEntry
from sse_gateway.broker.reads import HistoryReads
from sse_gateway.settings import RedisAddress
from sse_gateway.wire.ids import parse_stream_id

pytestmark = [
    pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server"),
    pytest.mark.timeout(90),
]

KEY = b"SSE::b1::p1"
EMPTY = b"SSE::b1::nobody"


def run(coroutine: Coroutine[Any, Any, None]) -> None:
    asyncio.run(asyncio.wait_for(coroutine, 60))  # a hang fails the test, it does not stall


def reads_of(server: RedisServer, **kwargs: Any) -> HistoryReads:
    return HistoryReads(RedisAddress("127.0.0.1", server.port, **kwargs))


def test_reads_of_a_real_redis(fresh_redis: RedisServer) -> None:
    r = fresh_redis.client()
    r.xadd(KEY, {"t": "n", "d": "0"}, id="5-1")
    r.xadd(KEY, {"d": '{"a":1}', "x": "y", "t": "note"}, id="7-0")  # fields in another order
    r.xadd(KEY, {"other": "field"}, id="8-0")  # not written by publish.lua: no event
    r.set(b"SSE::b1::wrong", b"not a stream")

    async def main() -> None:
        reads = reads_of(fresh_redis)
        try:
            before_ms = int(time.time() * 1000)
            heads, now_ms = await reads.read_heads([KEY, EMPTY, b"SSE::b1::wrong"])
            after_ms = int(time.time() * 1000)
            assert heads == ["8-0", None, None]  # the newest entry, whatever its fields
            assert before_ms - 1_000 <= now_ms <= after_ms + 1_000  # Redis' TIME (same host)
            history = await reads.read_history(
                [(KEY, "0-0"), (KEY, "7-0"), (EMPTY, "0-0"), (b"SSE::b1::wrong", "0-0")], 10
            )
            assert history == [
                [HistoryEntry("5-1", "n", "0"), HistoryEntry("7-0", "note", '{"a":1}')],
                [HistoryEntry("7-0", "note", '{"a":1}')],
                [],
                [],  # refused (WRONGTYPE): only that read comes back empty
            ]
            # COUNT: at most `limit` entries
            assert await reads.read_history([(KEY, "0-0")], 1) == [[HistoryEntry("5-1", "n", "0")]]
            # Many at once: more than one pipeline.
            many = await reads.read_heads([KEY] * (HistoryReads.PIPELINE + 10))
            assert many[0] == ["8-0"] * (HistoryReads.PIPELINE + 10)
        finally:
            reads.close()

    run(main())
    r.close()


def test_reads_select_the_db_and_authenticate(fresh_redis: RedisServer) -> None:
    r = fresh_redis.client()
    r.config_set("requirepass", "s3cret")
    r.close()
    r = redis.Redis(host="127.0.0.1", port=fresh_redis.port, db=3, password="s3cret")
    r.xadd(KEY, {"t": "n", "d": "3"}, id="3-0")
    r.close()

    async def main() -> None:
        reads = reads_of(fresh_redis, db=3, password="s3cret")
        try:
            assert (await reads.read_heads([KEY]))[0] == ["3-0"]
        finally:
            reads.close()
        wrong = reads_of(fresh_redis, db=3, password="wrong")
        with pytest.raises(BrokerUnavailable):
            await wrong.read_heads([KEY])
        wrong.close()
        other_db = reads_of(fresh_redis, password="s3cret")  # db 0: not there
        try:
            assert (await other_db.read_heads([KEY]))[0] == [None]
        finally:
            other_db.close()

    run(main())


def test_reads_survive_a_redis_restart(fresh_redis: RedisServer) -> None:
    async def main() -> None:
        reads = reads_of(fresh_redis)
        try:
            with fresh_redis.client() as r:
                r.xadd(KEY, {"t": "n", "d": "0"}, id="5-0")
            assert (await reads.read_heads([KEY]))[0] == ["5-0"]

            # Killed and back (no persistence: empty) while the loop does nothing: the read
            # connection from before is dead, and the first read after the restart finds out.
            fresh_redis.kill()
            fresh_redis.start()
            with fresh_redis.client() as r:
                r.xadd(KEY, {"t": "m", "d": "1"}, id="9-0")
            history = await reads.read_history([(KEY, "0-0")], 10)
            assert history == [[HistoryEntry("9-0", "m", "1")]]

            # The same with a head read first.
            fresh_redis.kill()
            fresh_redis.start()
            heads, now_ms = await reads.read_heads([KEY, EMPTY])
            assert heads == [None, None] and now_ms > 0

            # Down: the reads fail (not come back empty) at once; back: they work again.
            fresh_redis.kill()
            started = time.monotonic()
            with pytest.raises(BrokerUnavailable):
                await reads.read_heads([KEY])
            with pytest.raises(BrokerUnavailable):
                await reads.read_history([(KEY, "0-0")], 10)
            assert time.monotonic() - started < HistoryReads.TIMEOUT
            fresh_redis.start()
            with fresh_redis.client() as r:
                r.xadd(KEY, {"t": "n", "d": "2"}, id="11-0")
            heads, _ = await reads.read_heads([KEY])
            assert heads == ["11-0"]
        finally:
            reads.close()

    run(main())


@pytest.mark.parametrize("db", [0, 2])  # 2: the handshake (SELECT) is what goes unanswered
def test_a_redis_that_never_answers_is_broker_unavailable_after_the_timeout(
    monkeypatch: pytest.MonkeyPatch, db: int
) -> None:
    timeout = 0.3
    monkeypatch.setattr(HistoryReads, "TIMEOUT", timeout)

    async def main() -> None:
        accepted: list[asyncio.StreamWriter] = []

        async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            accepted.append(writer)  # reads what it is sent, answers nothing
            while await reader.read(65536):
                pass

        server = await asyncio.start_server(silent, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        reads = HistoryReads(RedisAddress("127.0.0.1", port, db=db))
        try:
            for read in (
                lambda: reads.read_heads([KEY]),
                lambda: reads.read_history([(KEY, "0-0")], 10),
            ):
                started = time.monotonic()
                with pytest.raises(BrokerUnavailable):
                    await read()
                elapsed = time.monotonic() - started
                assert timeout <= elapsed < timeout + 3, elapsed  # one timeout, not a retry
            # Each timed-out connection was dropped; the next read opened a new one.
            assert len(accepted) == 2
        finally:
            reads.close()
            for writer in accepted:
                writer.close()
            server.close()
            await server.wait_closed()

    run(main())


def test_a_position_from_a_real_redis_is_before_every_later_entry(
    fresh_redis: RedisServer,
) -> None:
    """TIME is answered before the head reads: an entry added after them has a larger id
    than the position `now_ms - 1` (HistoryReader.head)."""

    async def main() -> None:
        reads = reads_of(fresh_redis)
        try:
            heads, now_ms = await reads.read_heads([EMPTY])
            assert heads == [None]
            with fresh_redis.client() as r:
                added = r.xadd(EMPTY, {"t": "n", "d": "1"}).decode()
            parsed = parse_stream_id(added)
            assert parsed is not None and parsed > (now_ms - 1, 2**64 - 1)
        finally:
            reads.close()

    run(main())
