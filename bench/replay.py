#!/usr/bin/env python3
"""Replay storm: N clients reconnect at once with `Last-Event-ID`, each having missed K events.

1. N streams (players `r0`..`r<N-1>` of brand `bench`) connect without `Last-Event-ID`.
2. One event per player is published through the shipped `publish.lua` (EVALSHA, pipelined),
   so it gets a real history id; each stream records the `id:` it receives.
3. Every stream disconnects; the scenario waits until the gateway has none left.
4. K more events per player are published the same way (K rounds over all players).
5. All N streams reconnect at once, each with `Last-Event-ID: <the id it saw>`.

Measured: the time from the first reconnect attempt until every stream has read `connected`
with `"recovered": true` and then all K missed events; connections/s of the storm; per stream,
the ids and their order against what was published (lost, duplicated, out of order, unexpected
must all be 0); Redis' slowest command in the storm (`SLOWLOG` with
`slowlog-log-slower-than 0`, read in full) and `INFO commandstats`; the round trip of a `PING`
sent to Redis every 10 ms during the storm; gateway and load-client CPU.

Run by `bench/run.py` (scenario (e)), or on its own against a running gateway and its Redis:

    python bench/replay.py --port 8080 --redis redis://127.0.0.1:6379 --jwt-secret S \\
        --clients 10000 [--gateway-pid PID]

The standalone run changes Redis' slowlog settings for the storm (restored after) and resets
its `INFO` statistics (`CONFIG RESETSTAT`): use a Redis that serves nothing else.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import re
import socket
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import jwt
import redis
from loadclient import ClientConfig, LoadClient, ReplayStreams, percentiles
from publisher import HistoryPublisher

BENCH_CLIENT_NAME = "sse-bench"  # CLIENT SETNAME of the bench's own Redis connections
SLOWLOG_MAX_LEN = 1_000_000  # entries kept during the storm: every command of the window
REDIS_BLOCK_LIMIT_US = 10_000  # one command longer than this is reported as a problem


class Sampler(Protocol):
    def sample(self) -> None: ...

    def window(self, t0: float, t1: float) -> Any: ...


@dataclass
class SlowCommand:
    duration_us: int
    command: str  # the command and its first arguments, as SLOWLOG keeps them
    client: str  # address and name of the client that sent it


@dataclass
class ReplayResult:
    clients: int
    missed: int  # events each client missed
    processes: int
    concurrency: int  # storm: connection attempts in flight per process (0: all at once)
    # setup
    first_connected: int = 0
    first_connect_s: float = 0.0
    first_publish_s: float = 0.0
    first_received_ok: int = 0  # streams that received exactly their published event
    missed_published: int = 0
    missed_publish_s: float = 0.0
    missed_receivers: int = 0  # PUBLISH receivers while nobody was connected (expected 0)
    gateway_idle_s: float = -1.0  # until the gateway had no stream and no channel left
    redis_unsubscribed_s: float = -1.0  # ... and Redis had no subscription to them left
    # the storm
    storm: dict[str, Any] = field(default_factory=dict)  # loadclient.ReplayConnectReport
    recovered: int = 0
    not_recovered: int = 0
    no_stream: int = 0  # players whose reconnect never read `connected`
    complete: int = 0  # streams that received exactly their K ids, in order
    lost: int = 0  # published ids a stream did not receive
    duplicated: int = 0  # ids received twice, or the id the stream already had
    out_of_order: int = 0  # streams with the right ids in the wrong order
    unexpected: int = 0  # ids that were not published for that player
    early: int = 0  # events before `connected`
    dropped: int = 0  # streams closed by the gateway
    event_types: dict[str, int] = field(default_factory=dict)
    # a stream outside the storm, fed a live event every 20 ms during it
    bystander: dict[str, float] = field(default_factory=dict)
    # gateway side, cumulative at the end of each storm tick: (streams accepted, replayed)
    gateway_per_tick: list[tuple[int, int]] = field(default_factory=list)
    # resources in the storm window (first attempt -> last stream caught up)
    gateway_cpu_pct: float = math.nan
    redis_cpu_pct: float = math.nan
    cores_pct: list[float] = field(default_factory=list)
    irq_pct: list[float] = field(default_factory=list)
    client_cpu_pct: float = math.nan  # all client processes together, % of one core
    others_pct: float = math.nan  # CPU of processes not ours (other jobs, kernel threads)
    steal_pct: list[float] = field(default_factory=list)  # taken by the hypervisor, per vCPU
    listen_overflows: int = -1  # TcpExt ListenOverflows in the storm (accept queue full)
    redis_ping_ms: dict[str, float] = field(default_factory=dict)
    # Redis' main thread in the storm: time it waited for a CPU while runnable, and how often
    # it was preempted. SLOWLOG times are wall-clock, so a preemption inside a command shows
    # up as a slow command.
    redis_runqueue_wait_ms: float = math.nan
    redis_preemptions: int = -1
    slowlog_entries: int = 0
    slowlog_complete: bool = True
    slowest: list[SlowCommand] = field(default_factory=list)  # gateway commands, slowest first
    slowlog_by_command: dict[str, dict[str, float]] = field(default_factory=dict)
    commandstats: dict[str, dict[str, float]] = field(default_factory=dict)
    gateway_metrics: dict[str, int] = field(default_factory=dict)
    # the same storm without Last-Event-ID (no replay), after the check: what replay adds
    baseline: dict[str, Any] = field(default_factory=dict)
    baseline_gateway_cpu_pct: float = math.nan
    baseline_bystander: dict[str, float] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    fatal: bool = False  # an event was lost / duplicated / not recovered, or a stream missing


# --------------------------------------------------------------------------- helpers


def _gateway_metrics(port: int) -> dict[str, float]:
    try:
        url = f"http://127.0.0.1:{port}/metrics"
        with urllib.request.urlopen(url, timeout=5.0) as r:
            body = r.read().decode("utf-8", "replace")
    except (OSError, urllib.error.URLError):
        return {}
    out: dict[str, float] = {}
    for line in body.splitlines():
        m = re.match(r"^([a-zA-Z_:][a-zA-Z0-9_:]*(?:\{[^}]*\})?)\s+(\S+)$", line)
        if m:
            try:
                out[m.group(1)] = float(m.group(2))
            except ValueError:
                continue
    return out


def _wait_gateway_idle(port: int, limit: float) -> float:
    """Seconds until the gateway reports no stream and no subscribed channel (-1: never)."""
    started = time.monotonic()
    while time.monotonic() - started < limit:
        m = _gateway_metrics(port)
        streams = sum(v for k, v in m.items() if k.startswith("sse_gateway_connections{"))
        if m and streams == 0 and m.get("sse_gateway_broker_subscribed_channels", 1) == 0:
            return time.monotonic() - started
        time.sleep(0.05)
    return -1.0


def _sched(pid: int) -> tuple[float, int]:
    """(ms spent runnable but waiting for a CPU, involuntary context switches) of a process's
    main thread, or (nan, -1) when /proc does not have it (another host, another namespace)."""
    try:
        with open(f"/proc/{pid}/schedstat") as f:
            wait_ns = int(f.read().split()[1])
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("nonvoluntary_ctxt_switches:"):
                    return wait_ns / 1e6, int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return math.nan, -1


def _wait_unsubscribed(admin: redis.Redis, pattern: str, limit: float) -> float:
    """Seconds until Redis has no subscriber on channels matching `pattern` (-1: never)."""
    started = time.monotonic()
    while time.monotonic() - started < limit:
        if not admin.pubsub_channels(pattern):
            return time.monotonic() - started
        time.sleep(0.02)
    return -1.0


def _listen_overflows() -> int:
    """TcpExt ListenOverflows (SYNs/ACKs dropped because an accept queue was full), or -1."""
    try:
        with open("/proc/net/netstat") as f:
            lines = f.read().splitlines()
    except OSError:
        return -1
    for names, values in zip(lines[::2], lines[1::2], strict=False):
        if names.startswith("TcpExt:"):
            table = dict(zip(names.split()[1:], values.split()[1:], strict=False))
            return int(table.get("ListenOverflows", -1))
    return -1


class Watcher:
    """A thread for the storm: PINGs Redis every 10 ms on its own connection (round trip =
    how long Redis kept another client waiting, plus scheduling on the shared core) and
    samples CPU every 0.1 s. Bounded by `limit` seconds."""

    def __init__(self, redis_url: str, sampler: Sampler | None, limit: float) -> None:
        self.client = redis.Redis.from_url(redis_url, socket_timeout=10)
        self.client.client_setname(BENCH_CLIENT_NAME)
        self.sampler = sampler
        self.limit = limit
        self.ping_ns: list[int] = []
        self.errors = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        deadline = time.monotonic() + self.limit
        next_sample = 0.0
        while not self._stop.is_set() and time.monotonic() < deadline:
            started = time.perf_counter_ns()
            try:
                self.client.ping()
                self.ping_ns.append(time.perf_counter_ns() - started)
            except redis.exceptions.RedisError:
                self.errors += 1
            if self.sampler is not None and time.monotonic() >= next_sample:
                self.sampler.sample()
                next_sample = time.monotonic() + 0.1
            self._stop.wait(0.01)

    def __enter__(self) -> Watcher:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(15.0)
        self.client.close()


class GatewayPoller:
    """A thread that reads the gateway's /metrics every 0.25 s during the storm: how many
    streams it had accepted and how many events it had replayed at each moment, from the
    gateway's side (a slow answer is itself a sign of a busy event loop)."""

    def __init__(self, port: int, limit: float) -> None:
        self.port = port
        self.limit = limit
        self.samples: list[tuple[float, float, float]] = []  # (time, accepted, replayed)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        deadline = time.monotonic() + self.limit
        while not self._stop.is_set() and time.monotonic() < deadline:
            m = _gateway_metrics(self.port)
            if m:
                self.samples.append(
                    (
                        time.time(),
                        m.get("sse_gateway_connections_opened_total", math.nan),
                        m.get("sse_gateway_events_replayed_total", math.nan),
                    )
                )
            self._stop.wait(0.25)

    def per_tick(self, start: float, ticks: int, tick: float) -> list[tuple[int, int]]:
        """(streams accepted, events replayed) since `start`, at the end of each tick."""
        base = [s for s in self.samples if s[0] <= start]
        if not base:
            return []
        _, a0, r0 = base[-1]
        out: list[tuple[int, int]] = []
        for k in range(ticks):
            upto = [s for s in self.samples if s[0] <= start + (k + 1) * tick]
            _, a, r = upto[-1]
            out.append((int(a - a0), int(r - r0)))
        return out

    def __enter__(self) -> GatewayPoller:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(15.0)


