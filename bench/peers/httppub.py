#!/usr/bin/env python3
"""HTTP publisher for nchan (bench/compare.py): `POST <path><player>` with body `{"t":<ns>}`.

Keep-alive connections, requests pipelined on each. Three modes:

- `--rate R` (> 0): R events/s to random players for D seconds, at most one batch per 1 ms
  tick, spread over the connections; `t` is stamped per message just before its batch is
  written (as in bench/publisher.py), so a late publisher does not inflate the latency.
- `--rate 0`: as fast as nchan answers, to distinct players (a shuffled cycle), with at most
  `--window` requests in flight per connection: a closed loop that runs at nchan's rate.
- `--each K`: K events to every player, in order, then stop (`--ids FILE` writes the message
  id nchan returned for each player's last event: the `Last-Event-ID` to resume from).

nchan answers 201 when the message reached at least one subscriber, 202 when nobody was
subscribed: the 201s are reported as `receivers`, like the PUBLISH replies of publisher.py.

    python bench/peers/httppub.py --port 8081 --players 10000 --rate 5000 --duration 10
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import resource
import sys
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from typing import Any

uvloop: Any
try:
    import uvloop
except ImportError:  # pragma: no cover
    uvloop = None

_ID_MARK = b"last message id: "


@dataclass
class Result:
    started_at: float
    target_rate: float
    duration_s: float
    published: int = 0
    receivers: int = 0  # 201 Created: delivered to >= 1 subscriber
    accepted: int = 0  # 202 Accepted: stored or dropped, nobody subscribed
    errors: int = 0  # any other status, or requests never answered
    errors_by_status: dict[str, int] = field(default_factory=dict)
    elapsed_s: float = 0.0
    achieved_rate: float = 0.0
    pipelines: int = 0
    max_batch: int = 0
    max_lag_ms: float = 0.0
    cpu_s: float = 0.0
    throttled_s: float = 0.0
    max_backlog_bytes: int = 0


class Conn(asyncio.Protocol):
    """One keep-alive connection; parses pipelined responses (Content-Length bodies)."""

    def __init__(self, pub: Publisher) -> None:
        self.pub = pub
        self.buf = b""
        self.transport: asyncio.Transport | None = None
        self.inflight = 0
        self.players: deque[int] = deque()  # only when ids are recorded
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.pub.on_lost(self)

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data if self.buf else data
        pos = 0
        n = len(buf)
        pub = self.pub
        while True:
            hend = buf.find(b"\r\n\r\n", pos)
            if hend < 0:
                break
            cl_at = buf.find(b"Content-Length: ", pos, hend)
            if cl_at >= 0:
                line_end = buf.find(b"\r\n", cl_at, hend + 2)
                clen = int(buf[cl_at + 16 : line_end])
            else:
                clen = 0
            end = hend + 4 + clen
            if end > n:
                break
            self.inflight -= 1
            pub.on_response(self, buf[pos + 9 : pos + 12], buf, hend + 4, end)
            pos = end
        self.buf = buf[pos:]


class Publisher:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.prefixes = [
            (
                f"POST {args.path}{args.prefix}{i} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: "
            ).encode("ascii")
            for i in range(args.players)
        ]
        self.conns: list[Conn] = []
        self.res = Result(started_at=0.0, target_rate=args.rate, duration_s=args.duration)
        self.record_ids = bool(args.ids)
        self.ids: dict[int, str] = {}
        self.order: list[int] = []
        self.cursor = 0
        self.remaining = 0  # --each: requests still to send
        self.refill = False
        self.done = asyncio.Event()

    def request(self, player: int) -> bytes:
        body = b'{"t":%d}' % time.time_ns()
        return b"%s%d\r\n\r\n%s" % (self.prefixes[player], len(body), body)

    def send(self, conn: Conn, players: list[int]) -> None:
        if conn.transport is None or conn.lost or not players:
            return
        conn.transport.write(b"".join([self.request(p) for p in players]))
        conn.inflight += len(players)
        if self.record_ids:
            conn.players.extend(players)
        self.res.published += len(players)
        self.res.pipelines += 1
        self.res.max_batch = max(self.res.max_batch, len(players))

    def next_players(self, n: int) -> list[int]:
        if self.remaining >= 0 and self.args.each:
            n = min(n, self.remaining)
            self.remaining -= n
        out = []
        order = self.order
        for _ in range(n):
            out.append(order[self.cursor])
            self.cursor += 1
            if self.cursor == len(order):
                self.cursor = 0
        return out

    def on_response(self, conn: Conn, status: bytes, buf: bytes, start: int, end: int) -> None:
        res = self.res
        if status == b"201":
            res.receivers += 1
        elif status == b"202":
            res.accepted += 1
        else:
            res.errors += 1
            key = status.decode("ascii", "replace")
            res.errors_by_status[key] = res.errors_by_status.get(key, 0) + 1
        if self.record_ids and conn.players:
            player = conn.players.popleft()
            at = buf.find(_ID_MARK, start, end)
            if at >= 0:
                stop = buf.find(b"\n", at, end)
                self.ids[player] = buf[at + len(_ID_MARK) : stop if stop >= 0 else end].decode()
        if self.refill:
            window = self.args.window
            if conn.inflight <= window // 2:
                self.send(conn, self.next_players(window - conn.inflight))
        if all(c.inflight <= 0 or c.lost for c in self.conns) and (
            not self.refill or (self.args.each and self.remaining <= 0)
        ):
            self.done.set()

    def on_lost(self, conn: Conn) -> None:
        if all(c.lost or c.inflight <= 0 for c in self.conns):
            self.done.set()

    async def connect(self) -> None:
        loop = asyncio.get_running_loop()
        for _ in range(self.args.conns):
            conn = Conn(self)
            await loop.create_connection(lambda c=conn: c, self.args.host, self.args.port)
            self.conns.append(conn)

    async def run(self) -> Result:
        args = self.args
        await self.connect()
        rng = random.Random(args.seed)
        ru0 = resource.getrusage(resource.RUSAGE_SELF)
        self.res.started_at = time.time()
        start = time.perf_counter()
        end = start + args.duration
        if args.each:
            self.order = list(range(args.players))
            self.remaining = args.each * args.players
            self.refill = True
            for conn in self.conns:
                self.send(conn, self.next_players(args.window))
            await self._wait(start + 600.0)
        elif args.rate > 0:
            await self._paced(rng, start, end)
            await self._wait(time.perf_counter() + 30.0)
        else:
            self.order = list(range(args.players))
            rng.shuffle(self.order)
            self.refill = True
            for conn in self.conns:
                self.send(conn, self.next_players(args.window))
            await asyncio.sleep(max(0.0, end - time.perf_counter()))
            self.refill = False
            await self._wait(time.perf_counter() + 30.0)
        self.res.elapsed_s = time.perf_counter() - start
        if not args.rate and not args.each:
            self.res.elapsed_s = min(self.res.elapsed_s, args.duration)
        self.res.achieved_rate = self.res.published / max(self.res.elapsed_s, 1e-9)
        unanswered = sum(max(0, c.inflight) for c in self.conns)
        if unanswered:
            self.res.errors += unanswered
            self.res.errors_by_status["unanswered"] = unanswered
        ru1 = resource.getrusage(resource.RUSAGE_SELF)
        self.res.cpu_s = (ru1.ru_utime + ru1.ru_stime) - (ru0.ru_utime + ru0.ru_stime)
        for conn in self.conns:
            if conn.transport is not None:
                conn.transport.close()
        return self.res

    async def _wait(self, deadline: float) -> None:
        if all(c.inflight <= 0 for c in self.conns) and not (self.args.each and self.remaining):
            return
        self.done.clear()
        if all(c.inflight <= 0 for c in self.conns):
            self.done.set()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.done.wait(), max(0.1, deadline - time.perf_counter()))

    async def _paced(self, rng: random.Random, start: float, end: float) -> None:
        args = self.args
        rate = args.rate
        total = int(rate * args.duration)
        players = args.players
        nconn = len(self.conns)
        k = 0
        while self.res.published < total:
            now = time.perf_counter()
            if now >= end + 1.0:
                break
            due = min(int((now - start) * rate) + 1, total) - self.res.published
            if due <= 0:
                next_at = start + self.res.published / rate
                await asyncio.sleep(max(0.0, min(0.001, next_at - now)))
                continue
            self.res.max_lag_ms = max(
                self.res.max_lag_ms, (now - (start + self.res.published / rate)) * 1000.0
            )
            n = min(due, args.batch)
            per: list[list[int]] = [[] for _ in range(nconn)]
            for _ in range(n):
                per[k % nconn].append(rng.randrange(players))
                k += 1
            for conn, batch in zip(self.conns, per, strict=True):
                self.send(conn, batch)
            await asyncio.sleep(0.001)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--path", default="/pubnb/", help="publisher location, before the player id")
    ap.add_argument("--players", type=int, default=1000)
    ap.add_argument("--prefix", default="p", help="player ids are <prefix><index>")
    ap.add_argument("--rate", type=float, default=1000.0, help="events/s; 0 = closed loop")
    ap.add_argument("--duration", type=float, default=5.0, help="seconds (at most 3600)")
    ap.add_argument("--each", type=int, default=0, help="K events to every player, then stop")
    ap.add_argument("--ids", default="", help="with --each: write {player index: last id} here")
    ap.add_argument("--conns", type=int, default=8, help="keep-alive connections")
    ap.add_argument("--window", type=int, default=256, help="closed loop: in flight per conn")
    ap.add_argument("--batch", type=int, default=1000, help="paced: max requests per tick")
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if not args.host.startswith("127."):
        ap.error("--host must be a loopback address")
    args.duration = max(0.0, min(args.duration, 3600.0))
    pub = Publisher(args)
    res = uvloop.run(pub.run()) if uvloop is not None else asyncio.run(pub.run())
    if args.ids:
        with open(args.ids, "w") as f:
            json.dump(pub.ids, f)
    if args.json:
        print(json.dumps(asdict(res)))
    else:
        print(
            f"published {res.published:,} in {res.elapsed_s:.2f}s = {res.achieved_rate:,.0f}/s; "
            f"201 {res.receivers:,}, 202 {res.accepted:,}, errors {res.errors:,} "
            f"{res.errors_by_status}; max lag {res.max_lag_ms:.1f} ms; CPU {res.cpu_s:.2f}s"
        )
    return 0 if res.published else 1


if __name__ == "__main__":
    sys.exit(main())
