#!/usr/bin/env python3
"""SSE load client: N connections (one player each) spread over P processes, raw asyncio sockets.

Each connection is one `asyncio.Protocol` that sends a `GET /v1/sse` with an HS256 token
(`brand_id`, `sub`, `exp`) and reads the stream minimally: it counts frames by event type and,
for `bench` events whose data is `{"t": <time.time_ns() at publish>}`, records publish->receive
latency. Source addresses rotate over 127.0.0.2-127.0.0.250 (bound before connect) so 10k+
connections never exhaust one address's ephemeral ports.

Standalone:

    python bench/loadclient.py --port 8080 --jwt-secret S --players 10000 --processes 4 --hold 30

or driven phase by phase from `bench/run.py` through `LoadClient` (connect, reset, stats, close).
Every worker stops by itself when its time budget (`--hold` + 10 min) ends or its parent goes away.
"""

from __future__ import annotations

import argparse
import array
import asyncio
import contextlib
import ctypes
import json
import math
import multiprocessing
import os
import resource
import signal
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any, cast

import jwt

uvloop: Any
try:
    import uvloop
except ImportError:  # pragma: no cover - uvloop is a gateway dependency on Linux
    uvloop = None

try:
    _PRCTL: Any = ctypes.CDLL(None, use_errno=True).prctl
except (OSError, AttributeError):
    _PRCTL = None

SOURCE_IPS = tuple(f"127.0.0.{i}" for i in range(2, 251))
MAX_LATENCY_SAMPLES = 4_000_000  # per worker; 32 MB of int64 at most
MAX_HEADER_BYTES = 65_536

_EV_CONNECTED = b"event: connected\n"
_EV_BENCH = b"event: bench\n"
_EV_HEARTBEAT = b"event: heartbeat\n"
_EV_ANY = b"event: "
_T_MARK = b'data: {"t":'
_T_MARK_LEN = len(_T_MARK)


@dataclass(slots=True)
class ClientConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    brand: str = "bench"
    players: int = 1000
    player_prefix: str = "p"
    processes: int = 2
    jwt_secret: str = ""
    token_ttl: int = 7200
    concurrency: int = 100  # connection attempts in flight per process
    timeout: float = 15.0  # per attempt: TCP connect + `event: connected`
    retries: int = 2
    max_seconds: float = 3600.0  # a worker exits by itself after this long
    cpus: tuple[int, ...] = ()  # pin worker processes to these CPUs (empty: no pinning)


def player_id(prefix: str, index: int) -> str:
    return f"{prefix}{index}"


class WorkerStats:
    """Counters of one worker process since the last `reset`."""

    __slots__ = (
        "bench",
        "connected_events",
        "drop_reasons",
        "dropped",
        "heartbeats",
        "latencies",
        "measure_latency",
        "other",
    )

    def __init__(self, measure_latency: bool = True) -> None:
        self.bench = 0
        self.heartbeats = 0
        self.connected_events = 0
        self.other = 0
        self.dropped = 0
        self.drop_reasons: Counter[str] = Counter()
        self.latencies = array.array("q")
        self.measure_latency = measure_latency


class ConnectFailed(Exception):
    pass


