#!/usr/bin/env python3
"""The gateway's own cost per delivered event, without the network: µs and CPU instructions.

Runs the real delivery path in-process: Redis Pub/Sub replies (RESP bytes, as Redis sends
them) go into the broker's `PubSubProtocol.data_received`, through the hiredis reader, the
envelope check and frame encoding, the hub, and `Stream.deliver` of N streams, one event
per distinct player. Only the transports are stand-ins whose `write()` does nothing, so what is
measured is the user-space work the gateway adds on top of the write() syscall that
`bench/send_ceiling.py` measures.

    python bench/hotpath.py --messages 200000            # µs per event (machine noise applies)
    python bench/hotpath.py --callgrind                   # CPU instructions per event

With `--callgrind` the script runs itself twice under `valgrind --tool=callgrind` (with
`--messages` M and 6M) and reports (instructions(6M) - instructions(M)) / 5M: startup cancels
out, and the figure is the same from run to run whatever else the machine does. Point
`PYTHONPATH` at another checkout's `src` to compare two versions of the gateway.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import orjson


class NullTransport:
    """What streams, request readers and the Pub/Sub protocol call; writes go nowhere."""

    def __init__(self) -> None:
        self.writes = 0
        self.paused = False

    def write(self, data: bytes) -> None:
        self.writes += 1

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False

    def is_closing(self) -> bool:
        return False

    def set_write_buffer_limits(self, high: int, low: int) -> None:
        pass

    def set_protocol(self, protocol: object) -> None:
        pass

    def get_extra_info(self, name: str, default: object = None) -> object:
        return default


def resp_message(channel: bytes, payload: bytes) -> bytes:
    return b"*3\r\n$7\r\nmessage\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n" % (
        len(channel),
        channel,
        len(payload),
        payload,
    )


async def run(streams: int, messages: int, chunk: int, stamp: bool = False) -> tuple[float, int]:
    from sse_gateway.app import Gateway, broker_from_settings
    from sse_gateway.broker.pubsub import PubSubProtocol
    from sse_gateway.settings import Settings, parse_redis_address
    from sse_gateway.streams.hub import Channel
    from sse_gateway.streams.stream import Stream

    settings = Settings(redis=parse_redis_address("redis://127.0.0.1:1"), jwt_secret="x" * 32)
    gateway = Gateway(settings, broker_from_settings(settings), fd_limit=1 << 20)
    transport = NullTransport()
    names = [f"SSE::bench::p{i}".encode() for i in range(streams)]
    for name in names:
        stream = Stream(transport, name, 0, b"", gateway.lifecycle)  # type: ignore[arg-type]
        stream.go_live(b"", [], None)
        channel = Channel(name, 0)
        channel.streams.append(stream)
        gateway.hub._channels[name] = channel
    transport.writes = 0  # go_live wrote each (empty) head
    rng = random.Random(1)
    order = list(range(streams))
    wire = bytearray()
    for k in range(messages):
        if k % streams == 0:
            rng.shuffle(order)  # distinct players, as in the saturation scenario
        message: dict[str, object] = {"type": "bench", "data": {"t": time.time_ns()}}
        if stamp:  # as publish.lua sends it: the latency histogram observes each event
            message["ts"] = time.time()
        payload = orjson.dumps(message)
        wire += resp_message(names[order[k % streams]], payload)
    data = bytes(wire)
    protocol = PubSubProtocol(gateway.fanout.on_message, lambda reply: None)
    protocol.connection_made(transport)  # type: ignore[arg-type]
    start = time.perf_counter()
    for offset in range(0, len(data), chunk):
        # As uvloop does: no read while the protocol has paused reading.
        while transport.paused:
            await asyncio.sleep(0)
        protocol.data_received(data[offset : offset + chunk])
        await asyncio.sleep(0)  # the loop turn between reads, where continuations run
    while transport.writes < messages:
        await asyncio.sleep(0)
    elapsed = time.perf_counter() - start
    return elapsed, transport.writes


SECRET = "s" * 32


def connect_requests(streams: int) -> list[bytes]:
    """One stream request per player, with an HS256 token (made here: PyJWT is slow)."""
    import jwt

    exp = int(time.time()) + 3600
    return [
        (
            "GET /v1/sse HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nAuthorization: Bearer "
            + jwt.encode({"brand_id": "bench", "sub": f"p{i}", "exp": exp}, SECRET, "HS256")
            + "\r\nAccept: text/event-stream\r\nCache-Control: no-cache\r\n\r\n"
        ).encode()
        for i in range(streams)
    ]


class EmptyHistory(NullTransport):
    """The Redis side of the history read connection: every player's history is empty, and
    no player is blocked (a new stream's block check, one EXISTS, goes here when it asks)."""

    def __init__(self, protocol: asyncio.Protocol) -> None:
        super().__init__()
        self.protocol = protocol

    def write(self, data: bytes) -> None:
        times = data.count(b"$4\r\nTIME\r\n")
        heads = data.count(b"$9\r\nXREVRANGE\r\n")
        checks = data.count(b"$6\r\nEXISTS\r\n")
        reply = b"*2\r\n$10\r\n1700000000\r\n$6\r\n000000\r\n" * times + b"*0\r\n" * heads
        reply += b":0\r\n" * checks  # a write holds one kind of batch: order is kept
        asyncio.get_running_loop().call_soon(self.protocol.data_received, reply)


async def run_connect(requests: list[bytes]) -> tuple[float, int]:
    """Stream setup in-process: accept, HTTP request, JWT, hub join, SUBSCRIBE, `connected`."""
    from sse_gateway.app import Gateway, broker_from_settings
    from sse_gateway.broker.pubsub import PubSubProtocol
    from sse_gateway.broker.reads import ReadProtocol
    from sse_gateway.edge.protocol import RequestReader
    from sse_gateway.settings import Settings, parse_redis_address

    streams = len(requests)
    settings = Settings(redis=parse_redis_address("redis://127.0.0.1:1"), jwt_secret=SECRET)
    gateway = Gateway(settings, broker_from_settings(settings), fd_limit=1 << 20)
    broker = gateway.broker
    redis_side = NullTransport()  # where SUBSCRIBE batches go
    protocol = PubSubProtocol(gateway.fanout.on_message, broker._on_reply)  # type: ignore[attr-defined]
    protocol.connection_made(redis_side)  # type: ignore[arg-type]
    broker._protocol = protocol  # type: ignore[union-attr]
    broker._connected = True  # type: ignore[union-attr]
    control = getattr(gateway, "control", None)
    if control is not None:
        # As once the index of blocks was read after the connect: complete, no block in force.
        control._complete = True
    # Where history reads go: answered at once, as an empty history would be (TIME, then one
    # empty XREVRANGE per stream), through the real command encoding and hiredis parsing.
    reads = ReadProtocol()
    reads.connection_made(EmptyHistory(reads))  # type: ignore[arg-type]
    broker._reads._protocol = reads  # type: ignore[attr-defined]
    confirmations = [
        b"*3\r\n$9\r\nsubscribe\r\n$%d\r\nSSE::bench::p%d\r\n:%d\r\n"
        % (len(f"SSE::bench::p{i}"), i, i + 1)
        for i in range(streams)
    ]
    clients = [NullTransport() for _ in range(streams)]
    start = time.perf_counter()
    for i in range(streams):
        conn = RequestReader(gateway.router, gateway.admission)
        conn.connection_made(clients[i])  # type: ignore[arg-type]
        conn.data_received(requests[i])
        if i % 100 == 99:
            await asyncio.sleep(0)  # a loop turn: deferred requests, the SUBSCRIBE flush
    for _ in range(streams // 50 + 10):
        await asyncio.sleep(0)
    # Redis confirms every channel; each confirmation makes one stream live.
    protocol.data_received(b"".join(confirmations))
    while sum(c.writes for c in clients) < streams:
        await asyncio.sleep(0)
    elapsed = time.perf_counter() - start
    return elapsed, sum(1 for c in clients if c.writes)


def callgrind_instructions(args: argparse.Namespace, messages: int) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "callgrind.out"
        cmd = [
            "valgrind",
            "--tool=callgrind",
            f"--callgrind-out-file={out}",
            sys.executable,
            __file__,
            "--streams",
            str(args.streams),
            "--messages",
            str(messages),
            "--chunk",
            str(args.chunk),
            *(["--stamp"] if args.stamp else []),
        ]
        if args.connect:
            # Tokens are made here, outside valgrind, so their cost is not counted.
            requests = Path(tmp) / "requests"
            requests.write_text(json.dumps([r.decode() for r in connect_requests(args.streams)]))
            cmd += ["--connect", "--requests-file", str(requests)]
        subprocess.run(cmd, check=True, capture_output=True, env=os.environ.copy())
        match = re.search(r"^(?:summary|totals): (\d+)", out.read_text(), re.M)
        if match is None:
            raise SystemExit("no instruction total in the callgrind output")
        return int(match.group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=10_000)
    parser.add_argument("--messages", type=int, default=200_000)
    parser.add_argument("--chunk", type=int, default=262_144, help="bytes per read (uvloop: 256K)")
    parser.add_argument("--callgrind", action="store_true", help="instructions per event")
    parser.add_argument(
        "--connect", action="store_true", help="stream setup instead of delivery (--streams)"
    )
    parser.add_argument("--requests-file", type=Path, help=argparse.SUPPRESS)
    parser.add_argument(
        "--stamp", action="store_true", help="envelopes carry publish.lua's `ts` stamp"
    )
    args = parser.parse_args()
    import uvloop

    what = "stream set up" if args.connect else "delivered event"
    if args.callgrind:
        if args.connect:
            small = max(500, args.streams // 10)
            low = callgrind_instructions(argparse.Namespace(**{**vars(args), "streams": small}), 0)
            args.streams = small * 6
            high = callgrind_instructions(args, 0)
        else:
            small = max(1_000, args.messages // 40)
            low = callgrind_instructions(args, small)
            high = callgrind_instructions(args, small * 6)
        per = (high - low) / (small * 5)
        print(f"{per:,.0f} instructions per {what} (callgrind, {small:,} vs {small * 6:,})")
        return
    if args.connect:
        if args.requests_file is not None:
            requests = [r.encode() for r in json.loads(args.requests_file.read_text())]
        else:
            requests = connect_requests(args.streams)
        elapsed, opened = uvloop.run(run_connect(requests))
        print(f"{elapsed / opened * 1e6:.2f} µs per {what} ({opened:,} streams, {elapsed:.2f} s)")
        return
    elapsed, delivered = uvloop.run(run(args.streams, args.messages, args.chunk, args.stamp))
    print(
        f"{elapsed / delivered * 1e6:.2f} µs per delivered event ({delivered:,} events to "
        f"{args.streams:,} streams in {elapsed:.2f} s)"
    )


if __name__ == "__main__":
    main()
