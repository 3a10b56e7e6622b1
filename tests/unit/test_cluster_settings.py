"""EVENTS_REDIS_STORAGE=redis+cluster://… selects the cluster broker."""

from __future__ import annotations

import asyncio

from sse_gateway.app import broker_from_settings
from sse_gateway.broker.cluster import ClusterBroker
from sse_gateway.broker.redis import RedisBroker
from sse_gateway.settings import load_settings, parse_value


def test_a_cluster_url_is_accepted_with_its_seed_nodes() -> None:
    address = parse_value("redis", "redis+cluster://u:pw@127.0.0.1:7000,127.0.0.2:7001")
    assert address.mode == "cluster"
    assert address.all_nodes == (("127.0.0.1", 7000), ("127.0.0.2", 7001))


def test_the_broker_follows_the_scheme() -> None:
    asyncio.run(_brokers())


async def _brokers() -> None:
    secret = {"SSE_JWT_SECRET": "x" * 40}
    cluster = load_settings(
        {**secret, "EVENTS_REDIS_STORAGE": "redis+cluster://h:7000"}, {}, dev=False
    )
    single = load_settings({**secret, "EVENTS_REDIS_STORAGE": "redis://h:6379"}, {}, dev=False)
    broker = broker_from_settings(cluster)
    assert isinstance(broker, ClusterBroker)
    assert "redis+cluster://h:7000" in broker.description
    await broker.close()
    other = broker_from_settings(single)
    assert isinstance(other, RedisBroker)
    await other.close()