class Bystander:
    """One stream outside the storm (player `bystander`, connected before it), fed a live
    event every 20 ms by a plain PUBLISH: its largest publish->receive delay and the longest
    pause between two of its events show whether the storm holds up the gateway's other
    clients. Two threads, both bounded by `limit` seconds."""

    PERIOD = 0.02

    def __init__(
        self, port: int, jwt_secret: str, brand: str, redis_url: str, limit: float
    ) -> None:
        self.limit = limit
        self.channel = f"SSE::{brand}::bystander"
        claims = {"brand_id": brand, "sub": "bystander", "exp": int(time.time()) + 3600}
        token = jwt.encode(claims, jwt_secret, algorithm="HS256")
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10.0)
        self.sock.sendall(
            (
                f"GET /v1/sse HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                f"Authorization: Bearer {token}\r\nAccept: text/event-stream\r\n\r\n"
            ).encode("ascii")
        )
        self.buf = b""
        deadline = time.monotonic() + 10.0
        while b"event: connected" not in self.buf:
            if time.monotonic() > deadline:
                raise RuntimeError("the bystander stream did not get `connected`")
            chunk = self.sock.recv(65536)
            if not chunk:
                raise RuntimeError(f"the bystander stream was refused: {self.buf[:200]!r}")
            self.buf += chunk
        self.buf = self.buf[self.buf.rfind(b"\n\n") + 2 :]
        self.sock.settimeout(0.5)
        self.pub = redis.Redis.from_url(redis_url, socket_timeout=10)
        self.pub.client_setname(BENCH_CLIENT_NAME)
        self.sent = 0
        self.latency_ns: list[int] = []
        self.arrivals: list[float] = []  # time.time() of each event
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._publish, daemon=True),
            threading.Thread(target=self._read, daemon=True),
        ]

    def _publish(self) -> None:
        deadline = time.monotonic() + self.limit
        while not self._stop.is_set() and time.monotonic() < deadline:
            envelope = b'{"type":"bystander","data":{"t":%d}}' % time.time_ns()
            with contextlib.suppress(redis.exceptions.RedisError):
                self.pub.publish(self.channel, envelope)
                self.sent += 1
            self._stop.wait(self.PERIOD)

    def _read(self) -> None:
        deadline = time.monotonic() + self.limit + 5.0
        mark = b'data: {"t":'
        while time.monotonic() < deadline:
            if self._stop.is_set() and len(self.latency_ns) >= self.sent:
                return
            try:
                chunk = self.sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            if not chunk:
                return
            now_ns = time.time_ns()
            now = now_ns / 1e9
            self.buf += chunk
            end = self.buf.rfind(b"\n\n")
            if end < 0:
                continue
            frames, self.buf = self.buf[:end], self.buf[end + 2 :]
            pos = frames.find(mark)
            while pos >= 0:
                stop = frames.find(b"}", pos)
                with contextlib.suppress(ValueError):
                    self.latency_ns.append(now_ns - int(frames[pos + len(mark) : stop]))
                    self.arrivals.append(now)
                pos = frames.find(mark, stop)

    def summary(self, start: float) -> dict[str, float]:
        """Delays and the longest pause; `max_gap_at_s`: when that pause began, in seconds
        after `start` (time.time() of the storm's first attempt)."""
        out: dict[str, float] = {"sent": self.sent, "received": len(self.latency_ns)}
        if self.latency_ns:
            lat = sorted(self.latency_ns)
            out["p50_ms"] = lat[len(lat) // 2] / 1e6
            out["p99_ms"] = lat[min(len(lat) - 1, int(len(lat) * 0.99))] / 1e6
            out["max_ms"] = lat[-1] / 1e6
        gaps = [(b - a, a) for a, b in zip(self.arrivals, self.arrivals[1:], strict=False)]
        if gaps:
            gap, at = max(gaps)
            out["max_gap_ms"] = gap * 1000.0
            out["max_gap_at_s"] = at - start
        return out

    def __enter__(self) -> Bystander:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._threads[0].join(15.0)
        self._threads[1].join(10.0)
        self.sock.close()
        self.pub.close()


class SlowlogWindow:
    """Every command Redis runs between `start()` and `collect()`: slowlog-log-slower-than 0,
    a slowlog long enough to keep them all, and INFO commandstats from a CONFIG RESETSTAT."""

    def __init__(self, admin: redis.Redis) -> None:
        self.admin = admin
        self.saved: dict[str, str] = {}

    def start(self) -> None:
        got = self.admin.config_get("slowlog-*")
        self.saved = {str(k): str(v) for k, v in got.items()}
        self.admin.config_set("slowlog-max-len", SLOWLOG_MAX_LEN)
        self.admin.config_set("slowlog-log-slower-than", 0)
        self.admin.slowlog_reset()
        self.admin.config_resetstat()

    def collect(self, res: ReplayResult) -> None:
        entries: list[dict[str, Any]] = self.admin.slowlog_get(-1)
        stats: dict[str, Any] = self.admin.info("commandstats")
        self.restore()
        res.slowlog_entries = len(entries)
        res.slowlog_complete = len(entries) < SLOWLOG_MAX_LEN
        ours = [e for e in entries if _text(e.get("client_name")) != BENCH_CLIENT_NAME]
        ours.sort(key=lambda e: int(e["duration"]), reverse=True)
        res.slowest = [
            SlowCommand(
                duration_us=int(e["duration"]),
                command=_short(_text(e.get("command"))),
                client=f"{_text(e.get('client_address'))} {_text(e.get('client_name'))}".strip(),
            )
            for e in ours[:5]
        ]
        by_cmd: dict[str, dict[str, float]] = {}
        for e in ours:
            name = _text(e.get("command")).split(" ", 1)[0].upper() or "?"
            d = by_cmd.setdefault(name, {"count": 0, "total_us": 0, "max_us": 0})
            d["count"] += 1
            d["total_us"] += int(e["duration"])
            d["max_us"] = max(d["max_us"], int(e["duration"]))
        res.slowlog_by_command = by_cmd
        res.commandstats = {
            k.removeprefix("cmdstat_"): {
                "calls": float(v.get("calls", 0)),
                "usec": float(v.get("usec", 0)),
                "usec_per_call": float(v.get("usec_per_call", 0)),
            }
            for k, v in stats.items()
            if isinstance(v, dict)
        }

    def restore(self) -> None:
        """Puts the slowlog settings back (once; also after a failed run)."""
        saved, self.saved = self.saved, {}
        for key in ("slowlog-log-slower-than", "slowlog-max-len"):
            if key in saved:
                self.admin.config_set(key, saved[key])
        if saved:
            self.admin.slowlog_reset()


def _short(command: str, limit: int = 90) -> str:
    """A SLOWLOG command line cut to about `limit` characters, with its argument count. (SLOWLOG
    itself keeps 31 arguments and then `... (N more arguments)`.)"""
    more = re.search(r" \.\.\. \((\d+) more arguments\)$", command)
    words = command[: more.start()].split(" ") if more else command.split(" ")
    args = len(words) - 1 + (int(more.group(1)) if more else 0)
    if len(command) <= limit and not more:
        return command
    out = words[0]
    for word in words[1:]:
        if len(out) + len(word) + 1 > limit:
            break
        out = f"{out} {word}"
    return f"{out} … ({args:,} args)"


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, list | tuple):
        return " ".join(_text(v) for v in value)
    return "" if value is None else str(value)


