"""A Redis address of the wrong kind says so: a cluster URL at one Redis, one Redis's URL at a
cluster node. The operator reads the cause in the log or the error, not a bare symptom."""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Callable, Iterator

import pytest
from support.cluster import RedisClusterProcesses
from support.procs import GatewayFactory, RedisServer, cli, wait_for

from sse_gateway.broker.slots import key_slot
from sse_gateway.publish import PublishUnavailable, SyncPublisher
from sse_gateway.publish.publisher import PUBLISH_SCRIPT
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


class LosingProxy:
    """A TCP proxy to one Redis node that passes everything, except that once a request
    holds EVALSHA it lets Redis run it, reads the reply, and cuts the client off without it:
    a reply lost on the way, as when a link breaks."""

    def __init__(self, port: int) -> None:
        self.target = port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.target))
            swallow = threading.Event()
            threading.Thread(target=self._up, args=(client, server, swallow), daemon=True).start()
            threading.Thread(target=self._down, args=(server, client, swallow), daemon=True).start()

    @staticmethod
    def _up(client: socket.socket, server: socket.socket, swallow: threading.Event) -> None:
        with contextlib.suppress(OSError):
            while data := client.recv(65536):
                if b"EVALSHA" in data:
                    swallow.set()
                server.sendall(data)

    @staticmethod
    def _down(server: socket.socket, client: socket.socket, swallow: threading.Event) -> None:
        with contextlib.suppress(OSError):
            while data := server.recv(65536):
                if swallow.is_set():
                    client.close()  # the reply goes nowhere
                    server.close()
                    return
                client.sendall(data)

    def close(self) -> None:
        self.listener.close()


def test_sync_cluster_publisher_never_sends_a_publish_again_after_a_lost_reply(
    cluster: RedisClusterProcesses, ids: Callable[..., str]
) -> None:
    """redis-py's sync cluster pipeline sends each command again after a connection error:
    an event Redis ran, whose reply was lost, would be stored (and delivered) twice."""
    brand, player = ids("b"), ids("p")
    channel = channel_name(brand, player)
    port = next(
        owner
        for owner, ranges in cluster.masters().items()
        if any(lo <= key_slot(channel) <= hi for lo, hi in ranges)
    )
    proxy = LosingProxy(port)
    node = cluster.node(port).client()
    node.script_load(PUBLISH_SCRIPT)  # EVALSHA runs at once (a NOSCRIPT reply is not lost)
    node.config_set("cluster-announce-port", proxy.port)
    try:
        # Every node tells clients the proxy's port for that master once gossip has it.
        wait_for(lambda: proxy_port_known(cluster, proxy.port))
        publisher = SyncPublisher.from_url(cluster.url)
        with contextlib.closing(publisher), pytest.raises(PublishUnavailable) as raised:
            publisher.publish(brand, player, "t", {})
        assert node.xlen(channel) == 1, raised.value  # run once, though its reply was lost
    finally:
        node.config_set("cluster-announce-port", 0)
        node.close()
        proxy.close()
        wait_for(lambda: not proxy_port_known(cluster, proxy.port))


def proxy_port_known(cluster: RedisClusterProcesses, port: int) -> bool:
    for seed in cluster.nodes:
        if not seed.running:
            continue
        with contextlib.closing(seed.client()) as client:
            slots = client.execute_command("CLUSTER", "SLOTS")
        if not any(entry[2][1] == port for entry in slots):
            return False
    return True