class SSEClient(asyncio.Protocol):
    """One SSE stream; parses just enough to count events and read `"t"` stamps."""

    __slots__ = ("buf", "closing", "fut", "is_connected", "request", "state", "stats", "transport")

    def __init__(self, stats: WorkerStats, request: bytes, fut: asyncio.Future[float]) -> None:
        self.stats = stats
        self.request = request
        self.fut = fut
        self.buf = b""
        self.state = 0  # 0: reading headers, 1: stream, 2: error response body
        self.is_connected = False
        self.closing = False
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses; they have the same methods
        self.transport = cast(asyncio.Transport, transport)
        self.transport.write(self.request)

    def _fail(self, reason: str) -> None:
        if not self.fut.done():
            self.fut.set_exception(ConnectFailed(reason))
        self.close()

    def close(self) -> None:
        self.closing = True
        if self.transport is not None:
            self.transport.close()

    def _read_head(self, data: bytes) -> bytes:
        """Response head handling (state 0 / 2). Returns the stream bytes after a 200 head
        (state is then 1, `buf` empty), or b"" while the head is incomplete or was an error."""
        buf = self.buf + data
        if self.state == 2:
            self.buf = buf
            if buf.rstrip().endswith(b"}"):
                self._fail(self._error_reason())
            return b""
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            if len(buf) > MAX_HEADER_BYTES:
                self._fail("response_headers_too_large")
            self.buf = buf
            return b""
        head = buf[:end]
        try:
            status = int(head.split(b" ", 2)[1])
        except (IndexError, ValueError):
            self._fail("bad_status_line")
            return b""
        if status != 200:
            self.state = 2
            self.buf = head + b"\r\n\r\n" + buf[end + 4 :]
            if buf.rstrip().endswith(b"}"):
                self._fail(self._error_reason())
            return b""
        self.state = 1
        self.buf = b""
        return buf[end + 4 :]

    def data_received(self, data: bytes) -> None:
        if self.state != 1:
            data = self._read_head(data)
            if not data:
                return
        buf = self.buf + data if self.buf else data
        end = buf.rfind(b"\n\n")
        if end < 0:
            self.buf = buf
            return
        chunk = buf[: end + 2]
        self.buf = buf[end + 2 :]
        stats = self.stats
        n_bench = chunk.count(_EV_BENCH)
        n_any = chunk.count(_EV_ANY)
        if n_bench:
            stats.bench += n_bench
            if stats.measure_latency and len(stats.latencies) < MAX_LATENCY_SAMPLES:
                now = time.time_ns()
                lat = stats.latencies
                pos = chunk.find(_T_MARK)
                while pos >= 0:
                    start = pos + _T_MARK_LEN
                    stop = chunk.find(b"}", start)
                    with contextlib.suppress(ValueError):
                        lat.append(now - int(chunk[start:stop]))
                    pos = chunk.find(_T_MARK, stop)
        if n_any != n_bench:
            n_hb = chunk.count(_EV_HEARTBEAT)
            stats.heartbeats += n_hb
            rest = n_any - n_bench - n_hb
            if rest and not self.is_connected and _EV_CONNECTED in chunk:
                self.is_connected = True
                stats.connected_events += 1
                rest -= 1
                if not self.fut.done():
                    self.fut.set_result(time.perf_counter())
            stats.other += rest

    def _error_reason(self) -> str:
        head, _, body = self.buf.partition(b"\r\n\r\n")
        status = head.split(b" ", 2)[1].decode("ascii", "replace") if b" " in head else "?"
        try:
            code = json.loads(body)["error"]
        except (ValueError, KeyError, TypeError):
            code = "?"
        return f"http_{status}:{code}"

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.fut.done():
            if self.state == 2:
                self.fut.set_exception(ConnectFailed(self._error_reason()))
            else:
                why = type(exc).__name__ if exc else "eof"
                self.fut.set_exception(ConnectFailed(f"closed_before_connected:{why}"))
        elif self.is_connected and not self.closing:
            self.stats.dropped += 1
            self.stats.drop_reasons[type(exc).__name__ if exc else "eof"] += 1
        self.transport = None


class ReplayClient(SSEClient):
    """A stream for the replay scenario: parses every frame, keeps the `recovered` flag of
    `connected` and the `id:` of every other event in arrival order.

    `fut` (inherited) resolves at `connected`, `done` once `expect` events with an id arrived
    after it, or at once when `connected` says `recovered: false` (nothing will be replayed).
    """

    __slots__ = (
        "caught_up_at",
        "connected_at",
        "done",
        "early",
        "expect",
        "ids",
        "recovered",
        "types",
    )

    def __init__(
        self,
        stats: WorkerStats,
        request: bytes,
        fut: asyncio.Future[float],
        done: asyncio.Future[float],
        expect: int,
    ) -> None:
        super().__init__(stats, request, fut)
        self.done = done
        self.expect = expect
        self.ids: list[str] = []
        self.types: Counter[str] = Counter()
        self.recovered: bool | None = None
        self.early = 0  # events before `connected` (there must be none)
        self.connected_at = 0.0  # time.time()
        self.caught_up_at = 0.0  # time.time() when `expect` events had arrived

    def data_received(self, data: bytes) -> None:
        if self.state != 1:
            data = self._read_head(data)
            if not data:
                return
        buf = self.buf + data if self.buf else data
        end = buf.rfind(b"\n\n")
        if end < 0:
            if len(buf) > MAX_HEADER_BYTES:
                self._fail("frame_too_large")
            self.buf = buf
            return
        self.buf = buf[end + 2 :]
        for frame in buf[:end].split(b"\n\n"):
            self._frame(frame)

    def _frame(self, frame: bytes) -> None:
        event_id: bytes | None = None
        event = b"message"
        data: list[bytes] = []
        for line in frame.split(b"\n"):
            if not line or line[0] == 58:  # empty, or a `:` comment
                continue
            name, _, value = line.partition(b":")
            if value[:1] == b" ":
                value = value[1:]
            if name == b"id":
                event_id = value
            elif name == b"event":
                event = value
            elif name == b"data":
                data.append(value)
        if not data:
            return  # `retry:` only, or comments
        stats = self.stats
        if event == b"connected":
            if self.is_connected:
                stats.other += 1
                return
            try:
                payload = json.loads(b"\n".join(data))
                recovered = payload.get("recovered") if isinstance(payload, dict) else None
            except ValueError:
                recovered = None
            self.recovered = recovered if isinstance(recovered, bool) else None
            self.is_connected = True
            self.connected_at = time.time()
            stats.connected_events += 1
            if not self.fut.done():
                self.fut.set_result(time.perf_counter())
            self._check_done()
        elif event == b"heartbeat":
            stats.heartbeats += 1
        elif event_id is None:
            stats.other += 1
        else:
            stats.bench += 1
            self.ids.append(event_id.decode("ascii", "replace"))
            self.types[event.decode("ascii", "replace")] += 1
            if not self.is_connected:
                self.early += 1
            self._check_done()

    def _check_done(self) -> None:
        if not self.is_connected or self.done.done():
            return
        if len(self.ids) >= self.expect:
            self.caught_up_at = time.time()
            self.done.set_result(time.perf_counter())
        elif self.recovered is False and self.expect:
            self.done.set_result(time.perf_counter())  # nothing is going to be replayed

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        if not self.done.done():
            self.done.set_exception(ConnectFailed("closed_before_caught_up"))
            self.done.exception()  # retrieved: nobody may be waiting for it any more


