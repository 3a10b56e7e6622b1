#!/usr/bin/env python3
"""Rate-controlled publisher: `{"type":"bench","data":{"t":<time.time_ns()>}}` to
`SSE::<brand>::<player>` for random players, R events/s for D seconds, through redis-py
pipelines (one pipeline per tick). `--rate 0` publishes as fast as it can, cycling over a
shuffled list of players so consecutive events go to distinct players.

The `t` stamp is taken per message just before its pipeline is sent, so a publisher running
late does not inflate the measured latency; the achieved rate and the lag are reported instead.

    python bench/publisher.py --redis redis://127.0.0.1:6390 --players 10000 --rate 5000 \\
        --duration 10
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from urllib.parse import urlsplit

import redis

PUBLISH_LUA = Path(__file__).resolve().parent.parent / "src" / "sse_gateway" / "lua" / "publish.lua"


@dataclass
class PublishResult:
    started_at: float  # time.time() when publishing began
    target_rate: float  # 0: as fast as possible
    duration_s: float
    published: int
    receivers: int  # sum of PUBLISH replies: subscribers that Redis handed the message to
    elapsed_s: float
    achieved_rate: float
    pipelines: int
    max_batch: int
    max_lag_ms: float  # how far the publisher fell behind its schedule at worst
    cpu_s: float
    throttled_s: float = 0.0  # time spent waiting for the subscribers' backlog to shrink
    max_backlog_bytes: int = 0  # largest Pub/Sub output buffer seen in Redis (when watched)


def channels_for(brand: str, players: int, prefix: str) -> list[bytes]:
    return [f"SSE::{brand}::{prefix}{i}".encode("ascii") for i in range(players)]


class Sender:
    """Sends one batch of PUBLISH commands in one write and returns the sum of their replies.

    `pipeline`: redis-py's Pipeline (packs each command itself, ~10 us per command here).
    `packed`: the RESP bytes are formatted here and written on a redis-py Connection, replies
    read by its (hiredis) parser: ~3 us per command, which matters because the publisher shares
    its CPU with the load client and Redis.
    """

    def __init__(self, client: redis.Redis, mode: str) -> None:
        if mode not in ("packed", "pipeline"):
            raise ValueError(f"unknown mode {mode!r}")
        self.client = client
        self.mode = mode
        self.conn = client.connection_pool.get_connection() if mode == "packed" else None

    def send(self, channels: list[bytes]) -> int:
        if self.conn is None:
            pipe = self.client.pipeline(transaction=False)
            for ch in channels:
                pipe.publish(ch, b'{"type":"bench","data":{"t":%d}}' % time.time_ns())
            return sum(pipe.execute())
        parts = []
        for ch in channels:
            msg = b'{"type":"bench","data":{"t":%d}}' % time.time_ns()
            parts.append(
                b"*3\r\n$7\r\nPUBLISH\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n" % (len(ch), ch, len(msg), msg)
            )
        conn = self.conn
        conn.send_packed_command([b"".join(parts)], check_health=False)  # type: ignore[no-untyped-call]
        return sum(int(conn.read_response()) for _ in channels)

    def backlog(self) -> int:
        """Bytes waiting in Redis' output buffers of Pub/Sub subscribers (CLIENT LIST omem)."""
        return sum(int(c.get("omem", 0)) for c in self.client.client_list(_type="pubsub"))

    def close(self) -> None:
        if self.conn is not None:
            self.client.connection_pool.release(self.conn)
            self.conn = None
        self.client.close()


