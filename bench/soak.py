#!/usr/bin/env python3
"""Soak: browser-like EventSource clients, two gateways, one Redis, random faults, a ledger.

What it runs, all on 127.0.0.1 and free ports, in a temporary directory:

- one `redis-server` with `--appendonly yes --appendfsync always` (an acknowledged publish
  survives a SIGKILL of Redis);
- two gateways (`python -m sse_gateway serve`, from `--gateway-src`, default this tree's src/)
  on that Redis; the "load balancer" is each client picking one of the two ports at random for
  every (re)connect;
- `--clients` asyncio clients in this one process that behave like a browser's `EventSource`:
  `GET /v1/sse?token=…` with `Accept: text/event-stream`, a `Last-Event-ID` header when (and
  only when) they have a last event id (set by every `id:` field, kept across reconnects as
  Chromium does), `retry:` taken as the reconnection time (times `--retry-scale`), a
  reconnect after that time on a network error or at the end of the body (close-delimited or
  chunked), and giving up for good on any answer but `200 text/event-stream` (counted as
  *refused*). Client `i` is a tab of player `p{i % players}`;
- a publisher that runs the shipped `publish.lua` (`sse-gateway publish-script --path`) by
  EVALSHA at a steady `--rate` to random players (player k gets a share 1/(k+1)^`--skew`: a
  few hot, many rarely published to). An event is *acknowledged* when EVALSHA returned its
  entry id. A failed call is never retried (NOSCRIPT, which did not run, is loaded and sent
  again), so an unacknowledged event may or may not arrive, but never twice or out of order;
- seeded random faults, each kind once per shuffled round, every `--fault-gap-min`..`max`
  seconds, overlapping on different targets unless `--no-overlap`: `gateway-term` (SIGTERM,
  wait for its exit, restart on the same port), `gateway-kill` (SIGKILL, restart),
  `pubsub-kill` (`CLIENT KILL TYPE pubsub`), `redis-kill` (SIGKILL, restart on the same port
  and directory).

After `--duration` seconds the faults stop (the one under way completes), publishing stops,
one marker event per player is published, and every client that did not give up must reach
its player's last acknowledged id (`--settle` seconds at most). Then the ledger checks, per
client: every acknowledged event of its player with an id above the resume id of the first
`connected` the client got (the `id:` of that frame; a gateway that sends none: every event
whose publish was sent after `connected` was read) arrived exactly once and in order, except
the events a `"recovered": false` excused (above the id the client sent, up to that
connection's resume id; printed as "excused by recovered:false"). A client that gave up is
checked up to the last event it got. Each loss is classified by how it happened (a reconnect
with or without Last-Event-ID and after what end of the stream, or a hole in a live stream)
and by the faults under way; each refusal by status, error code, the state of that gateway
and of Redis, and the faults under way.

Exit status 0 only when there are no losses, no refused answers, no duplicates, no
out-of-order events, no client stuck without a stream at the end and no protocol violation
(an event before `connected`, a second `connected`, no `recovered` after Last-Event-ID); 1
otherwise; 2 when the soak could not run; 130 when interrupted. Every process it starts is
stopped by its PID on exit, Ctrl-C, SIGTERM and errors (and gets SIGKILL through
PR_SET_PDEATHSIG should the soak itself be killed). The work directory (Redis and gateway
logs, and `ledger-failures.json`: everything the failing clients saw) is kept on failure.

    make soak                                  # 120 s, 400 clients, 100 players, 100 ev/s
    make soak SOAK_ARGS="--seed 7 --duration 600 --clients 1000"
    .venv/bin/python bench/soak.py --seed 1 --duration 25 --players 60 --clients 120 \
        --rate 30 --history-size 5 --json /tmp/soak.json   # the short run `make test` does

`--history-size 5` (any size the hot players outrun during an outage) has clients told
`"recovered": false` at times, so that path is checked too.

Figures: events published / acknowledged / failed, deliveries (and how many the ledger
expected), faults by kind, connections and reconnects (and how each connection ended),
refused answers, losses, duplicates, out-of-order, recovered:false (and true), events excused
by recovered:false, the longest, 99th- and 50th-percentile time from losing a stream to the
next `connected`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import itertools
import json
import math
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import jwt
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import NoScriptError, RedisError, ResponseError

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
# The tests' WHATWG-conforming SSE parser and chunked decoder (stdlib only).
from support.sse import SSEEvent, SSEParser, _ChunkedDecoder  # noqa: E402

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
FAULT_KINDS = ("gateway-term", "gateway-kill", "pubsub-kill", "redis-kill")
BRAND = "soak"
EVENT_TYPE = "soak"
MARKER_TYPE = "soak-marker"
SECRET = "soak-secret-" + "0123456789abcdef" * 3
GATEWAY_ENV_PREFIXES = ("SSE_", "EVENTS_REDIS_STORAGE")
DEFAULT_RECONNECT_MS = 3000  # Chromium's reconnection time before any `retry:`
FAULT_WINDOW = 10.0  # a loss or refusal this long after a fault began is put on that fault
PR_SET_PDEATHSIG = 1
PROTOCOL_VIOLATIONS = (
    "malformed responses",
    "client errors",
    "events before connected",
    "second connected on one stream",
    "connected without recovered after Last-Event-ID",
)

Id = tuple[int, int]


def parse_id(text: str | None) -> Id | None:
    """A Redis stream entry id `<ms>-<seq>` as a tuple that sorts like the ids, else None."""
    if not text:
        return None
    ms, sep, seq = text.partition("-")
    if not sep or not ms.isdigit() or not seq.isdigit():
        return None
    return int(ms), int(seq)


def log(message: str) -> None:
    print(f"[soak {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- processes


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL when the soak dies, whatever kills it."""
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class Processes:
    """Every process the soak starts; `stop_all` ends each by its PID (its own session)."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []

    def spawn(
        self, argv: list[str], log_path: Path, env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        # Always from the main thread: PR_SET_PDEATHSIG follows the thread that forked.
        with open(log_path, "ab") as out:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=REPO,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        self.procs.append(proc)
        return proc

    def stop_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 15
        for proc in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(max(0.1, deadline - time.monotonic()))
            # The session this soak created for it (its PID is the group id): any child too.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(5)
        self.procs = [p for p in self.procs if p.poll() is None]


def phase(history: list[tuple[float, str]], at: float) -> str:
    """A process's state at `at` from its ("up"/"down", time) history, as a coarse label."""
    last = None
    for t, what in history:
        if t <= at:
            last = (t, what)
    if last is None or last[1] == "down":
        return "signalled/down"
    age = at - last[0]
    return "up <1s" if age < 1 else "up <5s" if age < 5 else "up"