def _factory(client: SSEClient) -> Callable[[], SSEClient]:
    return lambda: client


def _raise_nofile_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _cpu_seconds() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


@dataclass(slots=True)
class _ReplayTally:
    """What one worker's replay round measured."""

    failures: Counter[str] = field(default_factory=Counter)
    connected_ms: array.array[float] = field(default_factory=lambda: array.array("d"))
    caught_up_ms: array.array[float] = field(default_factory=lambda: array.array("d"))
    connected_at: array.array[float] = field(default_factory=lambda: array.array("d"))
    tcp_ms: array.array[float] = field(default_factory=lambda: array.array("d"))
    last_connected: float = 0.0  # time.time()
    last_caught_up: float = 0.0
    stalled: int = 0  # connected, but `expect` events did not arrive within the time limit
    closed_early: int = 0  # connected, then closed by the gateway before catching up


class Worker:
    """One load process: owns connections [lo, hi) and answers commands from its pipe."""

    def __init__(self, index: int, conf: ClientConfig, lo: int, hi: int, pipe: Connection) -> None:
        self.index = index
        self.conf = conf
        self.lo = lo
        self.hi = hi
        self.pipe = pipe
        self.stats = WorkerStats()
        self.clients: list[SSEClient] = []
        self.requests: list[bytes] = []
        self.stop = asyncio.Event()
        self.reset_wall = time.time()
        self.reset_cpu = _cpu_seconds()
        self.busy: asyncio.Task[None] | None = None
        self.loop_errors = 0
        # replay scenario: the current stream of each player, and the last id each one saw
        self.replay_clients: dict[int, ReplayClient] = {}
        self.last_ids: dict[int, str] = {}
        self.replay_stats = WorkerStats(measure_latency=False)

    def make_requests(self) -> None:
        conf = self.conf
        exp = int(time.time()) + conf.token_ttl
        host = f"{conf.host}:{conf.port}"
        for i in range(self.lo, self.hi):
            claims = {"brand_id": conf.brand, "sub": player_id(conf.player_prefix, i), "exp": exp}
            token = jwt.encode(claims, conf.jwt_secret, algorithm="HS256")
            self.requests.append(
                (
                    f"GET /v1/sse HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {token}\r\n"
                    "Accept: text/event-stream\r\nCache-Control: no-cache\r\n\r\n"
                ).encode("ascii")
            )

    async def open_one(
        self, i: int, sem: asyncio.Semaphore, times: array.array[float], failures: Counter[str]
    ) -> bool:
        loop = asyncio.get_running_loop()
        conf = self.conf
        source = SOURCE_IPS[i % len(SOURCE_IPS)]
        request = self.requests[i - self.lo]
        async with sem:
            for attempt in range(conf.retries + 1):
                if attempt:
                    await asyncio.sleep(min(0.25 * 2**attempt, 2.0))
                started = time.perf_counter()
                client: SSEClient | None = None
                try:
                    async with asyncio.timeout(conf.timeout):
                        fut: asyncio.Future[float] = loop.create_future()
                        client = SSEClient(self.stats, request, fut)
                        # binds the source address before connecting (uvloop does both)
                        await loop.create_connection(
                            _factory(client), conf.host, conf.port, local_addr=(source, 0)
                        )
                        done_at = await fut
                    times.append((done_at - started) * 1000.0)
                    self.clients.append(client)
                    return True
                except ConnectFailed as exc:
                    failures[str(exc)] += 1
                except TimeoutError:
                    failures["timeout"] += 1
                except OSError as exc:
                    failures[f"os_error:{exc.errno}"] += 1
                if client is not None and client.transport is not None:
                    client.close()
        return False

    async def connect_all(self) -> dict[str, Any]:
        sem = asyncio.Semaphore(self.conf.concurrency)
        times: array.array[float] = array.array("d")
        failures: Counter[str] = Counter()
        started = time.time()
        cpu0 = _cpu_seconds()
        results = await asyncio.gather(
            *(self.open_one(i, sem, times, failures) for i in range(self.lo, self.hi))
        )
        return {
            "worker": self.index,
            "start": started,
            "end": time.time(),
            "connected": sum(results),
            "wanted": self.hi - self.lo,
            "failed_attempts": dict(failures),
            "times_ms": times.tobytes(),
            "cpu_s": _cpu_seconds() - cpu0,
        }

    def replay_request(self, i: int, resume: bool) -> bytes:
        """The player's request, with `Last-Event-ID: <last id it saw>` when resuming."""
        request = self.requests[i - self.lo]
        last = self.last_ids.get(i) if resume else None
        if last is None:
            return request
        return request[:-2] + b"Last-Event-ID: " + last.encode("ascii") + b"\r\n\r\n"

    async def open_replay(
        self,
        i: int,
        expect: int,
        resume: bool,
        sem: asyncio.Semaphore,
        catchup_timeout: float,
        tally: _ReplayTally,
    ) -> None:
        """Connects player i (retrying only failures before `connected`), then waits until it
        has `expect` events. A stream that got `connected` is never retried: a retry would hide
        events the first one lost."""
        loop = asyncio.get_running_loop()
        conf = self.conf
        source = SOURCE_IPS[i % len(SOURCE_IPS)]
        request = self.replay_request(i, resume)
        first = time.perf_counter()
        client: ReplayClient | None = None
        connected_at = tcp_at = first
        async with sem:
            for attempt in range(conf.retries + 1):
                if attempt:
                    await asyncio.sleep(min(0.25 * 2**attempt, 2.0))
                fut: asyncio.Future[float] = loop.create_future()
                done: asyncio.Future[float] = loop.create_future()
                candidate = ReplayClient(self.replay_stats, request, fut, done, expect)
                try:
                    async with asyncio.timeout(conf.timeout):
                        await loop.create_connection(
                            _factory(candidate), conf.host, conf.port, local_addr=(source, 0)
                        )
                        tcp_at = time.perf_counter()
                        connected_at = await fut
                    client = candidate
                    break
                except ConnectFailed as exc:
                    tally.failures[str(exc)] += 1
                except TimeoutError:
                    tally.failures["timeout"] += 1
                except OSError as exc:
                    tally.failures[f"os_error:{exc.errno}"] += 1
                if candidate.transport is not None:
                    candidate.close()
        if client is None:
            return
        self.replay_clients[i] = client
        tally.connected_ms.append((connected_at - first) * 1000.0)
        tally.tcp_ms.append((tcp_at - first) * 1000.0)
        tally.last_connected = max(tally.last_connected, client.connected_at)
        tally.connected_at.append(client.connected_at)
        try:
            async with asyncio.timeout(catchup_timeout):
                done_at = await client.done
        except TimeoutError:
            tally.stalled += 1
            return
        except ConnectFailed:
            tally.closed_early += 1
            return
        if client.caught_up_at:
            tally.caught_up_ms.append((done_at - first) * 1000.0)
            tally.last_caught_up = max(tally.last_caught_up, client.caught_up_at)

    async def replay_connect(self, arg: dict[str, Any]) -> dict[str, Any]:
        """Opens one stream per player at once (at most `concurrency` attempts in flight)."""
        expect = int(arg["expect"])
        resume = bool(arg["resume"])
        concurrency = int(arg.get("concurrency") or 0) or max(1, self.hi - self.lo)
        catchup_timeout = float(arg.get("catchup_timeout", 30.0))
        await self.replay_close_all()
        self.replay_clients = {}
        self.replay_stats = WorkerStats(measure_latency=False)
        sem = asyncio.Semaphore(concurrency)
        tally = _ReplayTally()
        started = time.time()
        cpu0 = _cpu_seconds()
        await asyncio.gather(
            *(
                self.open_replay(i, expect, resume, sem, catchup_timeout, tally)
                for i in range(self.lo, self.hi)
            )
        )
        return {
            "worker": self.index,
            "start": started,
            "end": time.time(),
            "wanted": self.hi - self.lo,
            "connected": len(tally.connected_ms),
            "caught_up": len(tally.caught_up_ms),
            "stalled": tally.stalled,
            "closed_early": tally.closed_early,
            "not_recovered": sum(
                1 for c in self.replay_clients.values() if expect and c.recovered is not True
            ),
            "last_connected": tally.last_connected,
            "last_caught_up": tally.last_caught_up,
            "failed_attempts": dict(tally.failures),
            "connected_ms": tally.connected_ms.tobytes(),
            "caught_up_ms": tally.caught_up_ms.tobytes(),
            "connected_at": tally.connected_at.tobytes(),
            "tcp_ms": tally.tcp_ms.tobytes(),
            "cpu_s": _cpu_seconds() - cpu0,
        }

    def replay_count(self, k: int) -> list[int]:
        """[events with an id received by this round's streams, streams with at least k]."""
        lens = [len(c.ids) for c in self.replay_clients.values()]
        return [sum(lens), sum(1 for n in lens if n >= k)]

    async def replay_close_all(self, limit: float = 10.0) -> None:
        clients = list(self.replay_clients.values())
        for client in clients:
            client.close()
        deadline = time.monotonic() + limit
        while any(c.transport is not None for c in clients) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)

    async def replay_close(self) -> dict[str, Any]:
        """Closes this round's streams; returns what each one received and remembers the last
        id of each player for the next `resume`."""
        await self.replay_close_all()
        clients: dict[int, tuple[bool | None, list[str], int, dict[str, int]]] = {}
        for i, c in self.replay_clients.items():
            clients[i] = (c.recovered, c.ids, c.early, dict(c.types))
            if c.ids:
                self.last_ids[i] = c.ids[-1]
        self.replay_clients = {}
        s = self.replay_stats
        return {
            "worker": self.index,
            "clients": clients,
            "dropped": s.dropped,
            "drop_reasons": dict(s.drop_reasons),
            "heartbeats": s.heartbeats,
            "other": s.other,
        }

    def reset(self, measure_latency: bool) -> None:
        self.stats = WorkerStats(measure_latency)
        for client in self.clients:
            client.stats = self.stats
        self.reset_wall = time.time()
        self.reset_cpu = _cpu_seconds()

    def snapshot(self) -> dict[str, Any]:
        s = self.stats
        open_now = sum(1 for c in self.clients if c.transport is not None)
        return {
            "worker": self.index,
            "wall_s": time.time() - self.reset_wall,
            "cpu_s": _cpu_seconds() - self.reset_cpu,
            "bench": s.bench,
            "heartbeats": s.heartbeats,
            "connected_events": s.connected_events,
            "other": s.other,
            "dropped": s.dropped,
            "drop_reasons": dict(s.drop_reasons),
            "open": open_now,
            "latencies": s.latencies.tobytes(),
        }

    async def handle(self, cmd: str, arg: Any) -> None:
        try:
            await self._handle(cmd, arg)
        except Exception as exc:
            self.pipe.send({"error": f"{cmd}: {exc!r}"})

    async def _handle(self, cmd: str, arg: Any) -> None:
        if cmd == "connect":
            self.pipe.send(await self.connect_all())
        elif cmd == "reset":
            self.reset(bool(arg))
            self.pipe.send("ok")
        elif cmd == "stats":
            self.pipe.send(self.snapshot())
        elif cmd == "count":
            self.pipe.send(self.stats.bench)
        elif cmd == "replay_connect":
            self.pipe.send(await self.replay_connect(arg))
        elif cmd == "replay_count":
            self.pipe.send(self.replay_count(int(arg)))
        elif cmd == "replay_close":
            self.pipe.send(await self.replay_close())
        elif cmd == "close":
            for client in [*self.clients, *self.replay_clients.values()]:
                client.close()
            await asyncio.sleep(0.05)
            self.pipe.send("ok")
            self.stop.set()
        else:
            self.pipe.send({"error": f"unknown command {cmd!r}"})

    def pipe_reader(self, loop: asyncio.AbstractEventLoop) -> None:
        """Thread: blocking reads of commands. (loop.add_reader would make the pipe non-blocking
        -- libuv's uv_poll_init does -- and a large `send` would then fail half-written.)"""
        while True:
            try:
                cmd, arg = self.pipe.recv()
            except (EOFError, OSError):
                break  # parent went away
            try:
                loop.call_soon_threadsafe(self.on_command, cmd, arg)
            except RuntimeError:
                return  # loop closed
            if cmd == "close":
                return
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(self.stop.set)

    def on_command(self, cmd: str, arg: Any) -> None:
        if self.busy is not None and not self.busy.done():
            self.pipe.send({"error": "busy"})
            return
        self.busy = asyncio.get_running_loop().create_task(self.handle(cmd, arg))

    def on_loop_error(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        self.loop_errors += 1
        if self.loop_errors <= 3:  # a broken run must not print thousands of tracebacks
            loop.default_exception_handler(context)

    async def main(self) -> None:
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(self.on_loop_error)
        self.make_requests()
        threading.Thread(target=self.pipe_reader, args=(loop,), daemon=True).start()
        loop.call_later(self.conf.max_seconds, self.stop.set)
        self.pipe.send("ready")
        await self.stop.wait()
        for client in [*self.clients, *self.replay_clients.values()]:
            client.close()


def _worker_entry(
    index: int,
    conf: ClientConfig,
    lo: int,
    hi: int,
    pipe: Connection,
    inherited: list[Connection],
) -> None:
    # Forked copies of the parent's ends of every pipe: closed, so that each pipe reaches EOF
    # (and its worker stops) when the parent goes away.
    for conn in inherited:
        conn.close()
    if _PRCTL is not None:
        _PRCTL(1, int(signal.SIGTERM), 0, 0, 0)  # PR_SET_PDEATHSIG: SIGTERM when the parent dies
    # a forked worker inherits its parent's handlers; the parent alone decides when to stop
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGALRM, signal.SIG_DFL)
    if conf.cpus and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, set(conf.cpus))
    _raise_nofile_limit()
    worker = Worker(index, conf, lo, hi, pipe)
    if uvloop is not None:
        uvloop.run(worker.main())
    else:
        asyncio.run(worker.main())