class HistoryPublisher:
    """Publishes the way `sse_gateway.publish.Publisher` does: the shipped `publish.lua`,
    loaded once and called by its SHA, so each event is appended to the player's history
    stream and PUBLISHed with the new entry's id (the SSE `id:`, replayable).

    The EVALSHA commands are formatted here and written in pipelines of `batch`; replies are
    read by redis-py's (hiredis) parser.
    """

    def __init__(
        self,
        redis_url: str,
        *,
        script: Path = PUBLISH_LUA,
        history_size: int = 100,
        history_ttl: int = 86_400,
        batch: int = 1000,
    ) -> None:
        host = urlsplit(redis_url).hostname or ""
        if not host.startswith("127.") and host != "localhost":
            raise ValueError("the benchmark publisher only talks to a loopback Redis")
        self.client = redis.Redis.from_url(redis_url, socket_timeout=60)
        self.sha = str(self.client.script_load(script.read_text())).encode("ascii")
        self.tail = b"$%d\r\n%d\r\n$%d\r\n%d\r\n" % (
            len(str(history_size)),
            history_size,
            len(str(history_ttl)),
            history_ttl,
        )
        self.batch = max(1, batch)
        self.conn = self.client.connection_pool.get_connection()

    def publish(
        self, channels: list[bytes], event_type: bytes, data: list[bytes]
    ) -> tuple[list[str], int]:
        """One event per channel (`data[k]` for `channels[k]`, JSON text), pipelined.
        Returns the new ids, in order, and the sum of receivers (gateway processes)."""
        ids: list[str] = []
        receivers = 0
        head = b"*8\r\n$7\r\nEVALSHA\r\n$%d\r\n%s\r\n$1\r\n1\r\n" % (len(self.sha), self.sha)
        typ = b"$%d\r\n%s\r\n" % (len(event_type), event_type)
        conn = self.conn
        for start in range(0, len(channels), self.batch):
            parts = [
                b"%s$%d\r\n%s\r\n%s$%d\r\n%s\r\n%s" % (head, len(ch), ch, typ, len(d), d, self.tail)
                for ch, d in zip(
                    channels[start : start + self.batch],
                    data[start : start + self.batch],
                    strict=True,
                )
            ]
            conn.send_packed_command([b"".join(parts)], check_health=False)  # type: ignore[no-untyped-call]
            for _ in parts:
                reply = conn.read_response()
                if not isinstance(reply, list) or len(reply) != 2:
                    raise RuntimeError(f"unexpected reply to EVALSHA publish.lua: {reply!r}")
                ids.append(reply[0].decode("ascii"))
                receivers += int(reply[1])
        return ids, receivers

    def close(self) -> None:
        self.client.connection_pool.release(self.conn)
        self.client.close()