def _wait_received(lc: LoadClient, want: int, limit: float) -> int:
    """Polls until `want` streams have an event, none arrived for 2 s, or `limit` s."""
    started = last_change = time.monotonic()
    last = -1
    while time.monotonic() - started < limit:
        _, have = lc.replay_count(1)
        if have >= want:
            return have
        if have != last:
            last, last_change = have, time.monotonic()
        elif time.monotonic() - last_change > 2.0:
            break
        time.sleep(0.05)
    return max(last, 0)


def verify(
    res: ReplayResult, streams: ReplayStreams, expected: list[list[str]], before: list[str]
) -> None:
    """Compares what each stream received with the ids published for its player."""
    types: Counter[str] = Counter()
    for i, want in enumerate(expected):
        got_entry = streams.clients.get(i)
        if got_entry is None:
            res.no_stream += 1
            res.lost += len(want)
            continue
        recovered, got, early, ev_types = got_entry
        types.update(ev_types)
        res.early += early
        if recovered is True:
            res.recovered += 1
        else:
            res.not_recovered += 1
        want_set = set(want)
        got_set = set(got)
        res.lost += len(want_set - got_set)
        res.duplicated += len(got) - len(got_set) + (1 if before[i] in got_set else 0)
        res.unexpected += len(got_set - want_set - {before[i]})
        if got == want:
            res.complete += 1
        elif got_set == want_set and len(got) == len(want):
            res.out_of_order += 1
    res.event_types = dict(types)
    res.dropped = streams.dropped


