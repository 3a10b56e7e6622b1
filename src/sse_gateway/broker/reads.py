"""The history read connection: pipelined read-only commands, replies read with hiredis.

Every stream reads the history once before `connected` (where it ends, or what a client
missed), so this is on the per-stream path. redis-py's pipeline costs ~130k CPU instructions
per command there (packing, a response callback, an async timeout per reply); this protocol
writes the commands of a batch in one RESP buffer and resolves one future per batch with its
replies, in order.
Commands that change data (publishes) never go here: a reply lost with a dropped connection
makes a read safe to send again, never a write.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import cast

import hiredis

from sse_gateway.broker.base import BrokerUnavailable, HistoryEntry
from sse_gateway.broker.pubsub import encode_command
from sse_gateway.publish.target import is_primary_role, resolve_primary
from sse_gateway.settings import RedisAddress

log = logging.getLogger("sse_gateway.broker")


class ReadConnectionLost(ConnectionError):
    """The connection closed before the reply came: the read may be sent again."""


class ReadConnectionAborted(ConnectionError):
    """The gateway dropped the connection (a read timed out, a reply no batch asked for):
    the reads on it fail, none is sent again."""


class _Batch:
    """Commands sent together: their replies, in order, fill one future."""

    __slots__ = ("count", "future", "replies")

    def __init__(self, count: int, future: asyncio.Future[list[object]]) -> None:
        self.count = count
        self.future = future
        self.replies: list[object] = []


class ReadProtocol(asyncio.Protocol):
    """One Redis connection for reads. `send` writes a batch of commands; its future gets
    their replies in order (an exception object for an error reply, as hiredis gives it)."""

    def __init__(self) -> None:
        self.reader = hiredis.Reader()
        self.transport: asyncio.Transport | None = None
        self.batches: deque[_Batch] = deque()
        self.closed = False
        # Why the gateway aborted the connection, for the batches still waiting on it.
        self.aborted: ConnectionError | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def send(self, commands: bytes, count: int) -> asyncio.Future[list[object]]:
        """Writes `commands` (RESP, `count` of them); the future gets their `count` replies,
        or ReadConnectionLost."""
        future: asyncio.Future[list[object]] = asyncio.get_running_loop().create_future()
        if self.closed or self.transport is None:
            future.set_exception(self.aborted or ReadConnectionLost("redis read connection closed"))
            return future
        self.batches.append(_Batch(count, future))
        self.transport.write(commands)
        return future

    def data_received(self, data: bytes) -> None:
        reader = self.reader
        reader.feed(data)
        batches = self.batches
        while batches:
            batch = batches[0]
            replies = batch.replies
            try:
                while len(replies) < batch.count:
                    reply = reader.gets()
                    if reply is False:
                        return
                    replies.append(reply)
            except hiredis.ProtocolError:
                self.abort()  # out of step with Redis: the reads go again on a new connection
                return
            batches.popleft()
            if not batch.future.done():
                batch.future.set_result(replies)
        try:
            orphan = reader.gets()
        except hiredis.ProtocolError:
            orphan = True
        if orphan is not False:
            # A reply nobody asked for (Redis' "max number of clients" error on accept, say)
            # would answer the next batch's first command.
            log.warning("redis read connection: unexpected reply %r; reconnecting", orphan)
            self.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.transport = None
        while self.batches:
            future = self.batches.popleft().future
            if not future.done():
                reason = f": {exc}" if exc is not None else ""
                future.set_exception(
                    self.aborted or ReadConnectionLost("redis read connection lost" + reason)
                )

    def abort(self, error: ConnectionError | None = None) -> None:
        """Drops the connection; the batches waiting on it fail with `error` (not sent again)
        or, without one, with ReadConnectionLost."""
        self.closed = True
        if error is not None and self.aborted is None:
            self.aborted = error
        if self.transport is not None:
            self.transport.abort()


def xrange_entries(reply: object) -> list[HistoryEntry]:
    """An XRANGE reply as hiredis parses it (`[[id, [field, value, …]], …]`) as entries; an
    entry without the `t`/`d` fields publish.lua writes is left out (nothing to replay)."""
    entries: list[HistoryEntry] = []
    for entry_id, fields in cast(list[list[object]], reply):
        values = cast(list[bytes], fields)
        event_type = data = None
        for i in range(0, len(values) - 1, 2):
            name = values[i]
            if name == b"t":
                event_type = values[i + 1]
            elif name == b"d":
                data = values[i + 1]
        if event_type is None or data is None:
            continue
        entries.append(
            HistoryEntry(
                cast(bytes, entry_id).decode("ascii"),
                event_type.decode("utf-8", "replace"),
                data.decode("utf-8", "replace"),
            )
        )
    return entries


class HistoryReads:
    """History reads of one process on one Redis connection of their own, opened on first
    use and again after it drops (all waiting reads share one connect, and its failure).
    Batches of `PIPELINE` commands, each sent up to `ATTEMPTS` times when the connection turns
    out closed (a Redis restart), never again after a timeout (a Redis that does not answer
    would only hold the reads longer). Any error reply but WRONGTYPE (a key that holds no
    stream) fails its batch: LOADING, NOPERM, "max number of clients"... say nothing of the
    history, and an empty read would pass for a history restarted, trimmed or empty."""

    PIPELINE = 1000
    ATTEMPTS = 3
    TIMEOUT = 5.0

    def __init__(self, address: RedisAddress) -> None:
        self._address = address
        self._protocol: ReadProtocol | None = None
        self._connecting: asyncio.Future[ReadProtocol] | None = None
        self._closed = False

    async def read_history(
        self, requests: list[tuple[bytes, str]], limit: int
    ) -> list[list[HistoryEntry]]:
        """See `Broker.read_history`: XRANGE <channel> <start> + COUNT <limit> for each."""
        tail = b"$1\r\n+\r\n$5\r\nCOUNT\r\n" + encode_command(str(limit).encode())[4:]
        commands = [
            b"*6\r\n$6\r\nXRANGE\r\n$%d\r\n%b\r\n$%d\r\n%b\r\n%b"
            % (len(channel), channel, len(start), start.encode(), tail)
            for channel, start in requests
        ]
        results: list[list[HistoryEntry]] = []
        for reply in await self._run(commands):
            if isinstance(reply, Exception):
                # A key that is not a stream (WRONGTYPE) fails only its own read.
                log.warning("history read refused by redis: %s", reply)
                reply = []
            results.append(xrange_entries(reply))
        return results

    async def read_heads(self, channels: list[bytes]) -> tuple[list[str | None], int]:
        """See `Broker.read_heads`: TIME, then XREVRANGE <channel> + - COUNT 1 for each, in
        one pipeline (per batch): every entry added after a head was read is later than the
        TIME, which Redis answered first on the same connection."""
        heads: list[str | None] = []
        now_ms = 0
        for start in range(0, len(channels), self.PIPELINE - 1):
            batch = channels[start : start + self.PIPELINE - 1]
            commands = [_TIME]
            commands += [_XREVRANGE_HEAD % (len(channel), channel) for channel in batch]
            replies = await self._run(commands)
            if not now_ms:
                seconds, micros = cast(list[bytes], replies[0])
                now_ms = int(seconds) * 1000 + int(micros) // 1000
            for reply in replies[1:]:
                if isinstance(reply, Exception):
                    log.warning("history head read refused by redis: %s", reply)
                    reply = []
                entries = cast(list[list[bytes]], reply)
                heads.append(entries[0][0].decode("ascii") if entries else None)
        return heads, now_ms

    async def count_existing(self, groups: list[tuple[bytes, bytes]]) -> list[int]:
        """For each pair of keys: how many of them exist (EXISTS), in one pipeline per
        `PIPELINE` pairs. BrokerUnavailable as the history reads."""
        commands = [
            b"*3\r\n$6\r\nEXISTS\r\n$%d\r\n%b\r\n$%d\r\n%b\r\n" % (len(a), a, len(b), b)
            for a, b in groups
        ]
        counts: list[int] = []
        for reply in await self._run(commands):
            if not isinstance(reply, int):
                raise BrokerUnavailable(f"redis answered EXISTS with {reply!r}")
            counts.append(reply)
        return counts

    async def read_sorted_set(self, key: bytes) -> tuple[int, list[object]]:
        """Redis' clock (ms) and `ZRANGE key 0 -1 WITHSCORES` (member, score, ...), read in
        one pipeline. BrokerUnavailable as the history reads."""
        command = encode_command(b"ZRANGE", key, b"0", b"-1", b"WITHSCORES")
        time_reply, members = await self._run([_TIME, command])
        if isinstance(members, Exception) or not isinstance(members, list):
            raise BrokerUnavailable(f"redis answered ZRANGE {key!r} with {members!r}")
        seconds, micros = cast(list[bytes], time_reply)
        return int(seconds) * 1000 + int(micros) // 1000, members

    async def run(self, commands: list[bytes]) -> list[object]:
        """Read-only commands (RESP each), pipelined; their replies in order (an exception
        object for WRONGTYPE). BrokerUnavailable as the history reads."""
        return await self._run(commands)

    async def _run(self, commands: list[bytes]) -> list[object]:
        replies: list[object] = []
        for start in range(0, len(commands), self.PIPELINE):
            batch = commands[start : start + self.PIPELINE]
            for attempt in range(1, self.ATTEMPTS + 1):
                protocol = await self._connection()
                future = protocol.send(b"".join(batch), len(batch))
                try:
                    answered = await asyncio.wait_for(future, self.TIMEOUT)
                except ReadConnectionLost as exc:
                    if attempt == self.ATTEMPTS:
                        raise BrokerUnavailable(f"redis unavailable: {exc}") from exc
                    continue
                except ReadConnectionAborted as exc:
                    raise BrokerUnavailable(f"redis unavailable: {exc}") from exc
                except TimeoutError as exc:
                    # Its late replies would be taken for the next batch's; the other batches
                    # on it fail too, without being sent again.
                    protocol.abort(ReadConnectionAborted("a history read timed out"))
                    raise BrokerUnavailable("redis did not answer a history read") from exc
                for reply in answered:
                    if isinstance(reply, Exception) and not str(reply).startswith("WRONGTYPE"):
                        raise BrokerUnavailable(f"redis refused a history read: {reply}")
                replies.extend(answered)
                break
        return replies

    async def _connection(self) -> ReadProtocol:
        protocol = self._protocol
        if protocol is not None and not protocol.closed:
            return protocol
        if self._closed:
            raise BrokerUnavailable("the history read connection is closed")
        connecting = self._connecting
        if connecting is None or connecting.done():
            # One connect for the reads of a whole storm; its failure fails them all at once.
            connecting = self._connecting = asyncio.ensure_future(self._connect())
            connecting.add_done_callback(_retrieve)
        protocol = await asyncio.shield(connecting)  # a waiter's timeout leaves it to others
        if self._protocol is None or self._protocol.closed:
            self._protocol = protocol
        return protocol

    async def _connect(self) -> ReadProtocol:
        loop = asyncio.get_running_loop()
        ssl_context = self._address.ssl_context()
        try:
            # Sentinel's primary of the moment (each connect asks again), else the one Redis.
            address = await resolve_primary(self._address)
            _, protocol = await asyncio.wait_for(
                loop.create_connection(
                    ReadProtocol,
                    address.host,
                    address.port,
                    ssl=ssl_context,
                    server_hostname=address.host if ssl_context else None,
                ),
                self.TIMEOUT,
            )
        except (OSError, TimeoutError) as exc:
            raise BrokerUnavailable(f"redis unavailable: {_describe(exc)}") from exc
        handshake: list[bytes] = []
        if address.password is not None:
            auth = [b"AUTH"]
            if address.username:
                auth.append(address.username.encode())
            auth.append(address.password.encode())
            handshake.append(encode_command(*auth))
        if address.db:
            handshake.append(encode_command(b"SELECT", str(address.db).encode()))
        if self._address.mode == "sentinel":  # a sentinel slow to see a failover names a replica
            handshake.append(encode_command(b"ROLE"))
        if handshake:
            future = protocol.send(b"".join(handshake), len(handshake))
            try:
                replies = await asyncio.wait_for(future, self.TIMEOUT)
            except (ConnectionError, TimeoutError) as exc:
                protocol.abort()
                raise BrokerUnavailable(f"redis unavailable: {_describe(exc)}") from exc
            for reply in replies:
                if isinstance(reply, Exception):
                    protocol.abort()
                    raise BrokerUnavailable(f"redis refused the read connection: {reply}")
            if self._address.mode == "sentinel" and not is_primary_role(replies[-1]):
                protocol.abort()
                raise BrokerUnavailable(f"{address.url()} is not the primary: {replies[-1]!r}")
        if self._closed:  # closed while this connect ran
            protocol.abort()
            raise BrokerUnavailable("the history read connection is closed")
        return protocol

    def close(self) -> None:
        """Drops the connection; reads from now on fail (BrokerUnavailable)."""
        self._closed = True
        if self._protocol is not None:
            self._protocol.abort(ReadConnectionAborted("the history read connection closed"))
            self._protocol = None


def _describe(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


def _retrieve(future: asyncio.Future[ReadProtocol]) -> None:
    # A connect whose waiters all went away must not log "exception never retrieved".
    if not future.cancelled():
        future.exception()


_TIME = encode_command(b"TIME")
# XREVRANGE <channel> + - COUNT 1, with the channel's length and name to fill in.
_XREVRANGE_HEAD = (
    b"*6\r\n$9\r\nXREVRANGE\r\n$%d\r\n%b\r\n$1\r\n+\r\n$1\r\n-\r\n$5\r\nCOUNT\r\n$1\r\n1\r\n"
)
