#!/usr/bin/env python3
"""Redis CPU per published event, for sizing Redis shards: plain PUBLISH and publish.lua.

Starts a private redis-server (stopped at the end), one subscriber connection subscribed to
every player channel (as one gateway process is) that reads and discards what Redis sends, then
publishes `--events` events to distinct players as fast as one pipelined publisher can, in two
modes: `publish` (PUBLISH, what bench/run.py's publisher sends) and `lua` (EVALSHA of the
shipped publish.lua: XADD to the player's history + PUBLISH, what the Publisher library, the CLI
and HTTP publish send). Redis's own CPU time (utime + stime from /proc) per event is the figure:
`1e6 / us_per_event` is what one Redis core could take at 100 % busy, an upper bound; the
publisher and the subscriber share the machine with it, so the achieved rate is lower.

    .venv/bin/python bench/redis_cost.py --players 50000 --events 200000

Then fills the history of `--history-players` players (101 entries each, as SSE_HISTORY_SIZE
100 keeps) with `--data-bytes` of JSON data per event and reports Redis memory per player.

Prints one JSON object per mode and one for the history. Exit status 1 when the subscriber
did not receive every event.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import redis
from publisher import HistoryPublisher, Sender, channels_for
from run import free_port

CLK_TCK = os.sysconf("SC_CLK_TCK")
MESSAGE = b"\r\nmessage\r\n"


def redis_cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


class Subscriber(threading.Thread):
    """One RESP2 connection subscribed to `channels`; counts `message` pushes, discards them."""

    def __init__(self, port: int, channels: list[bytes]) -> None:
        super().__init__(daemon=True)
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        self.messages = 0
        self.stopped = False
        for start in range(0, len(channels), 5000):
            part = channels[start : start + 5000]
            cmd = [b"*%d\r\n$9\r\nSUBSCRIBE\r\n" % (len(part) + 1)]
            cmd += [b"$%d\r\n%s\r\n" % (len(ch), ch) for ch in part]
            self.sock.sendall(b"".join(cmd))
        self.confirmations = 0
        self.marker = b"\r\nsubscribe\r\n"
        self.tail = b""
        while self.confirmations < len(channels):
            data = self.sock.recv(1 << 20)
            if not data:
                raise ConnectionError("redis closed the subscriber")
            self.confirmations += self._count(data)
        self.marker = MESSAGE
        self.tail = b""

    def _count(self, data: bytes) -> int:
        """Markers in `data`, and one split over the previous read and this one: the kept
        tail is one byte shorter than a marker, so no marker is counted twice."""
        joined = self.tail + data
        self.tail = joined[-(len(self.marker) - 1) :]
        return joined.count(self.marker)

    def run(self) -> None:
        while not self.stopped:
            try:
                data = self.sock.recv(1 << 20)
            except OSError:
                return
            if not data:
                return
            self.messages += self._count(data)

    def wait_for(self, count: int, limit: float) -> None:
        deadline = time.monotonic() + limit
        while self.messages < count and time.monotonic() < deadline:
            time.sleep(0.05)

    def close(self) -> None:
        self.stopped = True
        # close() alone leaves the socket open while run() is blocked in recv()
        self.sock.shutdown(socket.SHUT_RDWR)
        self.join(5.0)
        self.sock.close()


def measure(
    mode: str, port: int, redis_pid: int, channels: list[bytes], events: int
) -> dict[str, float | int | str]:
    url = f"redis://127.0.0.1:{port}"
    sub = Subscriber(port, channels)
    sub.start()
    # The previous mode's subscriber may not be gone yet: its PUBLISH replies would count it.
    client = redis.Redis.from_url(url)
    deadline = time.monotonic() + 10.0
    while client.pubsub_numsub(channels[0])[0][1] != 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    client.close()
    batch = 1000
    order = [channels[i % len(channels)] for i in range(events)]
    cpu0, t0 = redis_cpu_s(redis_pid), time.perf_counter()
    receivers = 0
    if mode == "lua":
        pub = HistoryPublisher(url, batch=batch)
        data = [b'{"t":%d}' % i for i in range(batch)]
        for start in range(0, events, batch):
            part = order[start : start + batch]
            receivers += pub.publish(part, b"bench", data[: len(part)])[1]
        pub.close()
    else:
        sender = Sender(redis.Redis.from_url(url), "packed")
        for start in range(0, events, batch):
            receivers += sender.send(order[start : start + batch])
        sender.close()
    elapsed = time.perf_counter() - t0
    sub.wait_for(events, 30.0)
    cpu = redis_cpu_s(redis_pid) - cpu0
    sub.close()
    return {
        "mode": mode,
        "events": events,
        "receivers": receivers,
        "received": sub.messages,
        "elapsed_s": round(elapsed, 3),
        "publish_rate_per_s": round(events / elapsed),
        "redis_cpu_s": round(cpu, 3),
        "redis_us_per_event": round(1e6 * cpu / events, 2),
        "events_per_redis_core_s": round(events / cpu) if cpu > 0 else 0,
    }


def history_memory(port: int, players: int, size: int, data_bytes: int) -> dict[str, int]:
    """Redis memory of full histories: `size + 1` entries (what publish.lua keeps) for each of
    `players` fresh players, events of `data_bytes` bytes of JSON data."""
    url = f"redis://127.0.0.1:{port}"
    client = redis.Redis.from_url(url)
    before = int(client.info("memory")["used_memory"])
    pub = HistoryPublisher(url, history_size=size)
    channels = channels_for("bench", players, "h")
    data = b'{"pad":"%s"}' % (b"x" * max(0, data_bytes - 10))
    for _ in range(size + 1):
        pub.publish(channels, b"bench", [data] * players)
    pub.close()
    used = int(client.info("memory")["used_memory"]) - before
    client.close()
    return {
        "history_players": players,
        "entries_per_player": size + 1,
        "data_bytes": len(data),
        "bytes_per_player": used // players,
        "bytes_per_entry": used // (players * (size + 1)),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--players", type=int, default=50_000, help="channels subscribed (50000)")
    ap.add_argument("--events", type=int, default=200_000, help="events per mode (200000)")
    ap.add_argument("--modes", default="publish,lua", help="publish,lua")
    ap.add_argument(
        "--history-players",
        type=int,
        default=1000,
        help="players whose full history (SSE_HISTORY_SIZE 100) is measured (0: skip)",
    )
    ap.add_argument("--data-bytes", type=int, default=100, help="JSON data per history event")
    args = ap.parse_args(argv)
    if shutil.which("redis-server") is None:
        print("redis-server not found", file=sys.stderr)
        return 2
    port = free_port()
    status = 0
    with tempfile.TemporaryDirectory(prefix="redis-cost-") as tmp:
        proc = subprocess.Popen(
            [
                *("redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", ""),
                *("--appendonly", "no", "--dir", tmp, "--loglevel", "warning"),
            ],
            stdout=open(Path(tmp) / "redis.log", "wb"),  # noqa: SIM115 - closed with the process
            stderr=subprocess.STDOUT,
        )
        try:
            client = redis.Redis(port=port)
            for _ in range(100):
                try:
                    client.ping()
                    break
                except redis.exceptions.ConnectionError:
                    time.sleep(0.05)
            channels = channels_for("bench", args.players, "p")
            for mode in args.modes.split(","):
                result = measure(mode, port, proc.pid, channels, args.events)
                print(json.dumps(result), flush=True)
                if result["received"] != args.events:
                    status = 1
            if args.history_players > 0:
                memory = history_memory(port, args.history_players, 100, args.data_bytes)
                print(json.dumps(memory), flush=True)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(10)
    return status


if __name__ == "__main__":
    sys.exit(main())