async def wait_exit(proc: subprocess.Popen[bytes], timeout: float) -> int | None:
    deadline = time.monotonic() + timeout
    while proc.poll() is None:
        if time.monotonic() > deadline:
            return None
        await asyncio.sleep(0.02)
    return proc.returncode


class RedisProc:
    def __init__(self, procs: Processes, workdir: Path) -> None:
        self.procs = procs
        self.dir = workdir / "redis"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.history: list[tuple[float, str]] = []

    def argv(self) -> list[str]:
        return [
            REDIS_SERVER,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--protected-mode",
            "no",
            "--save",
            "",
            "--appendonly",
            "yes",
            "--appendfsync",
            "always",
            "--dir",
            str(self.dir),
        ]

    async def start(self, timeout: float = 30.0) -> None:
        self.proc = self.procs.spawn(self.argv(), self.dir / "redis.log")
        client = aioredis.Redis(port=self.port, socket_timeout=2, socket_connect_timeout=1)
        deadline = time.monotonic() + timeout
        try:
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"redis-server exited with {self.proc.returncode}")
                with contextlib.suppress(RedisError, OSError):
                    if await client.ping():
                        self.history.append((time.monotonic(), "up"))
                        return
                if time.monotonic() > deadline:
                    raise RuntimeError("redis-server did not answer PING")
                await asyncio.sleep(0.05)
        finally:
            await client.aclose()

    async def kill(self) -> None:
        assert self.proc is not None
        self.history.append((time.monotonic(), "down"))
        self.proc.kill()
        await wait_exit(self.proc, 10)

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


class GatewayProc:
    def __init__(
        self, procs: Processes, workdir: Path, name: str, redis_port: int, args: argparse.Namespace
    ) -> None:
        self.procs = procs
        self.name = name
        self.port = free_port()
        self.log_path = workdir / f"{name}.log"
        self.redis_port = redis_port
        self.args = args
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.history: list[tuple[float, str]] = []

    def argv(self) -> list[str]:
        a = self.args
        return [
            sys.executable,
            "-m",
            "sse_gateway",
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--redis",
            f"redis://127.0.0.1:{self.redis_port}/0",
            "--jwt-secret",
            SECRET,
            "--retry-ms",
            str(a.gateway_retry_ms),
            "--keepalive-period",
            f"{a.keepalive}s",
            "--drain-seconds",
            str(a.drain_seconds),
            "--history-size",
            str(a.history_size),
        ]

    @staticmethod
    def env(src: str = str(REPO / "src")) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(GATEWAY_ENV_PREFIXES)}
        env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        env["PYTHONUNBUFFERED"] = "1"
        return env

    async def start(self, timeout: float = 30.0, *, ready: bool = False) -> None:
        self.starts += 1
        with open(self.log_path, "ab") as out:
            out.write(f"\n===== soak: start #{self.starts} =====\n".encode())
        self.proc = self.procs.spawn(self.argv(), self.log_path, self.env(self.args.gateway_src))
        deadline = time.monotonic() + timeout
        probe = "/readyz" if ready else "/healthz"
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode} at start")
            with contextlib.suppress(OSError, TimeoutError, ValueError):
                if await http_status(self.port, probe) == 200:
                    self.history.append((time.monotonic(), "up"))
                    return
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name}: {probe} not 200 within {timeout}s")
            await asyncio.sleep(0.05)

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, signum: int) -> None:
        assert self.proc is not None
        self.history.append((time.monotonic(), "down"))
        self.proc.send_signal(signum)

    def error_lines(self) -> list[str]:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return []
        return [ln for ln in text.splitlines() if "Traceback" in ln or " ERROR " in ln]


async def http_status(port: int, path: str, timeout: float = 2.0) -> int:
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), timeout)
    try:
        request = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n"
        writer.write(request.encode())
        line = await asyncio.wait_for(reader.readline(), timeout)
        return int(line.split()[1])
    finally:
        writer.close()


# --------------------------------------------------------------------------- the ledger's records


@dataclass(slots=True)
class Published:
    seq: int
    player: int
    sent: float
    acked: float | None = None
    id: str | None = None
    key: Id | None = None
    error: str | None = None
    marker: bool = False


@dataclass(slots=True)
class Connection:
    """One request of a client, from the attempt to the end of its body."""

    port: int
    started: float
    sent_last_id: str | None
    status: int | None = None
    connected_at: float | None = None
    resume_id: str | None = None  # the `id:` of `connected`
    has_resume_field: bool = False
    recovered: bool | None = None
    ended_at: float | None = None
    end: str = "open"
    close_reason: str | None = None
    events: int = 0
    before_connected: int = 0
    final_retry: bool = False  # the last frame was a retry-only block


@dataclass(slots=True)
class Refusal:
    at: float
    port: int
    status: int
    code: str
    content_type: str
    sent_last_id: bool


@dataclass(slots=True)
class Received:
    id: str
    key: Id | None
    conn: int
    at: float


class Stats:
    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.reconnect_gaps: list[float] = []


# --------------------------------------------------------------------------- the client


