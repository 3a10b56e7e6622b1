#!/usr/bin/env python3
"""The send ceiling: how many SSE frames per second one core can write to N loopback streams
when it does nothing else: no Redis, no parsing, no hub, only the write() per frame.

The server below accepts the load client's streams (`bench/loadclient.py`, the same client
`bench/run.py` uses), answers each with the SSE head and `event: connected`, and then writes
`event: bench` frames to the N sockets in a shuffled round-robin for `--seconds`, as fast as it
can, with no other work. Each event goes to a different socket, as in the gateway's saturation
scenario (d). It prints sends/s, what the clients received, and where the server core's time
went: user, system (the write() syscall, loopback TCP included) and softirq, per send.

Whatever the gateway does per delivery comes on top of this. So the ratio of the gateway's
deliveries/s (scenario d of `bench/run.py`) to this ceiling is how much of the core the
gateway's own work costs, and the ceiling itself bounds any design that writes each event to
its own socket on this core: no user-space change gets past it.

    python bench/send_ceiling.py --connections 10000 --seconds 5
    python bench/send_ceiling.py --mode transport   # through uvloop's transport.write

Modes: `write` calls os.write() on each socket's descriptor (the kernel's cost plus the least
Python); `transport` calls uvloop's `transport.write()` as the gateway does, and returns to the
event loop every `--batch` frames.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import secrets
import socket
import sys
import time
from pathlib import Path

import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent))
from loadclient import ClientConfig, LoadClient

HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream; charset=utf-8\r\n"
    b"Cache-Control: no-cache\r\nConnection: close\r\n\r\n"
    b'retry: 3000\n\nevent: connected\ndata: {"ceiling":true}\n\n'
)


class StreamProtocol(asyncio.Protocol):
    __slots__ = ("buf", "server", "transport")

    def __init__(self, server: CeilingServer) -> None:
        self.server = server
        self.buf = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self.buf is None:
            return
        self.buf += data
        if b"\r\n\r\n" in self.buf:
            self.buf = None  # type: ignore[assignment]
            assert self.transport is not None
            self.transport.write(HEAD)
            self.server.streams.append(self.transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None


class CeilingServer:
    def __init__(self) -> None:
        self.streams: list[asyncio.Transport] = []


def cpu0_ticks() -> dict[str, float]:
    """CPU 0's softirq, irq and steal time (s) from /proc/stat."""
    tck = os.sysconf("SC_CLK_TCK")
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith("cpu0 "):
            f = [int(x) for x in line.split()[1:]]
            return {"irq": f[5] / tck, "softirq": f[6] / tck, "steal": f[7] / tck}
    return {"irq": 0.0, "softirq": 0.0, "steal": 0.0}


async def blast(
    streams: list[asyncio.Transport], seconds: float, mode: str, batch: int
) -> tuple[int, int]:
    """Writes frames round-robin over the shuffled streams; returns (sent, would_block)."""
    order = streams[:]
    random.shuffle(order)
    fds = [t.get_extra_info("socket").fileno() for t in order]
    sent = would_block = 0
    end = time.monotonic() + seconds
    write = os.write
    time_ns = time.time_ns
    n = len(order)
    i = 0
    while time.monotonic() < end:
        if mode == "write":
            for _ in range(batch):
                try:
                    write(fds[i], b'event: bench\ndata: {"t":%d}\n\n' % time_ns())
                    sent += 1
                except BlockingIOError:
                    would_block += 1
                i = i + 1 if i + 1 < n else 0
        else:
            for _ in range(batch):
                order[i].write(b'event: bench\ndata: {"t":%d}\n\n' % time_ns())
                sent += 1
                i = i + 1 if i + 1 < n else 0
        await asyncio.sleep(0)
    return sent, would_block


async def main_async(
    args: argparse.Namespace, sock: socket.socket, lc: LoadClient
) -> dict[str, object]:
    server = CeilingServer()
    loop = asyncio.get_running_loop()
    listener = await loop.create_server(lambda: StreamProtocol(server), sock=sock, backlog=4096)
    try:
        report = await loop.run_in_executor(None, lc.connect)
        if report.connected < args.connections:
            raise SystemExit(f"only {report.connected} of {args.connections} connected")
        await asyncio.sleep(1.0)
        await loop.run_in_executor(None, lc.reset)
        t0, ticks0 = os.times(), cpu0_ticks()
        wall0 = time.monotonic()
        sent, would_block = await blast(server.streams, args.seconds, args.mode, args.batch)
        wall = time.monotonic() - wall0
        t1, ticks1 = os.times(), cpu0_ticks()
        await asyncio.sleep(1.0)  # let the clients read what is in flight
        stats = await loop.run_in_executor(None, lc.stats)
    finally:
        listener.close()
    user, system = t1.user - t0.user, t1.system - t0.system
    softirq = ticks1["softirq"] - ticks0["softirq"] + ticks1["irq"] - ticks0["irq"]
    steal = ticks1["steal"] - ticks0["steal"]

    def per_send(seconds: float) -> float:
        return round(seconds / max(1, sent) * 1e6, 2)

    return {
        "mode": args.mode,
        "connections": args.connections,
        "seconds": round(wall, 2),
        "sends_per_s": round(sent / wall),
        "would_block": would_block,
        "received": stats.bench,
        "client_cpu_pct": [round(c) for c in stats.client_cpu_pct],
        "server_us_per_send": {
            "user": per_send(user),
            "system": per_send(system),
            "irq_softirq_cpu0": per_send(softirq),
            "steal_cpu0": per_send(steal),
        },
        "server_cpu_pct": round(100 * (user + system) / wall),
        "latency_ms": stats.latency_ms,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=10_000)
    parser.add_argument("--processes", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--mode", choices=("write", "transport"), default="write")
    parser.add_argument("--batch", type=int, default=256, help="frames per loop turn")
    parser.add_argument("--server-cpu", type=int, default=0)
    parser.add_argument("--client-cpus", type=int, nargs="*", default=[1])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    os.sched_setaffinity(0, {args.server_cpu})
    # The clients are forked before any event loop or thread exists.
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(4096)
    conf = ClientConfig(
        port=sock.getsockname()[1],
        players=args.connections,
        processes=args.processes,
        jwt_secret=secrets.token_urlsafe(32),
        cpus=tuple(args.client_cpus),
    )
    lc = LoadClient(conf)
    lc.start()
    try:
        uvloop.install()
        result = asyncio.run(main_async(args, sock, lc))
    finally:
        lc.close()
    if args.json:
        print(json.dumps(result))
        return
    us = result["server_us_per_send"]
    print(
        f"{result['mode']}: {result['sends_per_s']:,} sends/s to {args.connections:,} streams "
        f"for {result['seconds']} s; received {result['received']:,}; server CPU "
        f"{result['server_cpu_pct']}%; per send: {us}; clients {result['client_cpu_pct']}%"
    )


if __name__ == "__main__":
    socket.setdefaulttimeout(None)
    main()