def percentiles(values_ns: list[int]) -> dict[str, float]:
    """Nearest-rank percentiles in milliseconds."""
    if not values_ns:
        return {"n": 0}
    values_ns.sort()
    n = len(values_ns)

    def at(p: float) -> float:
        rank = max(1, math.ceil(p / 100.0 * n))
        return values_ns[rank - 1] / 1e6

    return {
        "n": n,
        "p50": at(50),
        "p90": at(90),
        "p99": at(99),
        "p99.9": at(99.9),
        "max": values_ns[-1] / 1e6,
    }


@dataclass
class ConnectReport:
    wanted: int
    connected: int
    elapsed_s: float
    rate_per_s: float
    time_to_connected_ms: dict[str, float]
    failed_attempts: dict[str, int]
    client_cpu_s: list[float]


@dataclass
class PhaseStats:
    wall_s: float
    bench: int
    heartbeats: int
    connected_events: int
    other: int
    dropped: int
    drop_reasons: dict[str, int]
    open: int
    latency_ms: dict[str, float]
    client_cpu_pct: list[float] = field(default_factory=list)  # per process, % of one core


@dataclass
class ReplayConnectReport:
    """One round of the replay scenario: every player's stream opened at once."""

    wanted: int
    connected: int  # streams that read `connected`
    caught_up: int  # ... and then `expect` events
    stalled: int  # connected, but the events did not all arrive in time
    closed_early: int  # connected, then closed by the gateway before catching up
    not_recovered: int  # `connected` without `"recovered": true` (when events were expected)
    start: float  # time.time() of the first attempt
    connect_s: float  # first attempt -> last `connected`
    catch_up_s: float  # first attempt -> last stream caught up
    connect_rate_per_s: float  # connected / connect_s
    time_to_connected_ms: dict[str, float]
    time_to_caught_up_ms: dict[str, float]
    failed_attempts: dict[str, int]
    client_cpu_s: list[float]
    client_wall_s: list[float]
    time_to_tcp_ms: dict[str, float] = field(default_factory=dict)  # until connect() returned
    connected_per_tick: list[int] = field(default_factory=list)  # `connected` per `tick_s`
    tick_s: float = 0.5


