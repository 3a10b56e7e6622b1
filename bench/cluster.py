#!/usr/bin/env python3
"""Deliveries/s on a Redis Cluster against a single Redis, side by side in one run.

Both targets get the same job: one gateway (`--redis redis://…` or `redis+cluster://…`), N
SSE streams (one player each, `bench/loadclient.py`), and events published as fast as one
process can (publish.lua over raw pipelined sockets; on the cluster one socket per master,
each event sent to its player's master with the `sharded` argument, so SPUBLISH). Measured:
events received by the clients per second over the middle half of the publishing window,
the gateway's CPU time per delivery over the same window (which says whether its read path
is as fast on the cluster: the rate itself is bound by whatever saturates first on this
machine, often the publisher and Redis), and the ratios cluster / single. The cluster is 3
masters on loopback (`tests/support/cluster.py`; `--replicas 1` adds a replica each);
everything shares this machine's cores, so the figures compare the gateway's two read paths,
not Redis deployments.

    .venv/bin/python bench/cluster.py                 # 1,000 streams, 8 s per target, < 2 min
    .venv/bin/python bench/cluster.py --players 2000 --seconds 15
    .venv/bin/python bench/cluster.py --rate 10000     # both at one rate: CPU per delivery

Every process it starts is stopped when it ends (try/finally, by PID).
"""

from __future__ import annotations

import argparse
import multiprocessing
import secrets
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import hiredis

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path[:0] = [str(REPO / "src"), str(REPO / "tests")]

import run as gw  # noqa: E402
from loadclient import ClientConfig, LoadClient, player_id  # noqa: E402
from support.cluster import RedisClusterProcesses  # noqa: E402
from support.procs import RedisServer  # noqa: E402

from sse_gateway.broker.pubsub import encode_command  # noqa: E402
from sse_gateway.broker.slots import parse_shards  # noqa: E402
from sse_gateway.publish.publisher import PUBLISH_SCRIPT, PUBLISH_SCRIPT_SHA  # noqa: E402

BATCH = 200


def publish_flood(
    nodes: list[tuple[int, list[bytes]]], sharded: bool, seconds: float, rate: float, out: Any
) -> None:
    """Publishes to every channel in turn, `BATCH` per pipeline per node, for `seconds`, at
    most `rate` events/s in all (0: as fast as it can)."""
    sockets = []
    for port, channels in nodes:
        sock = socket.create_connection(("127.0.0.1", port))
        sock.sendall(encode_command(b"SCRIPT", b"LOAD", PUBLISH_SCRIPT.encode()))
        reader = hiredis.Reader()
        while (reply := reader.gets()) is False:
            reader.feed(sock.recv(65536))
        sockets.append((sock, reader, channels))
    extra = (b"sharded",) if sharded else ()
    sha = PUBLISH_SCRIPT_SHA.encode()
    published = 0
    position = 0
    start = time.monotonic()
    end = start + seconds
    while time.monotonic() < end:
        if rate:
            ahead = start + published / rate - time.monotonic()
            if ahead > 0:
                time.sleep(ahead)
        # Every master's batch is written before any reply is read: the masters work at once.
        for sock, _, channels in sockets:
            batch = []
            for k in range(BATCH):
                channel = channels[(position + k) % len(channels)]
                data = b'{"t":%d}' % time.time_ns()
                batch.append(
                    encode_command(
                        b"EVALSHA", sha, b"1", channel, b"bench", data, b"100", b"600", *extra
                    )
                )
            sock.sendall(b"".join(batch))
        for sock, reader, _ in sockets:
            got = 0
            while got < BATCH:
                reply = reader.gets()
                if reply is False:
                    reader.feed(sock.recv(1 << 20))
                    continue
                if isinstance(reply, Exception):
                    raise RuntimeError(f"publish refused: {reply}")
                got += 1
            published += BATCH
        position += BATCH
    for sock, _, _ in sockets:
        sock.close()
    out.send(published)