class EventSourceClient:
    """One browser `EventSource` on one player's stream, on raw asyncio sockets."""

    def __init__(
        self,
        index: int,
        player: int,
        ports: list[int],
        token: str,
        rng: random.Random,
        stats: Stats,
        retry_scale: float,
    ) -> None:
        self.index = index
        self.player = player
        self.ports = ports
        self.token = token
        self.rng = rng
        self.stats = stats
        self.retry_scale = retry_scale
        self.reconnection_ms = DEFAULT_RECONNECT_MS
        self.last_id = ""  # the EventSource's last event ID string
        self.connections: list[Connection] = []
        self.received: list[Received] = []
        self.max_key: Id | None = None  # the highest event id received
        self.position: Id | None = None  # that, or a higher resume id of a `connected`
        self.refusal: Refusal | None = None
        self.live = False
        self.port = 0  # the gateway port of the live stream
        self.lost_at: float | None = None  # when the last live stream ended
        self.stopping = False

    @property
    def gave_up(self) -> bool:
        return self.refusal is not None

    def request(self, port: int) -> bytes:
        lines = [
            f"GET /v1/sse?token={quote(self.token, safe='')} HTTP/1.1",
            f"Host: 127.0.0.1:{port}",
            "Accept: text/event-stream",
            "Cache-Control: no-cache",
        ]
        if self.last_id:
            lines.append(f"Last-Event-ID: {self.last_id}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    async def run(self) -> None:
        while not self.stopping:
            port = self.rng.choice(self.ports)
            conn = Connection(port, time.monotonic(), self.last_id or None)
            self.connections.append(conn)
            self.stats.counts["connection attempts"] += 1
            try:
                await self._one(conn)
            except Exception as exc:  # a bug of this client: counted, and it carries on
                conn.end = f"client error: {exc!r}"[:200]
                self.stats.counts["client errors"] += 1
            except asyncio.CancelledError:
                conn.end = conn.end if conn.end != "open" else "stopped"
                conn.ended_at = time.monotonic()
                self._lost(conn)
                raise
            conn.ended_at = time.monotonic()
            self._lost(conn)
            if self.refusal is not None:
                return
            self.stats.counts[f"end: {conn.end}"] += 1
            await asyncio.sleep(self.reconnection_ms / 1000 * self.retry_scale)

    def _lost(self, conn: Connection) -> None:
        if self.live:
            self.live = False
            self.lost_at = conn.ended_at

    async def _one(self, conn: Connection) -> None:
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection("127.0.0.1", conn.port, limit=1 << 20), 5
            )
        except ConnectionRefusedError:
            conn.end = "connect: refused"
            return
        except (OSError, TimeoutError) as exc:
            conn.end = f"connect: {type(exc).__name__}"
            return
        try:
            writer.write(self.request(conn.port))
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
            except asyncio.IncompleteReadError:
                conn.end = "EOF before the response head"
                return
            except TimeoutError:
                conn.end = "no response head within 30s"
                return
            status, headers = parse_head(head)
            conn.status = status
            content_type = headers.get("content-type", "")
            if status != 200 or not content_type.lower().startswith("text/event-stream"):
                body = await read_bounded(reader, headers)
                self._refused(conn, status, content_type, body)
                return
            await self._stream(conn, reader, headers)
        except (ConnectionResetError, BrokenPipeError):
            conn.end = conn.end if conn.end != "open" else "reset"
        except OSError as exc:
            conn.end = conn.end if conn.end != "open" else f"network: {type(exc).__name__}"
        except ValueError as exc:  # a garbled head or chunked framing: a network error for
            conn.end = f"malformed response: {exc}"[:200]  # a browser, a bug for the ledger
            self.stats.counts["malformed responses"] += 1
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    def _refused(self, conn: Connection, status: int, content_type: str, body: bytes) -> None:
        code = ""
        with contextlib.suppress(ValueError, AttributeError):
            code = str(json.loads(body).get("error", ""))
        if status == 200:
            code = f"content-type {content_type!r}"
        conn.end = f"refused {status} {code}"
        self.refusal = Refusal(
            time.monotonic(), conn.port, status, code, content_type, conn.sent_last_id is not None
        )

    async def _stream(
        self, conn: Connection, reader: asyncio.StreamReader, headers: dict[str, str]
    ) -> None:
        chunked = _ChunkedDecoder() if "chunked" in headers.get("transfer-encoding", "") else None
        parser = SSEParser()
        index = len(self.connections) - 1
        while True:
            data = await reader.read(65536)
            if not data:
                for block in parser.feed_eof():
                    self._block(conn, index, block)
                conn.end = self._end("EOF", conn)
                return
            if chunked is not None:
                data = chunked.feed(data)
            for block in parser.feed(data):
                self._block(conn, index, block)
            if chunked is not None and chunked.done:
                conn.end = self._end("end of chunked body", conn)
                return

    @staticmethod
    def _end(how: str, conn: Connection) -> str:
        if conn.close_reason is not None:
            how = f"close frame ({conn.close_reason}), then {how}"
        elif conn.final_retry:
            how = f"retry-only frame, then {how}"
        if conn.connected_at is None:
            how += " (before connected)"
        return how

    def _block(self, conn: Connection, index: int, block: SSEEvent) -> None:
        now = time.monotonic()
        if block.retry is not None:
            self.reconnection_ms = block.retry
        if block.id is not None:  # dispatch sets the last event ID string (Chromium keeps it)
            self.last_id = block.id
        conn.final_retry = block.is_retry_only
        if not block.has_data:
            if block.retry is not None:
                self.stats.counts["retry-only frames"] += 1
            return
        if block.event == "connected":
            self._connected(conn, block, now)
        elif block.event == "heartbeat":
            self.stats.counts["heartbeats"] += 1
        elif block.event == "close":
            with contextlib.suppress(ValueError, AttributeError):
                conn.close_reason = str(block.json().get("reason"))
            self.stats.counts[f"close frames: {conn.close_reason}"] += 1
        elif block.event in (EVENT_TYPE, MARKER_TYPE):
            if conn.connected_at is None:
                conn.before_connected += 1
                self.stats.counts["events before connected"] += 1
            conn.events += 1
            key = parse_id(block.id)
            self.received.append(Received(block.id or "", key, index, now))
            if key is not None and (self.max_key is None or key > self.max_key):
                self.max_key = key
            if key is not None and (self.position is None or key > self.position):
                self.position = key
        else:
            self.stats.counts[f"other events: {block.event}"] += 1

    def _connected(self, conn: Connection, block: SSEEvent, now: float) -> None:
        if conn.connected_at is not None:
            self.stats.counts["second connected on one stream"] += 1
            return
        conn.connected_at = now
        conn.resume_id = block.id
        conn.has_resume_field = block.id is not None
        resume = parse_id(block.id)
        if resume is not None and (self.position is None or resume > self.position):
            self.position = resume
        with contextlib.suppress(ValueError, AttributeError):
            recovered = block.json().get("recovered")
            conn.recovered = recovered if isinstance(recovered, bool) else None
        if conn.sent_last_id is not None and conn.recovered is None:
            self.stats.counts["connected without recovered after Last-Event-ID"] += 1
        self.stats.counts["connected"] += 1
        if self.lost_at is not None:
            self.stats.reconnect_gaps.append(now - self.lost_at)
            self.lost_at = None
        self.live = True
        self.port = conn.port


def parse_head(head: bytes) -> tuple[int, dict[str, str]]:
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/"):
        raise ValueError(f"not an HTTP response: {lines[0]!r}")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name:
            headers[name.strip().lower()] = value.strip()
    return int(parts[1]), headers