def publish(
    redis_url: str,
    *,
    brand: str = "bench",
    players: int = 1000,
    player_prefix: str = "p",
    rate: float = 1000.0,
    duration: float = 5.0,
    max_batch: int = 1000,
    tick: float = 0.001,
    seed: int | None = None,
    mode: str = "packed",
    max_backlog: int = 0,
) -> PublishResult:
    """Publishes for `duration` seconds (bounded) and reports what it achieved.

    `max_backlog` (bytes, as-fast-as-possible mode only): before each batch, wait while Redis
    holds more than this for its Pub/Sub subscribers. The publisher then runs at the rate the
    subscriber (the gateway) consumes, instead of outrunning it until Redis drops it for
    exceeding `client-output-buffer-limit pubsub` (32 MB by default) and losing the backlog.
    """
    host = urlsplit(redis_url).hostname or ""
    if not host.startswith("127.") and host != "localhost":
        raise ValueError("the benchmark publisher only talks to a loopback Redis")
    duration = max(0.0, min(duration, 3600.0))
    rng = random.Random(seed)
    channels = channels_for(brand, players, player_prefix)
    client = redis.Redis.from_url(redis_url, socket_timeout=30)
    client.ping()
    sender = Sender(client, mode)
    published = receivers = pipelines = biggest = seen_backlog = 0
    max_lag = throttled = 0.0
    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    started_at = time.time()
    start = time.perf_counter()
    end = start + duration
    try:
        if rate > 0:
            total = int(rate * duration)
            next_tick = start
            while published < total:
                now = time.perf_counter()
                if now >= end + 1.0:  # hopelessly behind: stop on time, report the rate
                    break
                due = min(int((now - start) * rate) + 1, total) - published
                if due <= 0 or now < next_tick:
                    next_at = max(start + published / rate, next_tick)
                    time.sleep(max(0.0, min(tick, next_at - now)))
                    continue
                next_tick = now + tick  # at most one batch per tick
                max_lag = max(max_lag, (now - (start + published / rate)) * 1000.0)
                n = min(due, max_batch)
                receivers += sender.send([channels[rng.randrange(players)] for _ in range(n)])
                published += n
                pipelines += 1
                biggest = max(biggest, n)
        else:
            order = [channels[i] for i in range(players)]
            rng.shuffle(order)
            while len(order) < max_batch:
                order += order[:max_batch]
            cursor = 0
            while time.perf_counter() < end:
                if max_backlog:
                    waited_from = time.perf_counter()
                    while (backlog := sender.backlog()) > max_backlog:
                        seen_backlog = max(seen_backlog, backlog)
                        if time.perf_counter() >= end:
                            break
                        time.sleep(0.0005)
                    seen_backlog = max(seen_backlog, backlog)
                    throttled += time.perf_counter() - waited_from
                    if time.perf_counter() >= end:
                        break
                batch = order[cursor : cursor + max_batch]
                if len(batch) < max_batch:
                    batch += order[: max_batch - len(batch)]
                cursor = (cursor + max_batch) % len(order)
                receivers += sender.send(batch)
                published += max_batch
                pipelines += 1
                biggest = max_batch
    finally:
        sender.close()
    elapsed = time.perf_counter() - start
    ru1 = resource.getrusage(resource.RUSAGE_SELF)
    return PublishResult(
        started_at=started_at,
        target_rate=rate,
        duration_s=duration,
        published=published,
        receivers=receivers,
        elapsed_s=elapsed,
        achieved_rate=published / elapsed if elapsed > 0 else 0.0,
        pipelines=pipelines,
        max_batch=biggest,
        max_lag_ms=max(0.0, max_lag),
        cpu_s=(ru1.ru_utime + ru1.ru_stime) - (ru0.ru_utime + ru0.ru_stime),
        throttled_s=throttled,
        max_backlog_bytes=seen_backlog,
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--redis", required=True, help="redis://127.0.0.1:<port>")
    ap.add_argument("--brand", default="bench")
    ap.add_argument("--players", type=int, default=1000)
    ap.add_argument("--player-prefix", default="p")
    ap.add_argument("--rate", type=float, default=1000.0, help="events/s; 0 = as fast as possible")
    ap.add_argument("--duration", type=float, default=5.0, help="seconds (at most 3600)")
    ap.add_argument("--batch", type=int, default=1000, help="max PUBLISH per pipeline")
    ap.add_argument(
        "--max-backlog",
        type=int,
        default=0,
        help="with --rate 0: pause while Redis buffers more than this many bytes for\n"
        "Pub/Sub subscribers (0: never pause)",
    )
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument(
        "--mode",
        choices=("packed", "pipeline"),
        default="packed",
        help="packed: RESP formatted here, sent on a redis-py connection (default);\n"
        "pipeline: redis-py Pipeline.publish (2.5-4x the CPU per event)",
    )
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args(argv)
    result = publish(
        args.redis,
        brand=args.brand,
        players=args.players,
        player_prefix=args.player_prefix,
        rate=args.rate,
        duration=args.duration,
        max_batch=max(1, args.batch),
        seed=args.seed,
        mode=args.mode,
        max_backlog=max(0, args.max_backlog),
    )
    if args.json:
        print(json.dumps(asdict(result)))
    else:
        target = f"{result.target_rate:,.0f}/s" if result.target_rate else "max"
        print(
            f"published {result.published:,} in {result.elapsed_s:.2f}s "
            f"= {result.achieved_rate:,.0f}/s (target {target}); receivers {result.receivers:,}; "
            f"{result.pipelines:,} pipelines (max {result.max_batch}); "
            f"max lag {result.max_lag_ms:.1f} ms; CPU {result.cpu_s:.2f}s; "
            f"throttled {result.throttled_s:.2f}s (max backlog {result.max_backlog_bytes:,} B)"
        )
    return 0 if result.published else 1


if __name__ == "__main__":
    sys.exit(main())