@dataclass
class ReplayStreams:
    """What each player's stream received, by player index: (recovered, ids, events before
    `connected`, event types)."""

    clients: dict[int, tuple[bool | None, list[str], int, dict[str, int]]]
    dropped: int
    drop_reasons: dict[str, int]
    heartbeats: int
    other: int


class LoadClient:
    """Parent-side handle of the worker processes; every call is bounded by a timeout."""

    def __init__(self, conf: ClientConfig) -> None:
        self.conf = conf
        self.procs: list[BaseProcess] = []
        self.pipes: list[Connection] = []

    def start(self, timeout: float = 120.0) -> None:
        ctx = multiprocessing.get_context("fork")
        n = self.conf.players
        p = max(1, min(self.conf.processes, n))
        for k in range(p):
            lo, hi = n * k // p, n * (k + 1) // p
            parent, child = ctx.Pipe()
            proc = ctx.Process(
                target=_worker_entry,
                args=(k, self.conf, lo, hi, child, [*self.pipes, parent]),
                daemon=True,
            )
            proc.start()
            child.close()
            self.procs.append(proc)
            self.pipes.append(parent)
        for reply in self._gather(timeout):
            if reply != "ready":
                raise RuntimeError(f"worker failed to start: {reply!r}")

    def _gather(self, timeout: float) -> list[Any]:
        deadline = time.monotonic() + timeout
        replies = []
        for k, pipe in enumerate(self.pipes):
            if not pipe.poll(max(0.0, deadline - time.monotonic())):
                raise TimeoutError(f"load worker {k} did not answer within {timeout:.0f}s")
            reply = pipe.recv()
            if isinstance(reply, dict) and "error" in reply:
                raise RuntimeError(f"load worker {k}: {reply['error']}")
            replies.append(reply)
        return replies

    def _command(self, cmd: str, arg: Any = None, timeout: float = 60.0) -> list[Any]:
        for pipe in self.pipes:
            pipe.send((cmd, arg))
        return self._gather(timeout)

    def connect(self) -> ConnectReport:
        conf = self.conf
        per_proc = math.ceil(conf.players / max(1, len(self.pipes)))
        budget = (conf.retries + 1) * (conf.timeout + 2.0) * math.ceil(per_proc / conf.concurrency)
        replies = self._command("connect", timeout=min(budget, conf.max_seconds) + 30.0)
        times: list[int] = []
        failures: Counter[str] = Counter()
        for r in replies:
            ms = array.array("d")
            ms.frombytes(r["times_ms"])
            times.extend(int(v * 1e6) for v in ms)
            failures.update(r["failed_attempts"])
        connected = sum(r["connected"] for r in replies)
        elapsed = max(r["end"] for r in replies) - min(r["start"] for r in replies)
        return ConnectReport(
            wanted=conf.players,
            connected=connected,
            elapsed_s=elapsed,
            rate_per_s=connected / elapsed if elapsed > 0 else 0.0,
            time_to_connected_ms=percentiles(times),
            failed_attempts=dict(failures),
            client_cpu_s=[r["cpu_s"] for r in replies],
        )

    def reset(self, measure_latency: bool = True) -> None:
        self._command("reset", measure_latency)

    def replay_connect(
        self,
        expect: int,
        resume: bool,
        concurrency: int = 0,
        catchup_timeout: float = 30.0,
    ) -> ReplayConnectReport:
        """Opens one stream per player, all at once (`concurrency`: attempts in flight per
        process, 0 = all), each with `Last-Event-ID: <the last id it saw>` when `resume`, and
        waits until each has read `connected` and then `expect` events with an id."""
        conf = self.conf
        per_proc = math.ceil(conf.players / max(1, len(self.pipes)))
        waves = math.ceil(per_proc / concurrency) if concurrency else 1
        budget = (conf.retries + 1) * (conf.timeout + 2.0) * waves + catchup_timeout
        arg = {
            "expect": expect,
            "resume": resume,
            "concurrency": concurrency,
            "catchup_timeout": catchup_timeout,
        }
        replies = self._command("replay_connect", arg, timeout=min(budget, conf.max_seconds) + 30)
        to_connected: list[int] = []
        to_caught_up: list[int] = []
        to_tcp: list[int] = []
        failures: Counter[str] = Counter()
        for r in replies:
            for key, out in (
                ("connected_ms", to_connected),
                ("caught_up_ms", to_caught_up),
                ("tcp_ms", to_tcp),
            ):
                ms = array.array("d")
                ms.frombytes(r[key])
                out.extend(int(v * 1e6) for v in ms)
            failures.update(r["failed_attempts"])
        start = min(r["start"] for r in replies)
        connected = sum(r["connected"] for r in replies)
        tick = 0.5
        per_tick: list[int] = []
        for r in replies:
            at = array.array("d")
            at.frombytes(r["connected_at"])
            for t in at:
                k = max(0, int((t - start) / tick))
                if k < 100_000:
                    per_tick.extend([0] * (k + 1 - len(per_tick)))
                    per_tick[k] += 1
        last_connected = max(r["last_connected"] for r in replies)
        last_caught_up = max(r["last_caught_up"] for r in replies)
        connect_s = max(0.0, last_connected - start) if connected else 0.0
        return ReplayConnectReport(
            wanted=conf.players,
            connected=connected,
            caught_up=sum(r["caught_up"] for r in replies),
            stalled=sum(r["stalled"] for r in replies),
            closed_early=sum(r["closed_early"] for r in replies),
            not_recovered=sum(r["not_recovered"] for r in replies),
            start=start,
            connect_s=connect_s,
            catch_up_s=max(0.0, last_caught_up - start) if last_caught_up else 0.0,
            connect_rate_per_s=connected / connect_s if connect_s > 0 else 0.0,
            time_to_connected_ms=percentiles(to_connected),
            time_to_caught_up_ms=percentiles(to_caught_up),
            failed_attempts=dict(failures),
            client_cpu_s=[r["cpu_s"] for r in replies],
            client_wall_s=[r["end"] - r["start"] for r in replies],
            time_to_tcp_ms=percentiles(to_tcp),
            connected_per_tick=per_tick,
            tick_s=tick,
        )

    def replay_count(self, k: int = 1) -> tuple[int, int]:
        """(events with an id received this round, streams that have at least k of them)."""
        replies = self._command("replay_count", k, timeout=30.0)
        return sum(r[0] for r in replies), sum(r[1] for r in replies)

    def replay_close(self) -> ReplayStreams:
        """Closes every replay stream; returns what each received (and remembers its last id)."""
        replies = self._command("replay_close", timeout=60.0)
        clients: dict[int, tuple[bool | None, list[str], int, dict[str, int]]] = {}
        reasons: Counter[str] = Counter()
        for r in replies:
            clients.update(r["clients"])
            reasons.update(r["drop_reasons"])
        return ReplayStreams(
            clients=clients,
            dropped=sum(r["dropped"] for r in replies),
            drop_reasons=dict(reasons),
            heartbeats=sum(r["heartbeats"] for r in replies),
            other=sum(r["other"] for r in replies),
        )

    def count(self) -> int:
        """`bench` events received by all connections since the last reset."""
        return sum(self._command("count", timeout=30.0))

    def stats(self) -> PhaseStats:
        replies = self._command("stats", timeout=120.0)
        lat: list[int] = []
        reasons: Counter[str] = Counter()
        for r in replies:
            a = array.array("q")
            a.frombytes(r["latencies"])
            lat.extend(a)
            reasons.update(r["drop_reasons"])
        return PhaseStats(
            wall_s=max(r["wall_s"] for r in replies),
            bench=sum(r["bench"] for r in replies),
            heartbeats=sum(r["heartbeats"] for r in replies),
            connected_events=sum(r["connected_events"] for r in replies),
            other=sum(r["other"] for r in replies),
            dropped=sum(r["dropped"] for r in replies),
            drop_reasons=dict(reasons),
            open=sum(r["open"] for r in replies),
            latency_ms=percentiles(lat),
            client_cpu_pct=[
                100.0 * r["cpu_s"] / r["wall_s"] if r["wall_s"] > 0 else 0.0 for r in replies
            ],
        )

    def close(self) -> None:
        for pipe in self.pipes:
            with contextlib.suppress(OSError, ValueError):
                pipe.send(("close", None))
        deadline = time.monotonic() + 10.0
        for proc in self.procs:
            proc.join(max(0.1, deadline - time.monotonic()))
        for proc in self.procs:
            if proc.is_alive():
                proc.terminate()
                proc.join(2.0)
            if proc.is_alive():
                proc.kill()
                proc.join(2.0)
        for pipe in self.pipes:
            pipe.close()
        self.procs.clear()
        self.pipes.clear()

    def __enter__(self) -> LoadClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _fmt_percentiles(p: dict[str, float]) -> str:
    return " ".join(f"{k}={v:,.0f}" if k == "n" else f"{k}={v:.2f}" for k, v in p.items())