async def read_bounded(reader: asyncio.StreamReader, headers: dict[str, str]) -> bytes:
    """An error body: by Content-Length, chunked, or until EOF; 2 s at most."""
    out = bytearray()
    chunked = _ChunkedDecoder() if "chunked" in headers.get("transfer-encoding", "") else None
    length = headers.get("content-length")
    deadline = time.monotonic() + 2
    with contextlib.suppress(OSError, TimeoutError):
        while time.monotonic() < deadline:
            if length is not None and len(out) >= int(length):
                break
            data = await asyncio.wait_for(reader.read(65536), deadline - time.monotonic())
            if not data:
                break
            if chunked is not None:
                out += chunked.feed(data)
                if chunked.done:
                    break
            else:
                out += data
    return bytes(out)


# --------------------------------------------------------------------------- publisher


class Publisher:
    """EVALSHA of the shipped publish.lua at a steady rate; no retry of a failed call."""

    def __init__(self, redis_port: int, script: str, args: argparse.Namespace) -> None:
        self.script = script
        self.sha = ""
        self.args = args
        self.client = aioredis.Redis(
            port=redis_port,
            socket_timeout=5,
            socket_connect_timeout=2,
            retry=Retry(NoBackoff(), 0),
            max_connections=args.max_inflight + 4,
        )
        self.events: list[Published] = []
        self.errors: Counter[str] = Counter()
        self.rng = random.Random(f"{args.seed}-publisher")
        self.inflight: set[asyncio.Task[None]] = set()
        self.skipped = 0
        self.cum_weights: list[float] = []

    async def load(self) -> None:
        self.sha = str(await self.client.script_load(self.script))

    async def publish(self, player: int, *, marker: bool = False) -> Published:
        seq = len(self.events)
        event = Published(seq, player, time.monotonic(), marker=marker)
        self.events.append(event)
        channel = f"SSE::{BRAND}::p{player}"
        kind = MARKER_TYPE if marker else EVENT_TYPE
        argv = (channel, kind, json.dumps({"seq": seq}), self.args.history_size, 86400)
        try:
            try:
                reply = await self.client.evalsha(self.sha, 1, *argv)
            except NoScriptError:  # did not run: load the script and send the call again
                self.sha = str(await self.client.script_load(self.script))
                reply = await self.client.evalsha(self.sha, 1, *argv)
        except (RedisError, OSError) as exc:
            name = type(exc).__name__
            if isinstance(exc, ResponseError):
                name += ": " + str(exc).split(" ", 1)[0]
            event.error = name
            self.errors[name] += 1
            return event
        raw = reply[0]
        event.id = raw.decode() if isinstance(raw, bytes) else str(raw)
        event.key = parse_id(event.id)
        event.acked = time.monotonic()
        return event

    async def run(self, players: int, stop: asyncio.Event) -> None:
        # Zipf-like: player k gets a share of 1/(k+1)^skew; a few hot, many rarely published to.
        weights = [1.0 / (k + 1) ** self.args.skew for k in range(players)]
        self.cum_weights = list(itertools.accumulate(weights))
        interval = 1.0 / self.args.rate
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        while not stop.is_set():
            next_at += interval
            delay = next_at - loop.time()
            if delay > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay)
                if stop.is_set():
                    break
            if len(self.inflight) >= self.args.max_inflight:
                self.skipped += 1
                continue
            player = self.rng.choices(range(players), cum_weights=self.cum_weights)[0]
            task = asyncio.create_task(self.publish(player))
            self.inflight.add(task)
            task.add_done_callback(self.inflight.discard)
        if self.inflight:
            await asyncio.gather(*self.inflight, return_exceptions=True)

    async def close(self) -> None:
        await self.client.aclose()


# --------------------------------------------------------------------------- faults


@dataclass(slots=True)
class Fault:
    kind: str
    target: str
    started: float
    ended: float | None = None
    detail: str = ""


