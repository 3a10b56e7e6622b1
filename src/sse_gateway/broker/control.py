"""Session control commands of the Redis broker: disconnects, block checks, connect tickets.

A disconnect stores its block and publishes its control message in one script
(`lua/disconnect.lua`); tickets are a SET with a TTL and a GETDEL. All three change data, so
they go through the command pool (redis-py, no retry: a GETDEL sent again after a lost
reply would find its ticket gone). Block checks only read, and are on the per-stream path:
pipelined on the history read connection (`reads.py`).
"""

from __future__ import annotations

from importlib import resources

import redis.asyncio as aioredis
import redis.exceptions

from sse_gateway.broker.base import BrokerUnavailable, DisconnectOutcome
from sse_gateway.broker.reads import HistoryReads
from sse_gateway.wire.control import CONTROL_CHANNEL

DISCONNECT_SCRIPT = resources.files("sse_gateway").joinpath("lua/disconnect.lua").read_text()
# Any error of a command (READONLY after a failover, OOM, NOPERM, a lost connection) means its
# effect is unknown or absent: the caller answers 503.
_COMMAND_FAILED = (redis.exceptions.RedisError, OSError)


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
                keys=[block_key], args=[CONTROL_CHANNEL, message, block_ms, block_value]
            )
        except _COMMAND_FAILED as exc:
            raise BrokerUnavailable(f"redis did not run the disconnect: {exc}") from exc
        return DisconnectOutcome(int(receivers), None if pttl == -2 else int(pttl))

    async def read_blocks(self, keys: list[tuple[bytes, bytes]]) -> list[bool]:
        counts = await self._reads.count_existing(keys)
        return [count > 0 for count in counts]

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
