"""Session control in the Redis broker: the control channel, disconnects, block checks,
connect tickets.

The control channel is subscribed on the Pub/Sub connection as a pattern (`PSUBSCRIBE
SSE::control`: without a glob character it matches only itself). Its messages then come as
`pmessage` replies of four elements, which `PubSubProtocol` hands to the reply handler: the
per-event path (three-element `message` replies) does not even compare channel names. Redis
matches one pattern per PUBLISH, whatever the number of gateways (all subscribe the same).

The presence queries of `GET /v1/players/…` and their replies travel on the same channel
(`publish_control`); `count_subscribers` is `PUBSUB NUMSUB`, on the command pool.

A disconnect stores its block and publishes its control message in one script
(`lua/disconnect.lua`); tickets are a SET with a TTL and a GETDEL. All three change data, so
they go through the command pool (redis-py, no retry: a GETDEL sent again after a lost
reply would find its ticket gone). Block checks only read, and are on the per-stream path:
pipelined on the history read connection (`reads.py`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from importlib import resources
from typing import Protocol, cast

import redis.asyncio as aioredis
import redis.exceptions

from sse_gateway.broker.base import BrokerUnavailable, ControlHandler, DisconnectOutcome
from sse_gateway.broker.pubsub import encode_command
from sse_gateway.broker.reads import HistoryReads
from sse_gateway.wire.control import BLOCK_INDEX, CONTROL_CHANNEL

log = logging.getLogger("sse_gateway.broker")

CONTROL_REPLY_KINDS = frozenset({b"psubscribe", b"pmessage"})
DISCONNECT_SCRIPT = resources.files("sse_gateway").joinpath("lua/disconnect.lua").read_text()
# Any error of a command (READONLY after a failover, OOM, NOPERM, a lost connection) means its
# effect is unknown or absent: the caller answers 503.
_COMMAND_FAILED = (redis.exceptions.RedisError, OSError)


class ControlSubscription:
    """The control channel's state on the Pub/Sub connection."""

    COMMAND = encode_command(b"PSUBSCRIBE", CONTROL_CHANNEL)
    """Written at each connect."""

    def __init__(self, on_control: ControlHandler) -> None:
        self._on_control = on_control
        self._active = False
        self._waiters: list[Callable[[], None]] = []

    def when_active(self, callback: Callable[[], None]) -> None:
        """Runs `callback` once the subscription is confirmed on this connection (maybe
        now); a waiter of a connection that drops waits for the next one's."""
        if self._active:
            callback()
        else:
            self._waiters.append(callback)

    def on_disconnected(self) -> None:
        self._active = False

    def on_reply(self, reply: list[bytes]) -> None:
        """A `psubscribe` confirmation or a `pmessage` (one of `CONTROL_REPLY_KINDS`)."""
        if reply[0] == b"pmessage":
            if len(reply) == 4 and reply[2] == CONTROL_CHANNEL:
                self._on_control(reply[3])
            return
        self._active = True
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            try:
                waiter()
            except Exception:  # one waiter's failure must not starve the others
                log.exception("redis pubsub: error in a control channel waiter")


