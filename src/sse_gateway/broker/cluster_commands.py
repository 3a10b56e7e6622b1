"""Commands of the Redis Cluster broker: reads per slot owner over hiredis, writes via redis-py.

Reads (history, heads, block checks, the block index, `PUBSUB SHARDNUMSUB`, `CLUSTER SHARDS`)
are on the per-stream path: each is grouped by the master of its key's slot and sent on that
master's own `HistoryReads` connection (broker/reads.py: one pipeline per batch, hiredis), all
masters at once. A refusal that says the slot moved (MOVED, ASK, TRYAGAIN, CLUSTERDOWN) or a
master that cannot be reached makes the broker read the topology again, and the reads are
sent once more.

Writes (publishes, disconnects, control messages, tickets) go through redis-py's async
`RedisCluster`, which follows MOVED/ASK itself, with no retry after a lost connection (a
publish sent again would be stored twice). Publishes `SPUBLISH` (publish.lua's 5th argument).
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Awaitable, Callable, Sequence
from importlib import resources
from typing import Any, TypeVar, cast

import redis.asyncio as aioredis
import redis.exceptions
from redis.asyncio.cluster import ClusterNode

from sse_gateway.broker.base import BrokerUnavailable, DisconnectOutcome, HistoryEntry
from sse_gateway.broker.pubsub import encode_command
from sse_gateway.broker.reads import HistoryReads
from sse_gateway.broker.slots import Node, Topology, group_by_owner, parse_shards
from sse_gateway.publish.events import PreparedEvent, PublishedEvent, PublishUnavailable
from sse_gateway.publish.publisher import Publisher, async_no_retry, cluster_kwargs
from sse_gateway.redis_address import RedisAddress
from sse_gateway.wire.control import BLOCK_INDEX, CONTROL_CHANNEL

log = logging.getLogger("sse_gateway.broker")

_MOVED = ("MOVED", "ASK", "TRYAGAIN", "CLUSTERDOWN")
# RedisClusterException is no RedisError: a cluster with no reachable node raises it.
_COMMAND_FAILED = (redis.exceptions.RedisError, redis.exceptions.RedisClusterException, OSError)
_CLUSTER_SHARDS = encode_command(b"CLUSTER", b"SHARDS")
# The block of a disconnect, on the block key's own slot (the index is on another).
_BLOCK_SCRIPT = resources.files("sse_gateway").joinpath("lua/block.lua").read_text()

T = TypeVar("T")


class ClusterCommands:
    """Each method keeps the contract written on `broker.base.Broker`."""

    def __init__(
        self,
        address: RedisAddress,
        *,
        topology: Callable[[], Topology | None],
        refresh: Callable[[], Awaitable[Topology | None]],
        history_size: int,
        history_ttl: int,
        max_event_bytes: int,
    ) -> None:
        self._address = address
        self._topology = topology
        self._refresh = refresh
        self._reads: dict[Node, HistoryReads] = {}
        self.topology_error: str | None = None
        """Why the last topology read found none (the last node's answer), or None."""
        self._client = aioredis.RedisCluster(
            startup_nodes=[ClusterNode(host, port) for host, port in address.all_nodes],
            retry=async_no_retry(),
            **cluster_kwargs(address),
        )
        self._publisher = Publisher(
            self._client,
            history_size=history_size,
            history_ttl=history_ttl,
            max_event_bytes=max_event_bytes,
            sharded=True,
        )
        self._block_script = self._client.register_script(_BLOCK_SCRIPT)

    def node_reads(self, node: Node) -> HistoryReads:
        """The read connection of one node (opened on first use)."""
        reads = self._reads.get(node)
        if reads is None:
            reads = self._reads[node] = HistoryReads(self._address.with_node(*node))
        return reads

    async def read_topology(self, candidates: Sequence[Node]) -> Topology | None:
        """CLUSTER SHARDS from the first of `candidates` that answers; None if none does
        (`topology_error` then says why, for the log: a node that is not a cluster's, TLS
        to a node without it, a refused password)."""
        for node in candidates:
            try:
                (reply,) = await self.node_reads(node).run([_CLUSTER_SHARDS])
                topology = parse_shards(reply, tls=self._address.tls)
            except (BrokerUnavailable, ValueError) as exc:
                log.debug("CLUSTER SHARDS from %s:%d failed: %s", *node, exc)
                self.topology_error = f"{node[0]}:{node[1]}: {exc}"
                continue
            if topology.masters:
                self.topology_error = None
                return topology
            self.topology_error = f"{node[0]}:{node[1]}: no shard has a master online"
        return None

    async def close(self) -> None:
        for reads in self._reads.values():
            reads.close()
        await self._client.aclose()

    # --- reads, grouped by slot owner --------------------------------------------------------

    async def _by_owner(
        self,
        keys: Sequence[bytes],
        run: Callable[[HistoryReads, list[int]], Awaitable[list[T]]],
    ) -> list[T]:
        """`run(reads, positions)` on each owner's connection for the keys at `positions`;
        the results put back in the order of `keys`. Sent again once after a topology read
        when a slot moved or a master was unreachable."""
        for attempt in (1, 2):
            topology = self._topology() or await self._refresh()
            if topology is None:
                raise BrokerUnavailable("redis cluster: no node answered CLUSTER SHARDS")
            groups, orphans = group_by_owner(keys, topology)
            try:
                if orphans:
                    raise BrokerUnavailable("redis cluster: CLUSTERDOWN, a slot has no master")
                nodes = list(groups)
                answers = await asyncio.gather(
                    *(run(self.node_reads(node), groups[node]) for node in nodes)
                )
            except BrokerUnavailable as exc:
                if attempt == 2 or not _topology_error(str(exc)):
                    raise
                await self._refresh()
                continue
            results: list[T | None] = [None] * len(keys)
            for node, answer in zip(nodes, answers, strict=True):
                for position, result in zip(groups[node], answer, strict=True):
                    results[position] = result
            return cast(list[T], results)
        raise AssertionError("unreachable")

    async def read_history(
        self, requests: list[tuple[bytes, str]], limit: int
    ) -> list[list[HistoryEntry]]:
        async def run(reads: HistoryReads, positions: list[int]) -> list[list[HistoryEntry]]:
            return await reads.read_history([requests[i] for i in positions], limit)

        return await self._by_owner([channel for channel, _ in requests], run)

    async def read_heads(self, channels: list[bytes]) -> tuple[list[str | None], int]:
        clocks: list[int] = []

        async def run(reads: HistoryReads, positions: list[int]) -> list[str | None]:
            heads, now_ms = await reads.read_heads([channels[i] for i in positions])
            clocks.append(now_ms)
            return heads

        heads = await self._by_owner(channels, run)
        if not clocks:  # no channel: the clock of any node
            reads = self.node_reads(self._address.all_nodes[0])
            (reply,) = await reads.run([encode_command(b"TIME")])
            seconds, micros = cast(list[bytes], reply)
            return heads, int(seconds) * 1000 + int(micros) // 1000
        # Each node's entries added after its read are later than its clock; the earliest
        # clock holds for all.
        return heads, min(clocks)

    async def read_blocks(self, keys: list[tuple[bytes, bytes]]) -> list[bool]:
        # The two keys of a group are on different slots: one EXISTS each ("k k" counts 0 or 2).
        flat = [key for group in keys for key in group]

        async def run(reads: HistoryReads, positions: list[int]) -> list[int]:
            return await reads.count_existing([(flat[i], flat[i]) for i in positions])

        counts = await self._by_owner(flat, run)
        return [counts[2 * i] + counts[2 * i + 1] > 0 for i in range(len(keys))]

    async def read_block_index(self) -> list[tuple[bytes, float]]:
        async def run(reads: HistoryReads, positions: list[int]) -> list[tuple[int, list[object]]]:
            return [await reads.read_sorted_set(BLOCK_INDEX)]

        ((now_ms, replies),) = await self._by_owner([BLOCK_INDEX], run)
        pairs = cast(list[bytes], replies)
        index: list[tuple[bytes, float]] = []
        for i in range(0, len(pairs) - 1, 2):
            try:
                ends_ms = float(pairs[i + 1])
            except ValueError:
                continue
            if ends_ms > now_ms:
                left = math.inf if ends_ms == math.inf else (ends_ms - now_ms) / 1000
                index.append((pairs[i], left))
        return index

    async def count_subscribers(self, channel: bytes) -> int:
        async def run(reads: HistoryReads, positions: list[int]) -> list[object]:
            return await reads.run([encode_command(b"PUBSUB", b"SHARDNUMSUB", channel)])

        (reply,) = await self._by_owner([channel], run)
        counts = cast(list[object], reply)
        return int(cast(int, counts[1])) if isinstance(counts, list) and len(counts) > 1 else 0

    # --- writes, through redis-py's cluster client -------------------------------------------

    async def publish_events(self, events: list[PreparedEvent]) -> list[PublishedEvent]:
        try:
            return await self._publisher.publish_many_prepared(events)
        except PublishUnavailable as exc:
            raise BrokerUnavailable(str(exc)) from exc
        except _COMMAND_FAILED as exc:
            raise BrokerUnavailable(f"redis cluster refused the publish: {exc}") from exc

    async def publish_disconnect(
        self, message: bytes, block_key: bytes, block_ms: int, block_value: bytes
    ) -> DisconnectOutcome:
        # The block key and the index are on different slots, so not one script as on a
        # single Redis: the index first (it may then hold too much, never too little: a
        # gateway that reads it in between still refuses the target), the block, the message.
        try:
            if block_ms > 0:
                now_ms = await self._index_time_ms()
                await self._client.zadd(BLOCK_INDEX, {block_key: now_ms + block_ms}, gt=True)
                await self._client.zremrangebyscore(BLOCK_INDEX, "-inf", f"({now_ms}")
            pttl = int(await self._block_script(keys=[block_key], args=[block_ms, block_value]))
            if pttl == -1:  # a block without expiry (set by hand): indexed as never ending
                await self._client.zadd(BLOCK_INDEX, {block_key: "+inf"})
            receivers = await self.publish_control(message)
        except _COMMAND_FAILED as exc:
            raise BrokerUnavailable(f"redis did not run the disconnect: {exc}") from exc
        return DisconnectOutcome(receivers, None if pttl == -2 else pttl)

    async def _node_of(self, key: bytes) -> ClusterNode | None:
        # The client reads the slot map on its first command: before it, a process that has
        # not published yet (most workers) would find no slot covered.
        await self._client.initialize()
        return self._client.get_node_from_key(key.decode())

    async def _index_time_ms(self) -> int:
        node = await self._node_of(BLOCK_INDEX)
        seconds, micros = await self._client.execute_command("TIME", target_nodes=node)
        return int(seconds) * 1000 + int(micros) // 1000

    async def publish_control(self, message: bytes) -> int:
        # On the node every gateway's control connection is on (ClusterBroker._control_node):
        # PUBLISH counts only the subscribers of the node it runs on.
        try:
            node = await self._node_of(CONTROL_CHANNEL)
            return int(
                await self._client.execute_command(
                    "PUBLISH", CONTROL_CHANNEL, message, target_nodes=node
                )
            )
        except _COMMAND_FAILED as exc:
            raise BrokerUnavailable(f"redis did not publish on the control channel: {exc}") from exc

    async def put_ticket(self, key: bytes, value: bytes, ttl: int) -> None:
        try:
            await self._client.set(key, value, ex=ttl)
        except _COMMAND_FAILED as exc:
            raise BrokerUnavailable(f"redis did not store the ticket: {exc}") from exc

    async def take_ticket(self, key: bytes) -> bytes | None:
        try:
            value: Any = await self._client.getdel(key)
        except _COMMAND_FAILED as exc:
            raise BrokerUnavailable(f"redis did not answer a ticket lookup: {exc}") from exc
        return value if isinstance(value, bytes) else None


def _topology_error(text: str) -> bool:
    return "unavailable" in text or any(word in text for word in _MOVED)