def measure(
    url: str, nodes: list[tuple[int, list[bytes]]], sharded: bool, args: Any
) -> tuple[float, float]:
    """Deliveries/s and gateway CPU microseconds per delivery, over the middle half."""
    port = gw.free_port()
    secret = secrets.token_hex(32)
    logdir = Path(tempfile.mkdtemp(prefix="bench-cluster-"))
    command = [sys.executable, "-m", "sse_gateway", "serve", "--host", "127.0.0.1"]
    command += ["--port", str(port), "--redis", url, "--jwt-secret", secret]
    gateway = gw.start_gateway(command, [], port, logdir, None)
    lc = LoadClient(ClientConfig(port=port, players=args.players, processes=1, jwt_secret=secret))
    try:
        lc.start()
        report = lc.connect()
        if report.connected != args.players:
            raise RuntimeError(f"only {report.connected} of {args.players} streams connected")
        lc.reset(measure_latency=False)
        parent, child = multiprocessing.Pipe()
        publisher = multiprocessing.Process(
            target=publish_flood, args=(nodes, sharded, args.seconds, args.rate, child), daemon=True
        )
        publisher.start()
        time.sleep(args.seconds * 0.25)
        first, t0, cpu0 = lc.count(), time.monotonic(), gw.cpu_seconds(gateway.pid)
        time.sleep(args.seconds * 0.5)
        second, t1, cpu1 = lc.count(), time.monotonic(), gw.cpu_seconds(gateway.pid)
        publisher.join(args.seconds + 30)
        published = parent.recv() if parent.poll(5) else 0
        rate = (second - first) / (t1 - t0)
        busy = (cpu1 - cpu0) / (t1 - t0)
        per_delivery = 1e6 * (cpu1 - cpu0) / max(1, second - first)
        print(
            f"  {url.split('://')[0]:<14} published {published:,}; {rate:,.0f} deliveries/s; "
            f"gateway CPU {100 * busy:.0f}% of a core, {per_delivery:.1f} us per delivery"
        )
        return rate, per_delivery
    finally:
        lc.close()
        gateway.stop()


def cluster_nodes(cluster: RedisClusterProcesses, channels: list[bytes]) -> list[Any]:
    with socket.create_connection(("127.0.0.1", cluster.nodes[0].port)) as sock:
        sock.sendall(encode_command(b"CLUSTER", b"SHARDS"))
        reader = hiredis.Reader()
        while (reply := reader.gets()) is False:
            reader.feed(sock.recv(1 << 20))
    topology = parse_shards(reply)
    by_port: dict[int, list[bytes]] = {}
    for channel in channels:
        owner = topology.owner_of(channel)
        assert owner is not None
        by_port.setdefault(owner[1], []).append(channel)
    return sorted(by_port.items())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--players", type=int, default=1000, help="SSE streams (one player each)")
    ap.add_argument("--seconds", type=float, default=8.0, help="publishing time per target")
    ap.add_argument("--rate", type=float, default=0, help="events/s in all (default 0: max)")
    ap.add_argument("--replicas", type=int, default=0, help="replicas per master (default 0)")
    args = ap.parse_args()
    channels = [f"SSE::bench::{player_id('p', i)}".encode() for i in range(args.players)]
    workdir = Path(tempfile.mkdtemp(prefix="bench-cluster-"))
    single = RedisServer(workdir / "single").start()
    # Replicas only with --replicas: on a small machine their replication takes CPU from
    # everything else, which is not what this compares.
    size = 3 * (1 + args.replicas)
    cluster = RedisClusterProcesses(workdir / "cluster", size, args.replicas).start()
    try:
        pace = f"{args.rate:,.0f} events/s" if args.rate else "as fast as one process can"
        print(f"{args.players:,} streams, {args.seconds:g} s of publishing per target, {pace}")
        one, one_cpu = measure(single.url, [(single.port, channels)], False, args)
        many, many_cpu = measure(cluster.url, cluster_nodes(cluster, channels), True, args)
        shape = f"3 masters + {3 * args.replicas} replicas"
        print(f"| | single Redis | Redis Cluster ({shape}) | cluster / single |")
        print("|---|---|---|---|")
        print(f"| deliveries/s | {one:,.0f} | {many:,.0f} | {many / one:.2f} |")
        print(
            f"| gateway CPU per delivery | {one_cpu:.1f} us | {many_cpu:.1f} us "
            f"| {many_cpu / one_cpu:.2f} |"
        )
    finally:
        cluster.stop()
        single.stop()


if __name__ == "__main__":
    main()
