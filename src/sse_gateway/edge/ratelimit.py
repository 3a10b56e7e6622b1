"""ConnectRateLimit: stream requests per second per client address (SSE_CONNECT_RATE_PER_IP).

A token bucket per address, refilled at `rate` per second and holding at most `rate` tokens
(the burst; at least 1), so an address may open `rate` streams at once and `rate` per second
after that.
The client address is the socket's peer, or, when the peer is one of SSE_TRUSTED_PROXIES, the
rightmost address of `X-Forwarded-For` that is not a trusted proxy itself (the leftmost
entries are whatever the client wrote). IPv6 clients are counted per /64, the block one
subscriber usually holds.

Memory is bounded: at most `MAX_ADDRESSES` buckets; past that the least recently used is
forgotten (that address starts again with a full bucket).
"""

from __future__ import annotations

import asyncio
import ipaddress
import math
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass

from sse_gateway.settings import IPNetwork

MAX_ADDRESSES = 100_000


def _address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    text = text.strip()
    if text.startswith("[") and "]" in text:  # [v6]:port, as some proxies write it
        text = text[1 : text.index("]")]
    elif text.count(":") == 1:  # v4:port
        text = text.partition(":")[0]
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def peer_host(transport: asyncio.BaseTransport | None) -> str | None:
    """The client's IP address as the socket sees it (a proxy's, behind one), or None."""
    peer = transport.get_extra_info("peername") if transport is not None else None
    return peer[0] if isinstance(peer, tuple) and peer else None


@dataclass(slots=True)
class _Bucket:
    tokens: float
    at: float


class ConnectRateLimit:
    """Decides, per stream request, whether its client address may connect now."""

    __slots__ = ("_buckets", "_trusted", "burst", "rate")

    def __init__(self, rate: float, trusted_proxies: Iterable[IPNetwork] = ()) -> None:
        """`rate`: stream requests per second per address (> 0); `trusted_proxies`: whose
        `X-Forwarded-For` is believed."""
        self.rate = rate
        self.burst = max(1.0, rate)
        self._trusted = tuple(trusted_proxies)
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()

    def client_key(self, peer: str | None, forwarded_for: str | None) -> str | None:
        """The address a request is counted against (IPv6: its /64), or None if unknown."""
        address = _address(peer) if peer else None
        if address is None:
            return None
        if forwarded_for and self._is_trusted(address):
            for hop in reversed(forwarded_for.split(",")):
                forwarded = _address(hop)
                if forwarded is None:
                    break  # a garbled list: count the request against the proxy itself
                address = forwarded
                if not self._is_trusted(forwarded):
                    break
        if isinstance(address, ipaddress.IPv6Address):
            return str(ipaddress.IPv6Network((address, 64), strict=False))
        return str(address)

    def _is_trusted(self, address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
        return any(address in network for network in self._trusted)

    def retry_after(self, key: str, now: float) -> int:
        """0 if `key` may connect now (a token is taken), else the whole seconds to wait."""
        buckets = self._buckets
        bucket = buckets.get(key)
        rate = self.rate
        if bucket is None:
            if len(buckets) >= MAX_ADDRESSES:
                buckets.popitem(last=False)
            buckets[key] = _Bucket(self.burst - 1.0, now)
            return 0
        buckets.move_to_end(key)
        bucket.tokens = min(self.burst, bucket.tokens + (now - bucket.at) * rate)
        bucket.at = now
        if bucket.tokens >= 1.0:
            bucket.tokens -= 1.0
            return 0
        return max(1, math.ceil((1.0 - bucket.tokens) / rate))