def _parse_cpus(text: str) -> tuple[int, ...]:
    return tuple(int(c) for c in text.split(",") if c.strip()) if text else ()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--host", default="127.0.0.1", help="gateway address (loopback only)")
    ap.add_argument("--port", type=int, default=8080)
    ap.add_argument("--brand", default="bench")
    ap.add_argument("--players", type=int, default=1000, help="connections, one player each")
    ap.add_argument("--player-prefix", default="p", help="player ids are <prefix><index>")
    ap.add_argument("--processes", type=int, default=0, help="default: one per 2,500 conns, >= 2")
    ap.add_argument("--jwt-secret", required=True)
    ap.add_argument("--concurrency", type=int, default=100, help="attempts in flight per process")
    ap.add_argument("--timeout", type=float, default=15.0, help="seconds per connection attempt")
    ap.add_argument("--retries", type=int, default=2)
    ap.add_argument("--hold", type=float, default=10.0, help="seconds to stay connected after")
    ap.add_argument("--cpus", default="", help="pin workers to these CPUs, e.g. 1 or 2,3")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args(argv)
    if not args.host.startswith("127."):
        ap.error("--host must be a loopback address (127.0.0.0/8)")
    processes = args.processes or max(2, math.ceil(args.players / 2500))
    conf = ClientConfig(
        host=args.host,
        port=args.port,
        brand=args.brand,
        players=args.players,
        player_prefix=args.player_prefix,
        processes=processes,
        jwt_secret=args.jwt_secret,
        concurrency=args.concurrency,
        timeout=args.timeout,
        retries=args.retries,
        max_seconds=args.hold + 600.0,
        cpus=_parse_cpus(args.cpus),
    )
    with LoadClient(conf) as lc:
        lc.start()
        report = lc.connect()
        lc.reset(measure_latency=True)
        time.sleep(max(0.0, min(args.hold, 86_400.0)))
        hold = lc.stats()
    if args.json:
        print(json.dumps({"connect": asdict(report), "hold": asdict(hold)}))
    else:
        print(
            f"connected {report.connected}/{report.wanted} in {report.elapsed_s:.2f}s "
            f"= {report.rate_per_s:,.0f} conn/s; time to connected (ms) "
            f"{_fmt_percentiles(report.time_to_connected_ms)}"
        )
        if report.failed_attempts:
            print(f"failed attempts: {report.failed_attempts}")
        print(f"connect CPU per process (s): {[round(c, 2) for c in report.client_cpu_s]}")
        print(
            f"hold {hold.wall_s:.1f}s: bench={hold.bench} heartbeats={hold.heartbeats} "
            f"other={hold.other} open={hold.open} dropped={hold.dropped} {hold.drop_reasons}"
        )
        print(f"latency (ms): {_fmt_percentiles(hold.latency_ms)}")
        print(f"client CPU % per process: {[round(c, 1) for c in hold.client_cpu_pct]}")
    return 0 if report.connected == report.wanted else 1


if __name__ == "__main__":
    sys.exit(main())