def judge(res: ReplayResult) -> None:
    """Fills `problems`; `fatal` when any replayed event was lost, doubled or unrecovered."""
    p = res.problems
    storm = res.storm
    if res.first_received_ok < res.clients:
        p.append(
            f"replay setup: only {res.first_received_ok:,} of {res.clients:,} streams received "
            f"their first event with the published id"
        )
        res.fatal = True
    for name, n in (
        ("streams did not reconnect", res.no_stream),
        ("streams got `connected` without `recovered: true`", res.not_recovered),
        ("missed events were lost", res.lost),
        ("events were delivered twice (or the client's own last id again)", res.duplicated),
        ("streams got their events out of order", res.out_of_order),
        ("events were not published for that player", res.unexpected),
        ("events came before `connected`", res.early),
        ("streams were closed by the gateway", res.dropped),
    ):
        if n:
            p.append(f"replay storm: {n:,} {name}")
            res.fatal = True
    if storm.get("stalled"):
        p.append(
            f"replay storm: {storm['stalled']:,} streams connected but did not get all their "
            f"events in time"
        )
        res.fatal = True
    if res.complete < res.clients:
        res.fatal = True
        if not p:
            p.append(f"replay storm: only {res.complete:,} of {res.clients:,} streams complete")
    if storm.get("failed_attempts"):
        p.append(f"replay storm: failed connection attempts {storm['failed_attempts']}")
    if res.gateway_idle_s < 0:
        p.append("replay setup: the gateway still reported streams or channels after closing")
    if res.redis_unsubscribed_s < 0:
        p.append("replay setup: Redis still had subscriptions 15 s after every client closed")
    if res.missed_receivers:
        p.append(
            f"replay setup: {res.missed_receivers:,} of the missed events still reached a "
            f"gateway subscription after Redis showed none"
        )
    if res.slowest and res.slowest[0].duration_us > REDIS_BLOCK_LIMIT_US:
        s = res.slowest[0]
        p.append(
            f"replay storm: one Redis command ran {s.duration_us / 1000:.1f} ms "
            f"(> {REDIS_BLOCK_LIMIT_US / 1000:g} ms): {s.command}"
        )
    by = res.bystander
    if by and by.get("received", 0) < by.get("sent", 0):
        p.append(
            f"replay storm: the bystander stream received {int(by['received']):,} of "
            f"{int(by['sent']):,} live events"
        )
    if by.get("max_ms", 0.0) > 1000.0:
        p.append(
            f"replay storm: a live event to a client outside the storm took "
            f"{by['max_ms'] / 1000:.1f} s (the storm held up the gateway's other clients)"
        )
    if res.others_pct > 15.0:
        p.append(
            f"replay storm: other processes used {res.others_pct:.0f}% of a core during the "
            f"storm: its figures are disturbed"
        )
    if not res.slowlog_complete:
        p.append("replay storm: the slowlog filled up; the slowest command may be missing")