class Faults:
    """Seeded random faults; episodes may overlap, but one target has one fault at a time."""

    def __init__(
        self,
        kinds: list[str],
        redis_proc: RedisProc,
        gateways: list[GatewayProc],
        args: argparse.Namespace,
        t0: float,
    ) -> None:
        self.kinds = kinds
        self.redis = redis_proc
        self.gateways = gateways
        self.args = args
        self.t0 = t0
        self.rng = random.Random(f"{args.seed}-faults")
        self.log: list[Fault] = []
        self.anomalies: list[str] = []
        self.busy: set[str] = set()  # targets in an episode: "redis", gateway names
        self.load: Callable[[str], int] = lambda target: 0  # live streams of a target
        self.episodes: set[asyncio.Task[None]] = set()

    def last_before(self, at: float) -> Fault | None:
        """The fault that began last before `at`, within FAULT_WINDOW."""
        found = None
        for fault in self.log:
            if fault.started <= at:
                found = fault
        if found is None or at - found.started > FAULT_WINDOW:
            return None
        return found

    def context(self, at: float) -> str:
        """The faults under way at `at` (or ended within a second), else the last one before."""
        active = [
            f"{f.kind} {f.target}"
            for f in self.log
            if f.started <= at <= (f.ended if f.ended is not None else math.inf) + 1.0
        ]
        if active:
            return "during " + " + ".join(sorted(set(active)))
        last = self.last_before(at)
        return f"after {last.kind} {last.target}" if last is not None else "no fault"

    def targets(self, kind: str) -> list[str]:
        if kind.startswith("gateway-"):
            return [gw.name for gw in self.gateways if gw.name not in self.busy]
        return [] if "redis" in self.busy else ["redis"]

    async def run(self, stop: asyncio.Event) -> None:
        rng = self.rng
        await sleep_or_stop(stop, self.args.warmup)
        round_: list[str] = []
        while not stop.is_set():
            if not round_:
                round_ = list(self.kinds)
                rng.shuffle(round_)
            await self.check_alive()
            kind = next((k for k in reversed(round_) if self.targets(k)), None)
            if kind is None:
                await sleep_or_stop(stop, 0.05)
                continue
            round_.remove(kind)
            targets = self.targets(kind)
            # A gateway is picked in proportion to the streams it holds: where the clients are.
            weights = [self.load(t) + 1 for t in targets]
            target = rng.choices(targets, weights=weights)[0]
            self.busy.add(target)
            down = rng.uniform(0.3, 2.0) if kind == "redis-kill" else rng.uniform(0.2, 1.5)
            task = asyncio.create_task(self.episode(kind, target, down))
            self.episodes.add(task)
            task.add_done_callback(self.episodes.discard)
            if not self.args.overlap:
                await task
            await sleep_or_stop(stop, rng.uniform(self.args.fault_gap_min, self.args.fault_gap_max))
        if self.episodes:
            await asyncio.gather(*self.episodes)
        await self.check_alive()

    async def check_alive(self) -> None:
        """A process that died by itself is an anomaly: noted, and restarted."""
        if "redis" not in self.busy and not self.redis.running():
            assert self.redis.proc is not None
            self.anomalies.append(f"redis-server exited by itself ({self.redis.proc.returncode})")
            await self.redis.start()
        for gw in self.gateways:
            if gw.name not in self.busy and not gw.running():
                assert gw.proc is not None
                self.anomalies.append(f"{gw.name} exited by itself ({gw.proc.returncode})")
                await gw.start()

    async def episode(self, kind: str, target: str, down: float) -> None:
        try:
            await self.inject(kind, target, down)
        except Exception as exc:  # noted; check_alive() restarts what is down
            self.anomalies.append(f"{kind} {target}: {exc!r}")
            log(f"fault {kind} {target} failed: {exc!r}")
        finally:
            self.busy.discard(target)

    async def inject(self, kind: str, target: str, down: float) -> None:
        """One fault; a killed or stopped process comes back after `down` seconds."""
        fault = Fault(kind, target, time.monotonic())
        self.log.append(fault)
        if kind in ("gateway-term", "gateway-kill"):
            gw = next(g for g in self.gateways if g.name == target)
            assert gw.proc is not None
            if kind == "gateway-term":
                gw.signal(signal.SIGTERM)
                code = await wait_exit(gw.proc, self.args.drain_seconds + 10)
                if code is None:
                    self.anomalies.append(f"{gw.name} still running after SIGTERM + drain")
                    gw.proc.kill()
                    code = await wait_exit(gw.proc, 10)
                elif code != 0:
                    self.anomalies.append(f"{gw.name} exited {code} after SIGTERM")
            else:
                gw.signal(signal.SIGKILL)
                code = await wait_exit(gw.proc, 10)
            fault.detail = f"exit {code}, down {down:.2f}s"
            await asyncio.sleep(down)
            await gw.start()
        elif kind == "pubsub-kill":
            admin = aioredis.Redis(
                port=self.redis.port, socket_timeout=5, retry=Retry(NoBackoff(), 0)
            )
            try:
                killed = await admin.execute_command("CLIENT", "KILL", "TYPE", "pubsub")
                fault.detail = f"{killed} connections"
            except (RedisError, OSError) as exc:
                fault.detail = f"failed: {exc!r}"
                self.anomalies.append(f"CLIENT KILL TYPE pubsub failed: {exc!r}")
            finally:
                await admin.aclose()
        elif kind == "redis-kill":
            await self.redis.kill()
            fault.detail = f"down {down:.2f}s"
            await asyncio.sleep(down)
            await self.redis.start()
        else:  # pragma: no cover - argparse checks the names
            raise ValueError(kind)
        fault.ended = time.monotonic()
        log(
            f"fault {kind:<12} {fault.target:<9} at {fault.started - self.t0:7.2f}s "
            f"({fault.ended - fault.started:.2f}s) {fault.detail}"
        )


async def sleep_or_stop(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)


# --------------------------------------------------------------------------- the ledger


@dataclass(slots=True)
class Ledger:
    clients: int = 0
    checked_clients: int = 0
    expected: int = 0
    delivered: int = 0
    losses: int = 0
    duplicates: int = 0
    out_of_order: int = 0
    excused: int = 0
    recovered_false: int = 0
    recovered_true: int = 0
    unacked_delivered: int = 0
    unparsable_ids: int = 0
    missed_after_giving_up: int = 0
    not_caught_up: int = 0
    loss_classes: Counter[str] = field(default_factory=Counter)
    loss_clients: dict[str, set[int]] = field(default_factory=lambda: defaultdict(set))
    samples: list[dict[str, Any]] = field(default_factory=list)
    failing_clients: set[int] = field(default_factory=set)


def check_ledger(
    clients: list[EventSourceClient], published: list[Published], faults: Faults, t0: float
) -> Ledger:
    ledger = Ledger(clients=len(clients))
    acked_by_player: dict[int, list[Published]] = defaultdict(list)
    acked_ids: set[str] = set()
    for event in published:
        if event.key is not None:
            acked_by_player[event.player].append(event)
            acked_ids.add(event.id or "")
    for events in acked_by_player.values():
        events.sort(key=lambda e: e.key or (0, 0))
    for client in clients:
        first = next((c for c in client.connections if c.connected_at is not None), None)
        ledger.delivered += len(client.received)
        for conn in client.connections:
            if conn.recovered is False:
                ledger.recovered_false += 1
            elif conn.recovered is True:
                ledger.recovered_true += 1
        if first is None:
            continue
        ledger.checked_clients += 1
        seen: set[Id] = set()
        highest: Id | None = None
        for item in client.received:
            if item.key is None:
                ledger.unparsable_ids += 1
                continue
            if item.id not in acked_ids:
                ledger.unacked_delivered += 1
            if item.key in seen:
                ledger.duplicates += 1
                _sample(ledger, "duplicate", client, item.id, t0)
                continue
            seen.add(item.key)
            if highest is not None and item.key < highest:
                ledger.out_of_order += 1
                _sample(ledger, "out-of-order", client, item.id, t0)
            else:
                highest = item.key
        floor = parse_id(first.resume_id) if first.has_resume_field else None
        excusers = [c for c in client.connections if c.recovered is False]
        upper: Id | None = client.max_key if client.gave_up else None
        for event in acked_by_player.get(client.player, []):
            key = event.key
            assert key is not None
            if client.gave_up and (upper is None or key > upper):
                ledger.missed_after_giving_up += 1
                continue
            required = key > floor if floor is not None else event.sent >= (first.connected_at or 0)
            if not required:
                continue
            ledger.expected += 1
            if key in seen:
                continue
            if any(_excuses(c, event) for c in excusers):
                ledger.excused += 1
                continue
            ledger.losses += 1
            if not client.gave_up and (client.max_key is None or client.max_key < key):
                ledger.not_caught_up += 1
            label = classify_loss(client, event, faults)
            ledger.loss_classes[label] += 1
            ledger.loss_clients[label].add(client.index)
            _sample(ledger, "loss", client, event.id, t0, label=label, acked=event.acked)
    return ledger


