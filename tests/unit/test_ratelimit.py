"""ConnectRateLimit: client addresses (X-Forwarded-For from trusted proxies only) and buckets."""

from __future__ import annotations

import ipaddress

import pytest

from sse_gateway.edge import ratelimit
from sse_gateway.edge.ratelimit import ConnectRateLimit
from sse_gateway.settings import parse_networks

PROXIES = parse_networks("10.0.0.0/8, fd00::/8")


@pytest.mark.parametrize(
    ("peer", "forwarded", "expected"),
    [
        ("203.0.113.9", None, "203.0.113.9"),
        # From a client, X-Forwarded-For is whatever it wrote: ignored.
        ("203.0.113.9", "198.51.100.1", "203.0.113.9"),
        # From a trusted proxy: the rightmost hop that is not a trusted proxy.
        ("10.1.2.3", "198.51.100.1", "198.51.100.1"),
        ("10.1.2.3", "6.6.6.6, 198.51.100.1, 10.9.9.9", "198.51.100.1"),
        ("10.1.2.3", " 198.51.100.1:4711 ", "198.51.100.1"),
        ("10.1.2.3", "[2001:db8::1]:443", "2001:db8::/64"),
        # A garbled hop stops the walk: the request counts against the last address believed.
        ("10.1.2.3", "198.51.100.1, not-an-ip", "10.1.2.3"),
        ("10.1.2.3", "", "10.1.2.3"),
        # IPv6 clients by their /64; v4-mapped v6 as v4.
        ("2001:db8:1:2:aaaa::1", None, "2001:db8:1:2::/64"),
        ("::ffff:192.0.2.7", None, "192.0.2.7"),
        ("fd00::5", "2001:db8:1:2::9, fd00::6", "2001:db8:1:2::/64"),
        (None, "198.51.100.1", None),
    ],
)
def test_client_key(peer: str | None, forwarded: str | None, expected: str | None) -> None:
    assert ConnectRateLimit(5, PROXIES).client_key(peer, forwarded) == expected


def test_a_burst_of_rate_then_rate_per_second() -> None:
    limit = ConnectRateLimit(3)
    assert [limit.retry_after("a", 100.0) for _ in range(4)] == [0, 0, 0, 1]
    assert limit.retry_after("b", 100.0) == 0  # per address
    assert limit.retry_after("a", 100.2) == 1
    assert limit.retry_after("a", 100.4) == 0  # 0.4 s at 3/s: one token back
    assert limit.retry_after("a", 100.4) == 1
    assert [limit.retry_after("a", 110.0) for _ in range(4)] == [0, 0, 0, 1]  # burst capped


def test_a_rate_below_one_still_allows_one_request() -> None:
    limit = ConnectRateLimit(0.25)
    assert limit.retry_after("a", 0.0) == 0
    assert limit.retry_after("a", 1.0) == 3  # a token comes back 4 s after the first
    assert limit.retry_after("a", 4.0) == 0


def test_buckets_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ratelimit, "MAX_ADDRESSES", 3)
    limit = ConnectRateLimit(1)
    for key in ("a", "b", "c"):
        assert limit.retry_after(key, 0.0) == 0
    assert limit.retry_after("a", 0.0) == 1  # "a" is now the most recently used
    assert limit.retry_after("d", 0.0) == 0  # forgets "b", the least recently used
    assert len(limit._buckets) == 3
    assert limit.retry_after("a", 0.0) == 1
    assert limit.retry_after("b", 0.0) == 0  # forgotten: a full bucket again


def test_parse_networks() -> None:
    assert parse_networks(" 10.0.0.0/8 ,, ::1, 192.168.1.7") == (
        ipaddress.ip_network("10.0.0.0/8"),
        ipaddress.ip_network("::1"),
        ipaddress.ip_network("192.168.1.7"),
    )
    assert parse_networks("10.1.2.3/8") == (ipaddress.ip_network("10.0.0.0/8"),)
    with pytest.raises(ValueError, match="'nope'"):
        parse_networks("10.0.0.0/8, nope")