class ControlCommands:
    """Each method keeps the contract written on `broker.base.Broker`."""

    def __init__(self, commands: aioredis.Redis, reads: HistoryReads) -> None:
        self._commands = commands
        self._reads = reads
        self._disconnect_script = commands.register_script(DISCONNECT_SCRIPT)

    async def publish_disconnect(
        self, message: bytes, block_key: bytes, block_ms: int, block_value: bytes
    ) -> DisconnectOutcome:
        try:
            receivers, pttl = await self._disconnect_script(
                keys=[block_key, BLOCK_INDEX],
                args=[CONTROL_CHANNEL, message, block_ms, block_value],
            )
        except _COMMAND_FAILED as exc:
            raise BrokerUnavailable(f"redis did not run the disconnect: {exc}") from exc
        return DisconnectOutcome(int(receivers), None if pttl == -2 else int(pttl))

    async def publish_control(self, message: bytes) -> int:
        try:
            return int(await self._commands.publish(CONTROL_CHANNEL, message))
        except _COMMAND_FAILED as exc:
            raise BrokerUnavailable(f"redis did not publish on the control channel: {exc}") from exc

    async def count_subscribers(self, channel: bytes) -> int:
        try:
            counts = await self._commands.pubsub_numsub(channel)
        except _COMMAND_FAILED as exc:
            raise BrokerUnavailable(f"redis did not count subscribers: {exc}") from exc
        return int(counts[0][1]) if counts else 0

    async def read_blocks(self, keys: list[tuple[bytes, bytes]]) -> list[bool]:
        counts = await self._reads.count_existing(keys)
        return [count > 0 for count in counts]

    async def read_block_index(self) -> list[tuple[bytes, float]]:
        now_ms, replies = await self._reads.read_sorted_set(BLOCK_INDEX)
        pairs = cast(list[bytes], replies)
        index: list[tuple[bytes, float]] = []
        for i in range(0, len(pairs) - 1, 2):
            try:
                ends_ms = float(pairs[i + 1])
            except ValueError:
                continue  # not a score this index would hold
            if ends_ms > now_ms:
                left = math.inf if ends_ms == math.inf else (ends_ms - now_ms) / 1000
                index.append((pairs[i], left))
        return index

    async def put_ticket(self, key: bytes, value: bytes, ttl: int) -> None:
        try:
            await self._commands.set(key, value, ex=ttl)
        except _COMMAND_FAILED as exc:
            raise BrokerUnavailable(f"redis did not store the ticket: {exc}") from exc

    async def take_ticket(self, key: bytes) -> bytes | None:
        try:
            value = await self._commands.getdel(key)
        except _COMMAND_FAILED as exc:
            raise BrokerUnavailable(f"redis did not answer a ticket lookup: {exc}") from exc
        return value if isinstance(value, bytes) else None


class SessionCommands(Protocol):
    """What carries out session control for a broker: `ControlCommands` on one Redis,
    `ClusterCommands` on a Redis Cluster."""

    async def publish_disconnect(
        self, message: bytes, block_key: bytes, block_ms: int, block_value: bytes
    ) -> DisconnectOutcome: ...

    async def publish_control(self, message: bytes) -> int: ...

    async def count_subscribers(self, channel: bytes) -> int: ...

    async def read_blocks(self, keys: list[tuple[bytes, bytes]]) -> list[bool]: ...

    async def read_block_index(self) -> list[tuple[bytes, float]]: ...

    async def put_ticket(self, key: bytes, value: bytes, ttl: int) -> None: ...

    async def take_ticket(self, key: bytes) -> bytes | None: ...


class ControlMethods:
    """The session control methods of a broker, handed to its `_session` (`SessionCommands`)."""

    _session: SessionCommands

    async def publish_disconnect(
        self, message: bytes, block_key: bytes, block_ms: int, block_value: bytes
    ) -> DisconnectOutcome:
        return await self._session.publish_disconnect(message, block_key, block_ms, block_value)

    async def publish_control(self, message: bytes) -> int:
        return await self._session.publish_control(message)

    async def count_subscribers(self, channel: bytes) -> int:
        return await self._session.count_subscribers(channel)

    async def read_blocks(self, keys: list[tuple[bytes, bytes]]) -> list[bool]:
        return await self._session.read_blocks(keys)

    async def read_block_index(self) -> list[tuple[bytes, float]]:
        return await self._session.read_block_index()

    async def put_ticket(self, key: bytes, value: bytes, ttl: int) -> None:
        await self._session.put_ticket(key, value, ttl)

    async def take_ticket(self, key: bytes) -> bytes | None:
        return await self._session.take_ticket(key)