def _excuses(conn: Connection, event: Published) -> bool:
    """A `recovered: false` connection excuses the events it says it cannot give back."""
    key = event.key
    assert key is not None
    lower = parse_id(conn.sent_last_id)
    if lower is not None and key <= lower:
        return False
    if conn.has_resume_field:
        resume = parse_id(conn.resume_id)
        return resume is not None and key <= resume
    return conn.connected_at is not None and event.sent < conn.connected_at


def classify_loss(client: EventSourceClient, event: Published, faults: Faults) -> str:
    """How a lost event was lost: on a live stream, or by which reconnect, and the faults."""
    key = event.key
    acked = event.acked
    assert key is not None and acked is not None
    conns = client.connections
    fault_text = faults.context(acked)
    later = next((r for r in client.received if r.key is not None and r.key > key), None)
    live = next(
        (
            i
            for i, c in enumerate(conns)
            if c.connected_at is not None
            and c.connected_at <= acked
            and (c.ended_at is None or acked < c.ended_at)
        ),
        None,
    )
    if live is not None and later is not None and later.conn == live:
        return f"hole in a live stream (later events came on it); fault: {fault_text}"
    # The stream that should have brought it: the first one connected after it was published.
    nxt_index = next(
        (
            i
            for i, c in enumerate(conns)
            if c.connected_at is not None and c.connected_at >= acked and (live is None or i > live)
        ),
        None,
    )
    if nxt_index is None:
        state = "gave up" if client.gave_up else "no later stream"
        return (
            f"published while the last stream was live, never came ({state}); fault: {fault_text}"
        )
    nxt = conns[nxt_index]
    prev = next((c for c in reversed(conns[:nxt_index]) if c.connected_at is not None), None)
    how = "with" if nxt.sent_last_id else "without"
    rec = f", recovered={str(nxt.recovered).lower()}" if nxt.sent_last_id else ""
    resume = parse_id(nxt.resume_id)
    if not nxt.has_resume_field:
        where = "connected had no id"
    elif resume is not None and key <= resume:
        where = "at or below its connected id"
    else:
        where = "above its connected id, published before it"
    tail = "" if later is not None else "; no later event came"
    ended = prev.end if prev is not None else "?"
    return f"reconnect {how} Last-Event-ID{rec}, {where}, after: {ended}{tail}; fault: {fault_text}"


def _sample(
    ledger: Ledger,
    what: str,
    client: EventSourceClient,
    event_id: str | None,
    t0: float,
    **more: Any,
) -> None:
    ledger.failing_clients.add(client.index)
    if len(ledger.samples) >= 40:
        return
    conns = [
        {
            "port": c.port,
            "t": round(c.started - t0, 3),
            "last_event_id": c.sent_last_id,
            "status": c.status,
            "connected_id": c.resume_id,
            "recovered": c.recovered,
            "end": c.end,
            "events": c.events,
        }
        for c in client.connections
        if c.status is not None
    ]
    acked = more.pop("acked", None)
    entry: dict[str, Any] = {"what": what, "client": client.index, "player": client.player}
    entry["id"] = event_id
    if acked is not None:
        entry["acked_at"] = round(acked - t0, 3)
    entry.update(more)
    entry["connections"] = conns[-6:]
    ledger.samples.append(entry)


# --------------------------------------------------------------------------- the run


def percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)]


async def soak(args: argparse.Namespace, workdir: Path, procs: Processes) -> dict[str, Any]:
    kinds = [k for k in args.faults.split(",") if k]
    if not Path(REDIS_SERVER).exists():
        raise RuntimeError(f"{REDIS_SERVER} not found (`make system-deps` installs it)")
    script_path = subprocess.run(
        [sys.executable, "-m", "sse_gateway", "publish-script", "--path"],
        capture_output=True,
        text=True,
        check=True,
        env=GatewayProc.env(args.gateway_src),
        cwd=REPO,
    ).stdout.strip()
    script = Path(script_path).read_bytes().decode()
    redis_proc = RedisProc(procs, workdir)
    await redis_proc.start()
    gateways = [GatewayProc(procs, workdir, f"gateway-{i}", redis_proc.port, args) for i in (1, 2)]
    await asyncio.gather(*(gw.start(ready=True) for gw in gateways))
    log(
        f"redis :{redis_proc.port} (appendfsync always), gateways :{gateways[0].port} "
        f":{gateways[1].port}, workdir {workdir}"
    )
    publisher = Publisher(redis_proc.port, script, args)
    await publisher.load()
    stats = Stats()
    exp = int(time.time() + args.duration + 3600)
    ports = [gw.port for gw in gateways]
    clients = [
        EventSourceClient(
            i,
            i % args.players,
            ports,
            jwt.encode({"brand_id": BRAND, "sub": f"p{i % args.players}", "exp": exp}, SECRET),
            random.Random(f"{args.seed}-client-{i}"),
            stats,
            args.retry_scale,
        )
        for i in range(args.clients)
    ]
    tasks: list[asyncio.Task[None]] = []
    t0 = time.monotonic()
    faults = Faults(kinds, redis_proc, gateways, args, t0)
    port_of = {gw.name: gw.port for gw in gateways}
    faults.load = lambda target: sum(1 for c in clients if c.live and c.port == port_of.get(target))
    try:
        for client in clients:  # spread over ~1 s, as page loads would be
            tasks.append(asyncio.create_task(client.run()))
            await asyncio.sleep(1.0 / max(1, args.clients))
        await wait_until(lambda: all(c.live or c.gave_up for c in clients), 20)
        log(f"{sum(c.live for c in clients)} of {len(clients)} clients connected")
        stop = asyncio.Event()
        pub_task = asyncio.create_task(publisher.run(args.players, stop))
        fault_task = asyncio.create_task(faults.run(stop) if kinds else stop.wait())
        started = time.monotonic()
        await progress(args, clients, publisher, stop, started)
        stop.set()
        await fault_task  # the fault under way finishes: every process is up again
        await pub_task
        log("faults and publishing stopped; publishing one marker per player, settling")
        for player in range(args.players):
            for _ in range(5):
                if (await publisher.publish(player, marker=True)).key is not None:
                    break
                await asyncio.sleep(0.2)
        last_acked: dict[int, Id] = {}
        for event in publisher.events:
            if event.key is not None and event.key > last_acked.get(event.player, (0, 0)):
                last_acked[event.player] = event.key

        def caught_up() -> bool:
            return all(
                c.gave_up
                or (
                    c.live and (c.player not in last_acked or _ge(c.position, last_acked[c.player]))
                )
                for c in clients
            )

        settled = await wait_until(caught_up, args.settle)
        settle_time = time.monotonic() - started - args.duration
        stuck = [c.index for c in clients if not c.gave_up and not c.live]
        behind = [
            c.index
            for c in clients
            if not c.gave_up
            and c.player in last_acked
            and not _ge(c.position, last_acked[c.player])
        ]
        log(f"settled: {settled} after {settle_time:.1f}s")
    finally:
        for client in clients:
            client.stopping = True
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await publisher.close()
    ledger = check_ledger(clients, publisher.events, faults, t0)
    figures = report(args, clients, publisher, faults, stats, ledger, gateways)
    figures.update(settled=settled, settle_seconds=round(settle_time, 2), stuck_clients=len(stuck))
    figures["behind_clients"] = behind[:50]
    gave_up = {c.index for c in clients if c.gave_up}
    failing = sorted(set(stuck) | set(behind) | ledger.failing_clients | gave_up)
    if failing:
        dump = workdir / "ledger-failures.json"
        dump.write_text(json.dumps([client_dump(clients[i], t0) for i in failing[:20]], indent=1))
        log(f"the ledgers of {min(20, len(failing))} failing clients: {dump}")
    figures["clean"] = figures["clean"] and not stuck
    return figures