# --------------------------------------------------------------------------- scenario


def run_replay(
    *,
    redis_url: str,
    port: int,
    jwt_secret: str,
    clients: int,
    missed: int = 10,
    processes: int = 0,
    concurrency: int = 0,
    load_cpus: tuple[int, ...] = (),
    sampler: Sampler | None = None,
    catchup_timeout: float = 30.0,
    max_seconds: float = 600.0,
    baseline: bool = True,
    brand: str = "bench",
    player_prefix: str = "r",
    log: Callable[[str], None] = print,
) -> ReplayResult:
    """The whole scenario, on its own players; every step is bounded in time. `baseline`: then
    the same storm once more without Last-Event-ID, to show what the replay adds."""
    processes = processes or max(2, math.ceil(clients / 2500))
    res = ReplayResult(clients=clients, missed=missed, processes=processes, concurrency=concurrency)
    conf = ClientConfig(
        port=port,
        brand=brand,
        players=clients,
        player_prefix=player_prefix,
        processes=processes,
        jwt_secret=jwt_secret,
        concurrency=100,
        max_seconds=max_seconds + 30.0,
        cpus=load_cpus,
    )
    channels = [f"SSE::{brand}::{player_prefix}{i}".encode("ascii") for i in range(clients)]
    admin = redis.Redis.from_url(redis_url, socket_timeout=60)
    admin.client_setname(BENCH_CLIENT_NAME)
    publisher = HistoryPublisher(redis_url)
    publisher.client.client_setname(BENCH_CLIENT_NAME)
    slowlog = SlowlogWindow(admin)
    try:
        with LoadClient(conf) as lc:
            lc.start()
            log(f"replay storm: {clients:,} streams connect without Last-Event-ID ...")
            first = lc.replay_connect(expect=0, resume=False, concurrency=100)
            res.first_connected = first.connected
            res.first_connect_s = first.connect_s

            t0 = time.perf_counter()
            before, _ = publisher.publish(
                channels, b"replay", [b'{"n":0,"p":%d}' % i for i in range(clients)]
            )
            res.first_publish_s = time.perf_counter() - t0
            _wait_received(lc, first.connected, 30.0)
            s1 = lc.replay_close()
            res.first_received_ok = sum(
                1 for i, (_, ids, _, _) in s1.clients.items() if ids == [before[i]]
            )
            res.gateway_idle_s = _wait_gateway_idle(port, 15.0)
            pattern = f"SSE::{brand}::{player_prefix}*"
            res.redis_unsubscribed_s = _wait_unsubscribed(admin, pattern, 15.0)

            expected: list[list[str]] = [[] for _ in range(clients)]
            t0 = time.perf_counter()
            for k in range(1, missed + 1):
                ids, receivers = publisher.publish(
                    channels, b"replay", [b'{"n":%d,"p":%d}' % (k, i) for i in range(clients)]
                )
                for i, event_id in enumerate(ids):
                    expected[i].append(event_id)
                res.missed_receivers += receivers
            res.missed_publish_s = time.perf_counter() - t0
            res.missed_published = clients * missed
            log(
                f"  published {clients:,} + {res.missed_published:,} history events "
                f"({res.missed_published / max(res.missed_publish_s, 1e-9):,.0f}/s); "
                f"{clients:,} streams reconnect at once with Last-Event-ID ..."
            )

            m0 = _gateway_metrics(port)
            overflows0 = _listen_overflows()
            redis_pid = int(admin.info("server").get("process_id", 0))
            sched0 = _sched(redis_pid)
            slowlog.start()
            if sampler is not None:
                sampler.sample()
            limit = catchup_timeout + 120.0
            bystander = Bystander(port, jwt_secret, brand, redis_url, limit)
            with (
                Watcher(redis_url, sampler, limit) as watch,
                GatewayPoller(port, limit) as poll,
                bystander,
            ):
                time.sleep(0.3)  # a first /metrics sample and bystander events before the storm
                storm = lc.replay_connect(
                    expect=missed,
                    resume=True,
                    concurrency=concurrency,
                    catchup_timeout=catchup_timeout,
                )
            res.bystander = bystander.summary(storm.start)
            sched1 = _sched(redis_pid)
            slowlog.collect(res)
            overflows1 = _listen_overflows()
            if sched0[1] >= 0 and sched1[1] >= 0:
                res.redis_runqueue_wait_ms = sched1[0] - sched0[0]
                res.redis_preemptions = sched1[1] - sched0[1]
            m1 = _gateway_metrics(port)
            res.storm = asdict(storm)
            res.gateway_per_tick = poll.per_tick(
                storm.start, len(storm.connected_per_tick), storm.tick_s
            )
            end = storm.start + (storm.catch_up_s or storm.connect_s)
            span = end - storm.start
            if span > 0:
                res.client_cpu_pct = 100.0 * sum(storm.client_cpu_s) / span
            if sampler is not None:
                sampler.sample()
                w = sampler.window(storm.start, end)
                res.gateway_cpu_pct = w.gateway
                res.redis_cpu_pct = w.redis
                res.cores_pct = list(w.cores)
                res.irq_pct = list(w.softirq)
                res.steal_pct = list(w.steal)
                if span > 0:
                    res.others_pct = w.others(res.client_cpu_pct)
            if overflows0 >= 0 and overflows1 >= 0:
                res.listen_overflows = overflows1 - overflows0
            res.redis_ping_ms = percentiles(list(watch.ping_ns))
            res.gateway_metrics = {
                k: int(m1[k] - m0.get(k, 0.0))
                for k in m1
                if k.startswith(
                    (
                        "sse_gateway_replays_total",
                        "sse_gateway_events_replayed_total",
                        "sse_gateway_events_delivered_total",
                        "sse_gateway_connections_rejected_total",
                        "sse_gateway_connections_closed_total",
                    )
                )
                and m1[k] != m0.get(k, 0.0)
            }
            time.sleep(0.5)  # late duplicates would arrive here
            verify(res, lc.replay_close(), expected, before)
            log(
                f"  caught up {res.complete:,}/{clients:,} in {storm.catch_up_s:.2f} s; "
                f"lost {res.lost}, duplicated {res.duplicated}"
            )
            if baseline:
                _wait_gateway_idle(port, 15.0)
                _wait_unsubscribed(admin, pattern, 15.0)
                if sampler is not None:
                    sampler.sample()
                bystander = Bystander(port, jwt_secret, brand, redis_url, limit)
                with Watcher(redis_url, sampler, limit), bystander:
                    time.sleep(0.3)
                    base = lc.replay_connect(
                        expect=0, resume=False, concurrency=concurrency, catchup_timeout=10.0
                    )
                res.baseline = asdict(base)
                res.baseline_bystander = bystander.summary(base.start)
                if sampler is not None:
                    sampler.sample()
                    w = sampler.window(base.start, base.start + base.connect_s)
                    res.baseline_gateway_cpu_pct = w.gateway
                lc.replay_close()
                log(
                    f"  the same storm without Last-Event-ID: {base.connected:,} in "
                    f"{base.connect_s:.2f} s"
                )
    finally:
        with contextlib.suppress(redis.exceptions.RedisError):  # Redis gone: nothing to restore
            slowlog.restore()
        publisher.close()
        admin.close()
    judge(res)
    return res


