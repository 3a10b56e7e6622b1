"""Redis Cluster topology, pure: CLUSTER SHARDS parsed, keys to slots, work grouped by owner.

A player's channel and its history stream have the same name, so both hash to one slot
(CRC16 of the name mod 16384, or of its `{hash tag}`); the master that owns that slot carries
the player's sharded Pub/Sub (`SSUBSCRIBE`/`SPUBLISH`) and history. Nothing here does I/O.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import cast

from redis.crc import key_slot as _key_slot

from sse_gateway.broker.subscriptions import SubscriptionCommand

SLOTS = 16384

Node = tuple[str, int]
"""A node's (host, port), as the cluster announces it."""


def key_slot(key: bytes) -> int:
    """The cluster slot (0..16383) of a key or sharded channel name."""
    return int(_key_slot(key))


class Topology:
    """Which master serves each slot, read from one node's `CLUSTER SHARDS`.

    `masters` lists each master that serves slots (those in failover, with no online master
    yet, serve none: their slots are uncovered until a replica is promoted).
    """

    __slots__ = ("_owners", "masters")

    def __init__(self, ranges: Iterable[tuple[int, int, Node]]) -> None:
        masters: list[Node] = []
        index: dict[Node, int] = {}
        owners = [-1] * SLOTS
        for start, end, node in ranges:
            if not 0 <= start <= end < SLOTS:
                raise ValueError(f"bad slot range {start}-{end}")
            number = index.get(node)
            if number is None:
                number = index[node] = len(masters)
                masters.append(node)
            owners[start : end + 1] = [number] * (end - start + 1)
        self.masters: tuple[Node, ...] = tuple(masters)
        self._owners = owners

    def same_as(self, other: Topology) -> bool:
        """Whether both give every slot the same master."""
        return self.masters == other.masters and self._owners == other._owners

    @property
    def covered(self) -> int:
        """How many slots have a master."""
        return sum(owner >= 0 for owner in self._owners)

    def owner(self, slot: int) -> Node | None:
        """The master of `slot`, or None while it has none (a failover under way)."""
        number = self._owners[slot]
        return self.masters[number] if number >= 0 else None

    def owner_of(self, key: bytes) -> Node | None:
        """The master of the slot of `key`."""
        return self.owner(key_slot(key))


def parse_shards(reply: object, *, tls: bool = False) -> Topology:
    """`CLUSTER SHARDS` (Redis >= 7; RESP2, as hiredis parses it) as a Topology.

    Each shard is `[b"slots", [start, end, ...], b"nodes", [node, ...]]`, each node a flat
    list of field names and values. The shard's master is its node with role `master` and
    health `online`; a shard without one (its master failed, no replica promoted yet) serves
    nothing. With `tls`, a node's `tls-port` is used when it announces one. ValueError when
    the reply is not of that shape.
    """
    if not isinstance(reply, list):
        raise ValueError(f"CLUSTER SHARDS answered {reply!r}")
    ranges: list[tuple[int, int, Node]] = []
    for shard in reply:
        fields = _fields(shard)
        slots = fields.get(b"slots")
        nodes = fields.get(b"nodes")
        if not isinstance(slots, list) or not isinstance(nodes, list) or len(slots) % 2:
            raise ValueError(f"CLUSTER SHARDS: a shard without slots or nodes: {shard!r}")
        master = None
        for node in nodes:
            info = _fields(node)
            if info.get(b"role") == b"master" and info.get(b"health") == b"online":
                master = _address(info, tls)
                break
        if master is None:
            continue
        for i in range(0, len(slots), 2):
            ranges.append((int(cast(int, slots[i])), int(cast(int, slots[i + 1])), master))
    return Topology(ranges)


def _fields(item: object) -> dict[bytes, object]:
    if not isinstance(item, list) or len(item) % 2:
        raise ValueError(f"CLUSTER SHARDS: not a field list: {item!r}")
    return {cast(bytes, item[i]): item[i + 1] for i in range(0, len(item), 2)}


def _address(info: dict[bytes, object], tls: bool) -> Node:
    port = info.get(b"tls-port") if tls and info.get(b"tls-port") else info.get(b"port")
    host = b""
    for name in (b"endpoint", b"ip"):
        value = info.get(name)
        # "?" is what a node announces when it does not know its address.
        if isinstance(value, bytes) and value and value != b"?":
            host = value
            break
    if not host or port is None:
        raise ValueError(f"CLUSTER SHARDS: a node without an address: {info!r}")
    return host.decode("ascii"), int(cast(int, port))


def split_by_slot(commands: Sequence[SubscriptionCommand]) -> list[SubscriptionCommand]:
    """Each command as one command per slot of its channels, in the order of first appearance.

    `SSUBSCRIBE`/`SUNSUBSCRIBE` refuse channels of several slots (CROSSSLOT); Redis confirms
    channel by channel, so splitting a batch changes nothing in what is confirmed.
    """
    out: list[SubscriptionCommand] = []
    for verb, channels in commands:
        if len(channels) == 1:
            out.append(SubscriptionCommand(verb, channels))
            continue
        by_slot: dict[int, list[bytes]] = {}
        for channel in channels:
            by_slot.setdefault(key_slot(channel), []).append(channel)
        out.extend(SubscriptionCommand(verb, group) for group in by_slot.values())
    return out


def group_by_owner(
    keys: Sequence[bytes], topology: Topology
) -> tuple[dict[Node, list[int]], list[int]]:
    """The positions of `keys` grouped by the master of each key's slot, and the positions
    of keys whose slot has no master now."""
    groups: dict[Node, list[int]] = {}
    orphans: list[int] = []
    for position, key in enumerate(keys):
        owner = topology.owner_of(key)
        if owner is None:
            orphans.append(position)
        else:
            groups.setdefault(owner, []).append(position)
    return groups, orphans