def client_dump(client: EventSourceClient, t0: float) -> dict[str, Any]:
    """Everything one client saw, for reading a failure by hand."""
    return {
        "client": client.index,
        "player": client.player,
        "live": client.live,
        "refusal": None if client.refusal is None else vars_of(client.refusal, t0),
        "connections": [vars_of(c, t0) for c in client.connections],
        "received": [(r.id, r.conn, round(r.at - t0, 3)) for r in client.received],
    }


def vars_of(record: Any, t0: float) -> dict[str, Any]:
    out = {}
    for name in record.__slots__:
        value = getattr(record, name)
        if isinstance(value, float) and name in ("started", "connected_at", "ended_at", "at"):
            value = round(value - t0, 3)
        out[name] = value
    return out


def _ge(a: Id | None, b: Id) -> bool:
    return a is not None and a >= b


async def wait_until(predicate: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.1)
    return True


async def progress(
    args: argparse.Namespace,
    clients: list[EventSourceClient],
    publisher: Publisher,
    stop: asyncio.Event,
    started: float,
) -> None:
    next_report = started + 10
    while (now := time.monotonic()) < started + args.duration:
        await asyncio.sleep(min(0.5, started + args.duration - now))
        if time.monotonic() >= next_report:
            next_report += 10
            acked = sum(1 for e in publisher.events if e.key is not None)
            log(
                f"{time.monotonic() - started:5.0f}s: published {len(publisher.events)}, "
                f"acked {acked}, live clients {sum(c.live for c in clients)}, "
                f"gave up {sum(c.gave_up for c in clients)}"
            )


def report(
    args: argparse.Namespace,
    clients: list[EventSourceClient],
    publisher: Publisher,
    faults: Faults,
    stats: Stats,
    ledger: Ledger,
    gateways: list[GatewayProc],
) -> dict[str, Any]:
    refusals = [c.refusal for c in clients if c.refusal is not None]
    refused_by: Counter[str] = Counter()
    for refusal in refusals:
        lei = "with" if refusal.sent_last_id else "without"
        gw = next(g for g in gateways if g.port == refusal.port)
        state = (
            f"redis {phase(faults.redis.history, refusal.at)}, "
            f"that gateway {phase(gw.history, refusal.at)}"
        )
        refused_by[f"{refusal.status} {refusal.code} ({lei} Last-Event-ID); {state}"] += 1
    connections = [c for cl in clients for c in cl.connections]
    ends: Counter[str] = Counter(c.end for c in connections if c.end != "stopped")
    gaps = stats.reconnect_gaps
    acked = [e for e in publisher.events if e.key is not None]
    gateway_errors = {gw.name: gw.error_lines()[:20] for gw in gateways}
    figures: dict[str, Any] = {
        "seed": args.seed,
        "duration": args.duration,
        "players": args.players,
        "clients": args.clients,
        "rate": args.rate,
        "faults_enabled": args.faults,
        "events_published": len(publisher.events),
        "events_acked": len(acked),
        "publish_errors": dict(publisher.errors),
        "publish_skipped_backpressure": publisher.skipped,
        "deliveries": ledger.delivered,
        "expected_deliveries": ledger.expected,
        "faults": dict(Counter(f.kind for f in faults.log)),
        "fault_log": [
            {
                "kind": f.kind,
                "target": f.target,
                "at": round(f.started - faults.t0, 3),
                "took": round((f.ended or f.started) - f.started, 3),
                "detail": f.detail,
            }
            for f in faults.log
        ],
        "anomalies": faults.anomalies,
        "connections": stats.counts["connected"],
        "connection_attempts": len(connections),
        "reconnects": len(connections) - len(clients),
        "connection_ends": dict(ends.most_common()),
        "refused": len(refusals),
        "refused_by": dict(refused_by.most_common()),
        "clients_gave_up": sum(c.gave_up for c in clients),
        "losses": ledger.losses,
        "loss_classes": dict(ledger.loss_classes.most_common()),
        "loss_clients": {k: len(v) for k, v in ledger.loss_clients.items()},
        "duplicates": ledger.duplicates,
        "out_of_order": ledger.out_of_order,
        "recovered_false": ledger.recovered_false,
        "recovered_true": ledger.recovered_true,
        "excused_by_recovered_false": ledger.excused,
        "unacked_delivered": ledger.unacked_delivered,
        "unparsable_ids": ledger.unparsable_ids,
        "missed_after_giving_up": ledger.missed_after_giving_up,
        "not_caught_up": ledger.not_caught_up,
        "max_reconnect_seconds": round(max(gaps, default=0.0), 3),
        "p99_reconnect_seconds": round(percentile(gaps, 0.99), 3),
        "p50_reconnect_seconds": round(percentile(gaps, 0.5), 3),
        "connected_without_id": sum(
            1 for c in connections if c.connected_at is not None and not c.has_resume_field
        ),
        "counts": dict(stats.counts.most_common()),
        "gateway_error_lines": gateway_errors,
        "samples": ledger.samples,
    }
    figures["protocol_violations"] = {
        k: v for k, v in stats.counts.items() if k in PROTOCOL_VIOLATIONS
    }
    figures["clean"] = (
        figures["losses"] == 0
        and figures["refused"] == 0
        and figures["duplicates"] == 0
        and figures["out_of_order"] == 0
        and not figures["protocol_violations"]
    )
    return figures