# --------------------------------------------------------------------------- report


def _ms(v: float | None) -> str:
    if v is None or math.isnan(v):
        return "-"
    return f"{v:.2f}" if v < 100 else f"{v:,.0f}"


def _pct(v: float) -> str:
    return "-" if math.isnan(v) else f"{v:.0f}%"


def summary_row(res: ReplayResult) -> str:
    """The scenario's row in run.py's main table."""
    s = res.storm
    slow = res.slowest[0] if res.slowest else None
    slow_text = f"{slow.duration_us:,} µs ({slow.command.split(' ', 1)[0]})" if slow else "-"
    headline = (
        f"all caught up in {s.get('catch_up_s', 0):.2f} s"
        if res.complete == res.clients
        else f"only {res.complete:,} of {res.clients:,} caught up"
    )
    return (
        f"| (e) replay storm: {res.clients:,} reconnect, {res.missed} missed each | "
        f"**{headline}** | "
        f"{res.complete:,}/{res.clients:,} complete, recovered {res.recovered:,}, "
        f"lost {res.lost}, duplicated {res.duplicated}; "
        f"{s.get('connect_rate_per_s', 0):,.0f} conn/s; Redis slowest command {slow_text}; "
        f"gateway CPU {_pct(res.gateway_cpu_pct)} |"
    )


