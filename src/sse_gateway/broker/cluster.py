"""Redis Cluster broker: sharded Pub/Sub, one subscriber connection per master it needs.

Each player channel is subscribed with `SSUBSCRIBE` on the master that owns its slot, through
that master's `ShardConnection` (broker/shard.py, one `SubscriptionBook` each), so an event
touches only its own shard. The topology (`CLUSTER SHARDS` of any node) is read at start,
every `REFRESH_SECONDS`, and at once when a shard connection is lost (failover), Redis pushes
`sunsubscribe` (the slot moved) or refuses a subscription (MOVED). Channels without a live
subscription wait in `_homeless`, with their waiters, until the topology routes them again.

Channels whose subscription was active and is lost are reported to `on_channels_lost` (the
gateway's `OutageRecovery.on_channels_lost`): they are held and refilled from history once
subscribed again, as for a single Redis outage, but only those of the shard concerned.
`on_state` follows `connected`: the control connection up, the topology known, and no shard
outage waiting for its channels to be routed again.

The control channel (classic `PSUBSCRIBE`, which a cluster broadcasts to every node) is on a
connection of its own (broker/cluster_control.py), to the master of the control channel's slot, so
that every gateway listens on the same node and a PUBLISH there counts them all. Commands
and history reads are `ClusterCommands`' (broker/cluster_commands.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable, Collection

from sse_gateway.broker.base import (
    ChannelsLostHandler,
    ControlHandler,
    HistoryEntry,
    MessageHandler,
    StateHandler,
)
from sse_gateway.broker.cluster_commands import ClusterCommands
from sse_gateway.broker.cluster_control import ControlLink
from sse_gateway.broker.control import ControlMethods, ControlSubscription
from sse_gateway.broker.shard import ShardConnection
from sse_gateway.broker.slots import Node, Topology, key_slot
from sse_gateway.broker.subscriptions import Callback
from sse_gateway.publish.events import PreparedEvent, PublishedEvent
from sse_gateway.redis_address import RedisAddress
from sse_gateway.wire.control import CONTROL_CHANNEL

log = logging.getLogger("sse_gateway.broker")

_DOWN = {"event": "broker_unreachable"}  # `extra=` of the JSON log lines (logs.py)
REFRESH_SECONDS = 5.0
BACKOFF_BASE = 0.05
BACKOFF_CAP = 1.0


class ClusterBroker(ControlMethods):
    """The broker for EVENTS_REDIS_STORAGE=redis+cluster://… (see the module docstring).

    Each method keeps the contract written on `broker.base.Broker`.
    """

    def __init__(
        self,
        address: RedisAddress,
        *,
        history_size: int = 100,
        history_ttl: float = 86_400.0,
        max_event_bytes: int = 65_536,
    ) -> None:
        self._address = address
        self._on_message: MessageHandler = _not_started
        self._on_state: StateHandler = _not_started
        self._on_lost: ChannelsLostHandler | None = None
        self._control_subscription: ControlSubscription | None = None
        self._topology: Topology | None = None
        self._shards: dict[Node, ShardConnection] = {}
        self._retired_batches = [0, 0]  # subscribe/unsubscribe batches of closed shards
        self._owner: dict[bytes, ShardConnection] = {}
        self._homeless: dict[bytes, list[Callback]] = {}
        self._outage = False
        self._failed = False  # a route failed since the last topology read: back off
        self._control = ControlLink(address, None, self._control_node, self._control_changed)
        self._connected = False
        self._closing = False
        self._refresh = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._commands = ClusterCommands(
            address,
            topology=lambda: self._topology,
            refresh=self.refresh_topology,
            history_size=history_size,
            history_ttl=int(history_ttl),
            max_event_bytes=max_event_bytes,
        )
        self._session = self._commands  # session control (ControlMethods) goes through it
        self._refresh_lock = asyncio.Lock()

    # --- Broker ------------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._connected

    @property
    def description(self) -> str:
        return f"redis cluster broker at {self._address.url()}"

    @property
    def subscribed_count(self) -> int:
        return len(self._owner) + len(self._homeless)

    def shard_channels(self) -> dict[str, tuple[bool, int]]:
        """{"host:port" of a master: (its subscriber connection is up, channels wanted there)}."""
        return {f"{h}:{p}": (s.connected, s.wanted_count) for (h, p), s in self._shards.items()}

    @property
    def subscribe_batches(self) -> int:
        return self._retired_batches[0] + sum(s.subscribe_batches for s in self._shards.values())

    @property
    def unsubscribe_batches(self) -> int:
        return self._retired_batches[1] + sum(s.unsubscribe_batches for s in self._shards.values())

    async def start(
        self,
        on_message: MessageHandler,
        on_state: StateHandler,
        on_control: ControlHandler | None = None,
        on_channels_lost: ChannelsLostHandler | None = None,
    ) -> None:
        """As `Broker.start`; with `on_channels_lost`, the channels of a shard whose
        subscription was lost go there (else they are only resubscribed)."""
        self._on_message = on_message
        self._on_state = on_state
        self._on_lost = on_channels_lost
        if on_control is not None:
            self._control_subscription = ControlSubscription(on_control)
            self._control = ControlLink(
                self._address, self._control_subscription, self._control_node, self._control_changed
            )
        self._refresh.set()
        self._tasks.append(asyncio.create_task(self._topology_loop(), name="redis-topology"))
        self._tasks.append(asyncio.create_task(self._control.run(), name="redis-control"))

    async def close(self) -> None:
        self._closing = True
        for shard in self._shards.values():
            shard.close()
        self._control.close()
        tasks = [*self._tasks, *(s.task for s in self._shards.values() if s.task is not None)]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=2.0)
        await self._commands.close()

    def subscribe(self, channel: bytes) -> None:
        if channel in self._owner or channel in self._homeless:
            return
        self._route(channel, [])

    def unsubscribe(self, channel: bytes) -> None:
        shard = self._owner.pop(channel, None)
        if shard is not None:
            shard.unsubscribe(channel)
        else:
            self._homeless.pop(channel, None)

    def when_subscribed(self, channel: bytes, callback: Callable[[], None]) -> None:
        if channel == CONTROL_CHANNEL and self._control_subscription is not None:
            self._control_subscription.when_active(callback)
            return
        shard = self._owner.get(channel)
        if shard is not None:
            if shard.book.when_subscribed(channel, callback):
                callback()
        elif channel in self._homeless:
            self._homeless[channel].append(callback)

    def redis_time_ms(self) -> int:
        return int(time.time() * 1000 + self._control.clock_offset_ms)

    async def publish_events(self, events: list[PreparedEvent]) -> list[PublishedEvent]:
        return await self._commands.publish_events(events)

    async def read_history(
        self, requests: list[tuple[bytes, str]], limit: int
    ) -> list[list[HistoryEntry]]:
        return await self._commands.read_history(requests, limit)

    async def read_heads(self, channels: list[bytes]) -> tuple[list[str | None], int]:
        return await self._commands.read_heads(channels)

    # --- routing -----------------------------------------------------------------------------

    def _route(self, channel: bytes, waiters: list[Callback]) -> None:
        topology = self._topology
        node = topology.owner(key_slot(channel)) if topology is not None else None
        if node is None:
            self._homeless.setdefault(channel, []).extend(waiters)
            self._refresh.set()
            return
        shard = self._shards.get(node)
        if shard is None:
            shard = self._shards[node] = ShardConnection(
                node, self._address, self._on_message, self
            )
            shard.start()
        self._owner[channel] = shard
        shard.subscribe(channel)
        for waiter in waiters:
            if shard.book.when_subscribed(channel, waiter):
                waiter()

    def _evict(self, shard: ShardConnection, channels: Collection[bytes]) -> list[bytes]:
        """Channels leave `shard` for `_homeless` (their waiters with them); returns those
        that were still wanted there."""
        moved: list[bytes] = []
        for channel in channels:
            if self._owner.get(channel) is not shard:
                continue
            del self._owner[channel]
            self._homeless.setdefault(channel, []).extend(shard.book.forget(channel))
            moved.append(channel)
        return moved

    def _report_lost(self, channels: list[bytes]) -> None:
        if channels and self._on_lost is not None:
            try:
                self._on_lost(channels)
            except Exception:
                log.exception("redis cluster: error while reporting lost channels")

    # --- what the shard connections say (ShardHandler) ---------------------------------------

    def shard_up(self, shard: ShardConnection) -> None:
        self._check_recovered()

    def _check_recovered(self) -> None:
        # An outage lasts until every lost channel is routed, on a connection that is up.
        if self._outage and not self._homeless:
            self._outage = not all(s.connected for s in self._shards.values() if s.wanted)
        self._update_state()

    def shard_lost(self, shard: ShardConnection, was_connected: bool) -> None:
        if self._shards.get(shard.node) is shard:
            del self._shards[shard.node]
        self._retired_batches[0] += shard.subscribe_batches
        self._retired_batches[1] += shard.unsubscribe_batches
        lost: list[bytes] = []
        for channel, waiters in shard.book.take_all().items():
            if self._owner.get(channel) is shard:
                del self._owner[channel]
                self._homeless.setdefault(channel, []).extend(waiters)
                lost.append(channel)
        if was_connected and lost:
            self._outage = True
            self._update_state()
        elif not was_connected:
            self._failed = True  # routed to a master that is not there (yet): back off
        self._report_lost(lost)
        self._refresh.set()

    def channels_moved(self, shard: ShardConnection, channels: list[bytes]) -> None:
        moved = self._evict(shard, channels)
        if moved:
            log.info("redis shard %s:%d: %d channels moved away", *shard.node, len(moved))
        self._report_lost(moved)
        self._refresh.set()

    def subscribe_refused(
        self, shard: ShardConnection, refused: dict[bytes, list[Callback]], error: str
    ) -> None:
        log.info("redis shard %s:%d refused a subscription: %s", *shard.node, error)
        self._failed = True
        for channel, callbacks in refused.items():
            if self._owner.get(channel) is shard:
                self._evict(shard, [channel])
                self._homeless[channel].extend(callbacks)
        self._refresh.set()

    # --- topology ----------------------------------------------------------------------------

    async def refresh_topology(self) -> Topology | None:
        """Reads the topology now and routes the channels again; None when no node answered."""
        async with self._refresh_lock:
            topology = await self._commands.read_topology(self._candidates())
            if topology is not None and not self._closing:
                self._apply(topology)
            return topology

    def _candidates(self) -> list[Node]:
        known = list(self._topology.masters) if self._topology is not None else []
        random.shuffle(known)
        return known + [node for node in self._address.all_nodes if node not in known]

    def _apply(self, topology: Topology) -> None:
        changed = self._topology is None or not topology.same_as(self._topology)
        self._topology = topology
        if changed:
            self._follow(topology)
        homeless, self._homeless = self._homeless, {}
        for channel, waiters in homeless.items():
            self._route(channel, waiters)
        self._check_recovered()
        node = self._control_node()
        if node is not None:
            self._control.move_to(node)  # every gateway's control connection on one node

    def _follow(self, topology: Topology) -> None:
        """Channels subscribed where their slot no longer is leave (lost: held, refilled)."""
        masters = set(topology.masters)
        for node, shard in list(self._shards.items()):
            if node not in masters:
                # A demoted master (its replica took over) may still answer, and hear nothing.
                self._report_lost(self._evict(shard, list(shard.book_channels())))
                del self._shards[node]
                self._retired_batches[0] += shard.subscribe_batches
                self._retired_batches[1] += shard.unsubscribe_batches
                shard.close()
                continue
            stray = [
                channel
                for channel, owner in self._owner.items()
                if owner is shard and topology.owner_of(channel) != node
            ]
            if stray:
                self._report_lost(self._evict(shard, stray))

    async def _topology_loop(self) -> None:
        attempt = 0
        while not self._closing:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._refresh.wait(), REFRESH_SECONDS)
            self._refresh.clear()
            failed, self._failed = self._failed, False
            try:
                topology = await self.refresh_topology()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("redis cluster: topology refresh failed")
                topology = None
            if topology is None or self._homeless or failed:
                if attempt == 0 or attempt % 20 == 0:
                    reason = self._commands.topology_error if topology is None else None
                    log.warning(
                        "redis cluster: topology not settled yet%s",
                        f" ({reason})" if reason else "",
                        extra=_DOWN,
                    )
                attempt += 1
                self._refresh.set()
                delay = random.uniform(0.5, 1.0) * min(BACKOFF_CAP, BACKOFF_BASE * 2**attempt)
                await asyncio.sleep(delay)
            else:
                attempt = 0

    # --- the control connection --------------------------------------------------------------

    def _control_node(self) -> Node | None:
        # Every gateway on the same node (the control channel's slot's master).
        topology = self._topology
        return topology.owner(key_slot(CONTROL_CHANNEL)) if topology is not None else None

    def _control_changed(self, up: bool) -> None:
        if not up:
            self._refresh.set()  # maybe the master moved
        self._update_state()

    def _update_state(self) -> None:
        connected = self._control.up and self._topology is not None and not self._outage
        if connected == self._connected:
            return
        self._connected = connected
        if connected:
            log.info(
                "redis cluster: connected (%d channels)",
                self.subscribed_count,
                extra={"event": "broker_connected", "channels": self.subscribed_count},
            )
        if not self._closing:
            self._on_state(connected)


def _not_started(*_: object) -> None:
    raise RuntimeError("ClusterBroker.start() was not called")