def print_figures(f: dict[str, Any]) -> None:
    def line(name: str, value: Any) -> None:
        print(f"  {name:<34} {value}")

    def block(title: str, items: Iterable[tuple[str, Any]]) -> None:
        items = list(items)
        if items:
            print(f"  {title}:")
            for key, value in items:
                print(f"      {value:>7}  {key}")

    print("=" * 78)
    print(
        f"soak: seed {f['seed']}, {f['duration']} s, {f['clients']} clients on "
        f"{f['players']} players, {f['rate']} ev/s, faults {f['faults_enabled'] or 'none'}"
    )
    line("events published / acked", f"{f['events_published']} / {f['events_acked']}")
    line("publish errors (not acked)", sum(f["publish_errors"].values()))
    block("publish errors", f["publish_errors"].items())
    line("deliveries (expected)", f"{f['deliveries']} ({f['expected_deliveries']})")
    line("delivered, not acked", f["unacked_delivered"])
    line("faults", ", ".join(f"{k} {v}" for k, v in sorted(f["faults"].items())) or "none")
    line("connections (connected)", f["connections"])
    line("reconnects (attempts after first)", f["reconnects"])
    block("how connections ended", f["connection_ends"].items())
    line("connected frames without id", f["connected_without_id"])
    line("refused (non-200) answers", f["refused"])
    block("refused", f["refused_by"].items())
    line("losses", f["losses"])
    block("loss classes (events)", f["loss_classes"].items())
    block("loss classes (clients)", f["loss_clients"].items())
    line("duplicates", f["duplicates"])
    line("out-of-order", f["out_of_order"])
    line("recovered:false (true)", f"{f['recovered_false']} ({f['recovered_true']})")
    line("excused by recovered:false", f["excused_by_recovered_false"])
    line("missed after giving up", f["missed_after_giving_up"])
    line("events not caught up at the end", f["not_caught_up"])
    line("clients stuck at the end", f["stuck_clients"])
    block("protocol violations", f["protocol_violations"].items())
    line("settled", f"{f['settled']} ({f['settle_seconds']} s)")
    line(
        "reconnect time max / p99 / p50",
        f"{f['max_reconnect_seconds']} / {f['p99_reconnect_seconds']} / "
        f"{f['p50_reconnect_seconds']} s",
    )
    for anomaly in f["anomalies"]:
        line("anomaly", anomaly)
    for name, lines in f["gateway_error_lines"].items():
        if lines:
            line(f"{name} error lines", len(lines))
    print(f"  RESULT: {'CLEAN' if f['clean'] else 'FAILED'}")
    print("=" * 78, flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Soak two gateways and Redis under faults with EventSource-like clients."
    )
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--duration", type=float, default=120.0, help="seconds of publishing")
    p.add_argument("--players", type=int, default=100)
    p.add_argument("--clients", type=int, default=400)
    p.add_argument("--rate", type=float, default=100.0, help="events per second")
    p.add_argument(
        "--skew",
        type=float,
        default=1.0,
        help="player k gets a share 1/(k+1)^skew of the events (0: uniform)",
    )
    p.add_argument(
        "--faults",
        default=",".join(FAULT_KINDS),
        help=f"comma-separated, of {','.join(FAULT_KINDS)} (empty: none)",
    )
    p.add_argument("--json", type=Path, default=None, help="write the figures here")
    p.add_argument("--retry-scale", type=float, default=0.1, help="multiplies every retry")
    p.add_argument("--gateway-retry-ms", type=int, default=1000, help="the gateways' SSE_RETRY_MS")
    p.add_argument("--keepalive", type=float, default=2.0, help="heartbeat interval, seconds")
    p.add_argument("--drain-seconds", type=float, default=5.0)
    p.add_argument("--history-size", type=int, default=100)
    p.add_argument("--fault-gap-min", type=float, default=0.5, help="seconds between faults")
    p.add_argument("--fault-gap-max", type=float, default=3.0)
    p.add_argument(
        "--overlap",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="a fault may begin while another is under way (on another target)",
    )
    p.add_argument("--warmup", type=float, default=2.0, help="seconds before the first fault")
    p.add_argument("--settle", type=float, default=30.0, help="seconds to catch up at the end")
    p.add_argument("--max-inflight", type=int, default=32, help="publishes in flight at most")
    p.add_argument("--keep", action="store_true", help="keep the work directory and logs")
    p.add_argument(
        "--gateway-src",
        default=str(REPO / "src"),
        help="the directory holding the sse_gateway package the gateways run (PYTHONPATH); "
        "a snapshot (`git archive HEAD src | tar -x -C DIR`, then DIR/src) while src/ is being "
        "edited: a gateway restarted mid-run loads whatever is on disk",
    )
    args = p.parse_args(argv)
    bad = [k for k in args.faults.split(",") if k and k not in FAULT_KINDS]
    if bad:
        p.error(f"unknown faults {bad}; choose from {','.join(FAULT_KINDS)}")
    if args.players < 1 or args.clients < 1 or args.rate <= 0 or args.duration <= 0:
        p.error("--players, --clients, --rate and --duration must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="sse-soak-"))
    procs = Processes()
    figures: dict[str, Any] | None = None
    status = 2

    async def run() -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            loop.add_signal_handler(signum, task.cancel)
        return await soak(args, workdir, procs)

    try:
        figures = asyncio.run(run())
        status = 0 if figures["clean"] else 1
    except (KeyboardInterrupt, asyncio.CancelledError):
        log("interrupted")
        status = 130
    except Exception as exc:
        log(f"the soak could not run: {exc!r}")
        import traceback

        traceback.print_exc()
        status = 2
    finally:
        procs.stop_all()
    if figures is not None:
        print_figures(figures)
        if args.json is not None:
            args.json.write_text(json.dumps(figures, indent=2, sort_keys=True))
    if status == 0 and not args.keep and not (workdir / "ledger-failures.json").exists():
        shutil.rmtree(workdir, ignore_errors=True)
    else:
        log(f"logs kept in {workdir}")
    return status


if __name__ == "__main__":
    sys.exit(main())
