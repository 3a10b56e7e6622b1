"""A Redis address of the wrong kind says so: a cluster URL at one Redis, one Redis's URL at a
cluster node. The operator reads the cause in the log or the error, not a bare symptom."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import pytest
from support.cluster import RedisClusterProcesses
from support.procs import GatewayFactory, RedisServer, cli, wait_for

from sse_gateway.broker.slots import key_slot
from sse_gateway.publish import PublishUnavailable, SyncPublisher
from sse_gateway.wire.naming import channel_name

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisClusterProcesses]:
    processes = RedisClusterProcesses(tmp_path_factory.mktemp("cluster")).start()
    try:
        yield processes
    finally:
        processes.stop()


def cluster_url_at(server: RedisServer) -> str:
    return f"redis+cluster://127.0.0.1:{server.port}"


def test_gateway_with_a_cluster_url_at_one_redis_logs_why_it_is_not_ready(
    gateway_factory: GatewayFactory, redis_server: RedisServer
) -> None:
    gateway = gateway_factory(redis=cluster_url_at(redis_server), ready=False)
    status, _ = gateway.readyz()
    assert status == 503
    # The cause, not only "topology not settled yet": Redis's own words.
    wait_for(lambda: "cluster support disabled" in gateway.logs(), timeout=10)


def test_publisher_with_a_cluster_url_at_one_redis_raises_publish_unavailable(
    redis_server: RedisServer,
) -> None:
    with pytest.raises(PublishUnavailable, match="not enabled"):
        SyncPublisher.from_url(cluster_url_at(redis_server))


def test_cli_publish_with_a_cluster_url_at_one_redis_is_an_error_line_not_a_traceback(
    redis_server: RedisServer,
) -> None:
    done = cli(
        "publish",
        *("--redis", cluster_url_at(redis_server), "--brand", "b", "--player", "p"),
        *("--type", "t", "--data", "{}"),
    )
    assert done.returncode == 1
    assert done.stderr.startswith("error: "), done.stderr
    assert "Traceback" not in done.stderr


def test_publish_through_a_single_redis_url_at_a_cluster_node_names_moved_and_the_fix(
    cluster: RedisClusterProcesses, ids: Callable[..., str]
) -> None:
    port = cluster.nodes[0].port
    mine = {
        start_end
        for owner, ranges in cluster.masters().items()
        if owner == port
        for start_end in ranges
    }
    brand = ids("b")
    player = next(  # a player whose slot another node owns: that node answers MOVED
        p
        for p in (ids("p") for _ in range(1000))
        if not any(lo <= key_slot(channel_name(brand, p)) <= hi for lo, hi in mine)
    )
    publisher = SyncPublisher.from_url(f"redis://127.0.0.1:{port}")
    with contextlib.closing(publisher), pytest.raises(PublishUnavailable) as raised:
        publisher.publish(brand, player, "t", {})
    assert "MOVED" in str(raised.value)
    assert "redis+cluster://" in str(raised.value)