def render(res: ReplayResult, *, with_problems: bool = True) -> list[str]:
    """The scenario's own section (markdown lines); run.py lists the problems itself."""
    s = res.storm
    ttc = s.get("time_to_connected_ms", {})
    tcp = s.get("time_to_tcp_ms", {})
    ttu = s.get("time_to_caught_up_ms", {})
    conc = "all at once" if not res.concurrency else f"{res.concurrency} in flight per process"
    L = [
        f"### (e) Replay storm: {res.clients:,} clients reconnect with Last-Event-ID",
        "",
        f"Each client had missed {res.missed} events (published with `publish.lua`, "
        f"{res.missed_published:,} in {res.missed_publish_s:.2f} s while none was connected); "
        f"all reconnected {conc}, from {res.processes} client processes.",
        "",
        "| figure | value |",
        "|---|---|",
        f"| time until all caught up (`connected` + {res.missed} events each) | "
        + (
            f"**{s.get('catch_up_s', 0):.2f} s** |"
            if res.complete == res.clients
            else f"**never: {res.complete:,} of {res.clients:,} caught up** |"
        ),
        f"| storm connections/s (first attempt -> last `connected`) | "
        f"{s.get('connect_rate_per_s', 0):,.0f}/s ({s.get('connected', 0):,} in "
        f"{s.get('connect_s', 0):.2f} s) |",
        f"| per client: TCP connect p50 / p99 / max (ms) | {_ms(tcp.get('p50'))} / "
        f"{_ms(tcp.get('p99'))} / {_ms(tcp.get('max'))} |",
        f"| per client: time to `connected` p50 / p99 / max (ms) | {_ms(ttc.get('p50'))} / "
        f"{_ms(ttc.get('p99'))} / {_ms(ttc.get('max'))} |",
        f"| per client: time to caught up p50 / p99 / max (ms) | {_ms(ttu.get('p50'))} / "
        f"{_ms(ttu.get('p99'))} / {_ms(ttu.get('max'))} |",
        f"| streams complete (exactly their {res.missed} ids, in order) | "
        f"{res.complete:,} / {res.clients:,} |",
        f"| `recovered: true` / not | {res.recovered:,} / {res.not_recovered:,} |",
        f"| lost / duplicated / out of order / unexpected / before `connected` | "
        f"{res.lost} / {res.duplicated} / {res.out_of_order} / {res.unexpected} / {res.early} |",
        f"| failed connection attempts | {s.get('failed_attempts') or 0} |",
    ]
    if s.get("connected_per_tick"):
        L.append(
            f"| streams `connected` per {s.get('tick_s', 0.5):g} s from the first attempt | "
            + ", ".join(f"{n:,}" for n in s["connected_per_tick"])
            + " |"
        )
    by = res.bystander
    if by:
        L.append(
            f"| another client's live events during the storm (every 20 ms): delay p50 / p99 / "
            f"max, longest pause (ms) | {_ms(by.get('p50_ms'))} / {_ms(by.get('p99_ms'))} / "
            f"**{_ms(by.get('max_ms'))}**, {_ms(by.get('max_gap_ms'))} from "
            f"{by.get('max_gap_at_s', math.nan):.2f} s ({int(by.get('received', 0)):,} of "
            f"{int(by.get('sent', 0)):,} received) |"
        )
    if res.gateway_per_tick:
        L.append(
            f"| gateway /metrics at the end of each {s.get('tick_s', 0.5):g} s: streams "
            f"accepted / events replayed, cumulative | "
            + ", ".join(f"{a:,}/{r:,}" for a, r in res.gateway_per_tick)
            + " |"
        )
    b = res.baseline
    if b:
        L.append(
            f"| the same storm without Last-Event-ID (no replay): all `connected` after | "
            f"{b.get('connect_s', 0):.2f} s ({b.get('connect_rate_per_s', 0):,.0f}/s; gateway "
            f"CPU {_pct(res.baseline_gateway_cpu_pct)}) |"
        )
        bb = res.baseline_bystander
        if bb:
            L.append(
                f"| the same storm without Last-Event-ID: another client's live events, max "
                f"delay, longest pause (ms) | {_ms(bb.get('max_ms'))}, "
                f"{_ms(bb.get('max_gap_ms'))} from {bb.get('max_gap_at_s', math.nan):.2f} s |"
            )
    L += [
        f"| gateway CPU / Redis CPU / load client CPU (% of one core) | "
        f"{_pct(res.gateway_cpu_pct)} / {_pct(res.redis_cpu_pct)} / "
        f"{_pct(res.client_cpu_pct)} |",
        f"| other processes' CPU (other jobs, kernel threads) | {_pct(res.others_pct)} |",
        "| busy per core (of which irq, steal) | "
        + (
            " / ".join(
                f"cpu{i} {c:.0f}% ({q:.0f}%, {st:.0f}%)"
                for i, (c, q, st) in enumerate(
                    zip(res.cores_pct, res.irq_pct, res.steal_pct, strict=False)
                )
            )
            or "-"
        )
        + " |",
        f"| accept-queue overflows (TcpExt ListenOverflows) | {res.listen_overflows} |",
        f"| Redis PING round trip every 10 ms, p50 / p99 / max (ms) | "
        f"{_ms(res.redis_ping_ms.get('p50'))} / {_ms(res.redis_ping_ms.get('p99'))} / "
        f"{_ms(res.redis_ping_ms.get('max'))} |",
        f"| Redis main thread: preempted / waited for a CPU (ms) | {res.redis_preemptions} / "
        f"{_ms(res.redis_runqueue_wait_ms)} |",
    ]
    if res.slowest:
        top = res.slowest[0]
        L.append(
            f"| Redis slowest command (SLOWLOG, {res.slowlog_entries:,} commands logged) | "
            f"**{top.duration_us:,} µs**: `{top.command}` |"
        )
    L.append("")
    if res.slowlog_by_command:
        L.append("Redis commands in the storm (SLOWLOG, the bench's own PINGs left out):")
        L.append("")
        L.append("| command | count | total ms | max µs |")
        L.append("|---|---|---|---|")
        for name, d in sorted(res.slowlog_by_command.items(), key=lambda kv: -kv[1]["total_us"]):
            L.append(
                f"| {name} | {int(d['count']):,} | {d['total_us'] / 1000:.1f} | "
                f"{int(d['max_us']):,} |"
            )
        L.append("")
    if len(res.slowest) > 1:
        L.append("Slowest commands:")
        L.append("")
        L.extend(f"- {c.duration_us:,} µs `{c.command}` ({c.client})" for c in res.slowest)
        L.append("")
    L.append(
        f"- setup: {res.first_connected:,} streams in {res.first_connect_s:.2f} s; first event "
        f"received with its published id by {res.first_received_ok:,}; gateway idle "
        f"{res.gateway_idle_s:.2f} s and Redis' subscriptions gone "
        f"{res.redis_unsubscribed_s:.2f} s after the disconnect; missed events routed to a "
        f"subscriber: {res.missed_receivers}"
    )
    if res.gateway_metrics:
        L.append(f"- gateway metrics in the storm: {res.gateway_metrics}")
    L.append(f"- event types received: {res.event_types}")
    if with_problems:
        L.extend(f"- **problem:** {p}" for p in res.problems)
    L.append("")
    return L


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--port", type=int, required=True, help="gateway port on 127.0.0.1")
    ap.add_argument("--redis", required=True, help="the gateway's Redis, redis://127.0.0.1:<port>")
    ap.add_argument("--jwt-secret", required=True)
    ap.add_argument("--clients", type=int, default=10_000)
    ap.add_argument("--missed", type=int, default=10, help="events each client misses")
    ap.add_argument("--processes", type=int, default=0, help="default: one per 2,500 clients")
    ap.add_argument("--concurrency", type=int, default=0, help="per process; 0: all at once")
    ap.add_argument("--catchup-timeout", type=float, default=30.0)
    ap.add_argument("--gateway-pid", type=int, default=0, help="to measure the gateway's CPU")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args(argv)
    sampler: Sampler | None = None
    if args.gateway_pid:
        from run import CpuSampler  # run.py imports this module: imported late

        redis_pid = int(redis.Redis.from_url(args.redis).info("server")["process_id"])
        sampler = CpuSampler(args.gateway_pid, redis_pid)
    res = run_replay(
        redis_url=args.redis,
        port=args.port,
        jwt_secret=args.jwt_secret,
        clients=args.clients,
        missed=args.missed,
        processes=args.processes,
        concurrency=args.concurrency,
        sampler=sampler,
        catchup_timeout=args.catchup_timeout,
        log=(lambda _: None) if args.json else print,
    )
    if args.json:
        print(json.dumps(asdict(res), default=str))
    else:
        print()
        print("\n".join(render(res)))
    return 1 if res.fatal else 0


if __name__ == "__main__":
    sys.exit(main())
