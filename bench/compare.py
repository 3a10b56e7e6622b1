#!/usr/bin/env python3
"""Side-by-side benchmark: sse-gateway against nchan and the usual Python pattern.

Every system does the same job: one SSE stream per player at a per-player URL or channel,
events published for random players. On loopback, one system at a time, the server pinned to
CPU 0 (`taskset`), Redis, the publishers, the load client and this script on CPU 1:

  sse-gateway        python -m sse_gateway serve --redis ... --jwt-secret ... (JWT per stream)
  sse-gateway -w2    the same with --workers 2 (both workers on CPU 0)
  nchan (memory)     nginx + nchan, `nchan_subscriber eventsource` at /sub/<player>
  nchan (Redis)      the same with `nchan_redis_pass` to a Redis upstream
  sse-starlette      sse-starlette under uvicorn, one redis-py Pub/Sub per client (JWT too)

Scenarios: idle RSS per connection (1k and N; sse-gateway --workers 3 also at 50k), connect
storm, saturation (max deliveries/s received), latency p50/p99/p99.9 at fixed rates, reconnect
storm with Last-Event-ID replay (10 missed events per client), heartbeat CPU (15 s and 1 s).
Writes docs/comparison.md, plots under docs/img/ and the raw figures as JSON.

    .venv/bin/python bench/compare.py              # N = 10,000, about 15-20 minutes
    .venv/bin/python bench/compare.py --quick      # smoke: 200 connections, about 2 minutes
    make bench                                     # installs what is missing, then the above

Installs what it needs when missing (as root, Debian): nginx, libnginx-mod-nchan and
redis-server with apt-get; sse-starlette, uvicorn, redis, PyJWT and matplotlib in a separate
venv, bench/.venv-peers. Every process it starts is stopped when it ends (process groups,
parent-death signals, try/finally).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from types import FrameType
from typing import Any

import jwt
import loadclient
import redis
import run as gw
from loadclient import ClientConfig, LoadClient, PhaseStats

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
PEERS = BENCH / "peers"
PEER_VENV = BENCH / ".venv-peers"
PEER_PYTHON = PEER_VENV / "bin" / "python"
DOCS = REPO / "docs"
NCHAN_MODULE = Path("/usr/lib/nginx/modules/ngx_nchan_module.so")
PUBLISH_LUA = REPO / "src" / "sse_gateway" / "lua" / "publish.lua"
BRAND = "bench"
DASH = "\u2013"  # shown for a missing figure
TIMES = "\u00d7"
MISSED = 10  # events each client misses in the reconnect storm
OVERLOAD_FACTOR = 2.5  # latency rates above this many times the saturation rate are skipped
HISTORY = 100  # sse-gateway history size = nchan message buffer length


class SetupError(RuntimeError):
    pass


_T0 = time.monotonic()


def say(*parts: object, flush: bool = True) -> None:
    """Progress line, prefixed with the minutes:seconds since the start."""
    t = int(time.monotonic() - _T0)
    print(f"[{t // 60:02d}:{t % 60:02d}]", *parts, flush=True)


# --------------------------------------------------------------------------- load client hooks
# loadclient.Worker builds `GET /v1/sse` with a token for every connection. The peers need
# other requests (nchan: GET /sub/<player>, no token) and the replay storm a Last-Event-ID per
# player, so the request of connection i comes from REQUEST_BUILDER when it is set. It is set
# in this process before LoadClient.start() forks the workers, which inherit it.

RequestBuilder = Callable[[ClientConfig, int], bytes]
REQUEST_BUILDER: RequestBuilder | None = None
_original_make_requests = loadclient.Worker.make_requests


def _make_requests(self: loadclient.Worker) -> None:
    if REQUEST_BUILDER is None:
        _original_make_requests(self)
        return
    self.requests = [REQUEST_BUILDER(self.conf, i) for i in range(self.lo, self.hi)]


loadclient.Worker.make_requests = _make_requests  # type: ignore[method-assign]


class HeadersConnectedClient(loadclient.SSEClient):
    """nchan writes no `connected` event: its stream counts as connected at its 200 headers
    (nchan subscribes before it answers, and writes `: hi` right after)."""

    __slots__ = ()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.state == 1 and not self.is_connected:
            super().data_received(b"event: connected\n\n")


def token_request(
    path: str, last_ids: dict[int, str] | None = None
) -> Callable[[ClientConfig, int], bytes]:
    """`GET <path>` with a JWT (sse-gateway, sse-starlette)."""

    def build(conf: ClientConfig, i: int) -> bytes:
        claims = {
            "brand_id": conf.brand,
            "sub": loadclient.player_id(conf.player_prefix, i),
            "exp": int(time.time()) + conf.token_ttl,
        }
        token = jwt.encode(claims, conf.jwt_secret, algorithm="HS256")
        extra = ""
        if last_ids is not None and i in last_ids:
            extra = f"Last-Event-ID: {last_ids[i]}\r\n"
        return (
            f"GET {path} HTTP/1.1\r\nHost: {conf.host}:{conf.port}\r\n"
            f"Authorization: Bearer {token}\r\nAccept: text/event-stream\r\n"
            f"Cache-Control: no-cache\r\n{extra}\r\n"
        ).encode("ascii")

    return build


def nchan_request(last_ids: dict[int, str] | None = None) -> Callable[[ClientConfig, int], bytes]:
    """`GET /sub/<player>` (nchan: the channel is in the URL, no auth)."""

    def build(conf: ClientConfig, i: int) -> bytes:
        extra = ""
        if last_ids is not None and i in last_ids:
            extra = f"Last-Event-ID: {last_ids[i]}\r\n"
        player = loadclient.player_id(conf.player_prefix, i)
        return (
            f"GET /sub/{player} HTTP/1.1\r\nHost: {conf.host}:{conf.port}\r\n"
            f"Accept: text/event-stream\r\nCache-Control: no-cache\r\n{extra}\r\n"
        ).encode("ascii")

    return build


# --------------------------------------------------------------------------- installation


def _run_quiet(cmd: list[str], timeout: float, env: dict[str, str] | None = None) -> None:
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=timeout, env=env, stdin=subprocess.DEVNULL
    )
    if proc.returncode != 0:
        raise SetupError(f"{shlex.join(cmd)} failed:\n{(proc.stdout + proc.stderr)[-3000:]}")


def ensure_system_packages() -> None:
    """nginx + libnginx-mod-nchan + redis-server from Debian, when missing (root only)."""
    missing = []
    if shutil.which("nginx") is None:
        missing.append("nginx")
    if not NCHAN_MODULE.exists():
        missing.append("libnginx-mod-nchan")
    if shutil.which("redis-server") is None:
        missing.append("redis-server")
    if not missing:
        return
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise SetupError(f"missing {' '.join(missing)}: install them (Debian: apt-get install)")
    print(f"installing {' '.join(missing)} with apt-get ...", flush=True)
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    # Packages must not start their services (nginx would listen on 0.0.0.0:80): a
    # policy-rc.d that refuses is put in place for the install when there is none.
    policy = Path("/usr/sbin/policy-rc.d")
    made_policy = False
    if not policy.exists():
        policy.write_text(
            "#!/bin/sh\n# bench/compare.py: no service starts during install\nexit 101\n"
        )
        policy.chmod(0o755)
        made_policy = True
    try:
        _run_quiet(["apt-get", "update", "-q"], 600, env)
        _run_quiet(
            ["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing], 900, env
        )
    finally:
        if made_policy:
            policy.unlink(missing_ok=True)


def ensure_peer_venv() -> None:
    """bench/.venv-peers with bench/requirements-peers.txt (reinstalled when it changes)."""
    req = BENCH / "requirements-peers.txt"
    digest = hashlib.sha256(req.read_bytes()).hexdigest()
    marker = PEER_VENV / ".installed"
    if PEER_PYTHON.exists() and marker.exists() and marker.read_text().strip() == digest:
        return
    print("creating bench/.venv-peers (sse-starlette, uvicorn, redis, matplotlib) ...", flush=True)
    base = shutil.which("python3") or sys.executable
    if not PEER_PYTHON.exists():
        _run_quiet([base, "-m", "venv", str(PEER_VENV)], 300)
    _run_quiet([str(PEER_PYTHON), "-m", "pip", "install", "-q", "--upgrade", "pip"], 600)
    _run_quiet([str(PEER_PYTHON), "-m", "pip", "install", "-q", "-r", str(req)], 900)
    marker.write_text(digest + "\n")


# --------------------------------------------------------------------------- helpers


def _version_of(cmd: list[str], pattern: str = "") -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    text = (out.stdout + out.stderr).strip()
    if pattern and pattern in text:
        text = text.split(pattern, 1)[1].split()[0]
    return text.splitlines()[0] if text else "?"


def versions() -> dict[str, str]:
    info: dict[str, str] = {}
    info["nginx"] = _version_of(["nginx", "-v"], "nginx/")
    info["libnginx-mod-nchan"] = _version_of(
        ["dpkg-query", "-W", "-f", "${Version}", "libnginx-mod-nchan"]
    )
    if PEER_PYTHON.exists():
        code = (
            "from importlib import metadata as m\n"
            "for d in ('sse-starlette','starlette','uvicorn','redis','hiredis','uvloop',"
            "'httptools','PyJWT','matplotlib'):\n"
            "    try: print(d, m.version(d))\n"
            "    except m.PackageNotFoundError: print(d, '-')\n"
        )
        try:
            out = subprocess.run(
                [str(PEER_PYTHON), "-c", code], capture_output=True, text=True, timeout=30
            ).stdout
            for line in out.splitlines():
                name, _, ver = line.partition(" ")
                info[f"peer venv: {name}"] = ver
        except (OSError, subprocess.TimeoutExpired):
            pass
    return info


def _wait_http(port: int, path: str, svc: gw.Service, limit: float = 30.0) -> None:
    deadline = time.monotonic() + limit
    last = ""
    while time.monotonic() < deadline:
        if not svc.alive():
            raise SetupError(f"{svc.name} exited with {svc.proc.poll()}:\n{svc.log_tail()}")
        try:
            status, body = gw.http_get(port, path, timeout=1.0)
            if status == 200:
                return
            last = f"{status} {body[:200]}"
        except OSError as exc:
            last = str(exc)
        time.sleep(0.1)
    raise SetupError(f"{svc.name} not ready within {limit:.0f} s ({last}):\n{svc.log_tail()}")


def _redis_client(url: str) -> redis.Redis:
    return redis.Redis.from_url(url, socket_timeout=30)


class Sampler(gw.CpuSampler):
    """gw.CpuSampler sampled by a thread every 0.25 s (paused while the load client forks)."""

    def __init__(self, server_pid: int, redis_pid: int) -> None:
        super().__init__(server_pid, redis_pid)
        self.lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def sample(self) -> None:
        with self.lock:
            super().sample()
            if len(self.samples) > 20_000:
                del self.samples[:10_000]

    def _loop(self) -> None:
        while not self._stop.wait(0.25):
            self.sample()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5.0)


def cpu_dict(w: gw.CpuWindow, *ours: float) -> dict[str, Any]:
    d = asdict(w)
    d["others"] = w.others(*ours) if not math.isnan(w.process_pct) else math.nan
    return d


# --------------------------------------------------------------------------- systems


class System:
    """One system under test: starts its processes, knows how to connect and publish to it."""

    key = ""
    label = ""
    kind = ""  # gateway | nchan | starlette
    uses_redis = True
    replay = ""  # how it replays: history | buffer | none
    default_workers = 1
    switch_keepalive = False  # the keep-alive can be switched to 1 s on the running instance
    # saturation phase: 0 = publish as fast as the system takes it (closed loop); else a fixed
    # rate above the system's capacity
    flood_rate = 0.0

    def __init__(self, h: Harness, keepalive: float, workers: int = 0, tag: str = "") -> None:
        self.h = h
        self.keepalive = keepalive
        self.workers = workers or self.default_workers
        self.port = gw.free_port()
        self.logdir = h.logdir / f"{self.key}{tag}-{int(time.time() * 1000) % 10**8}"
        self.logdir.mkdir(parents=True, exist_ok=True)
        self.services: list[gw.Service] = []
        self.server: gw.Service | None = None
        self.redis: gw.Service | None = None
        self.redis_url = ""
        self.command = ""
        self.connected_on_headers = False

    # -- lifecycle
    def start(self) -> None:
        if self.uses_redis:
            port = gw.free_port()
            self.redis = gw.start_redis(port, self.logdir)
            self.services.append(self.redis)
            self.redis_url = f"redis://127.0.0.1:{port}"
            r = _redis_client(self.redis_url)
            try:
                r.config_set("maxclients", 19_000)
            except redis.RedisError:
                pass
            finally:
                r.close()
        self._start_server()

    def _start_server(self) -> None:
        raise NotImplementedError

    def stop(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for svc in reversed(self.services):
            svc.stop()
        if self.server is not None:
            out = {
                "exit_code": self.server.exit_code,
                "stop_s": self.server.stop_seconds,
                "log_findings": self.log_findings(),
            }
        self.services.clear()
        return out

    def log_findings(self) -> list[str]:
        return gw.log_findings(self.server.log_path) if self.server else []

    @property
    def server_pid(self) -> int:
        assert self.server is not None
        return self.server.pid

    @property
    def redis_pid(self) -> int:
        return self.redis.pid if self.redis is not None else 0

    def taskset(self) -> list[str]:
        return ["taskset", "-c", self.h.server_cpus] if self.h.server_cpus else []

    # -- clients
    def builder(self, last_ids: dict[int, str] | None = None) -> RequestBuilder:
        return token_request("/v1/sse", last_ids)

    # -- publishing
    def publish_cmd(self, players: int, rate: float, duration: float) -> list[str]:
        cmd = [
            sys.executable,
            str(BENCH / "publisher.py"),
            "--redis",
            self.redis_url,
            "--players",
            str(players),
            "--rate",
            f"{rate:g}",
            "--duration",
            f"{duration:g}",
            "--json",
        ]
        if rate == 0:
            cmd += ["--max-backlog", "2000000"]
        return cmd

    def publish_each(self, players: int, each: int) -> tuple[dict[int, str], dict[str, Any]]:
        """`each` events to every player, stored for replay when the system can. Returns the id
        of each player's last event (empty when there are no ids) and counts."""
        raise NotImplementedError


class Gateway(System):
    key = "gateway"
    label = "sse-gateway"
    kind = "gateway"
    replay = "history"

    def __init__(self, h: Harness, keepalive: float, workers: int = 0, tag: str = "") -> None:
        super().__init__(h, keepalive, workers, tag)
        if self.workers > 1:
            self.label = f"sse-gateway --workers {self.workers}"

    def _start_server(self) -> None:
        prefix = [sys.executable, "-m", "sse_gateway"]
        args = [
            "serve",
            "--redis",
            self.redis_url,
            "--jwt-secret",
            self.h.secret,
            "--port",
            str(self.port),
            "--host",
            "127.0.0.1",
            "--log-level",
            "WARNING",
            "--keepalive-period",
            f"{self.keepalive:g}",
            "--history-size",
            str(HISTORY),
        ]
        if self.workers > 1:
            args += ["--workers", str(self.workers), "--connection-limit", "60000"]
        shown = [*self.taskset(), *prefix, *args]
        shown[shown.index(self.h.secret)] = "<secret>"
        self.command = shlex.join(shown)
        self.server = gw.start_gateway(prefix, args, self.port, self.logdir, self.h.server_cpus)
        self.services.append(self.server)

    def publish_each(self, players: int, each: int) -> tuple[dict[int, str], dict[str, Any]]:
        return redis_publish_each(self.redis_url, players, each, lua=True)


class GatewayW2(Gateway):
    key = "gateway-w2"
    label = "sse-gateway --workers 2"
    default_workers = 2


class Nchan(System):
    key = "nchan-memory"
    label = "nchan (memory)"
    kind = "nchan"
    uses_redis = False
    replay = "buffer"
    publisher_conns = 64  # the fastest of 8/64/256/512/1024 in trials (2,000 streams)

    def __init__(self, h: Harness, keepalive: float, workers: int = 0, tag: str = "") -> None:
        super().__init__(h, keepalive, workers, tag)
        self.connected_on_headers = True

    def _config(self) -> str:
        cpu = int(self.h.server_cpus.split(",")[0]) if self.h.server_cpus else 0
        mask = "1" + "0" * cpu
        upstream = pass_ = ""
        if self.uses_redis:
            upstream = f"upstream nchan_redis {{ nchan_redis_server {self.redis_url}; }}"
            pass_ = "nchan_redis_pass nchan_redis;"
        values = {
            "@NCHAN_MODULE@": str(NCHAN_MODULE),
            "@AFFINITY@": mask if self.h.server_cpus else "auto",
            "@NOFILE@": "20000",
            "@WORKER_CONNECTIONS@": "19500",
            "@DIR@": str(self.logdir),
            "@PORT@": str(self.port),
            "@PING@": f"{max(1, round(self.keepalive))}",
            "@REDIS_UPSTREAM@": upstream,
            "@REDIS_PASS@": pass_,
        }
        text = (PEERS / "nchan.conf.in").read_text()
        for k, v in values.items():
            text = text.replace(k, v)
        return text

    def _start_server(self) -> None:
        conf = self.logdir / "nginx.conf"
        conf.write_text(self._config())
        cmd = [
            *self.taskset(),
            "nginx",
            "-c",
            str(conf),
            "-p",
            str(self.logdir),
            "-e",
            str(self.logdir / "error.log"),
        ]
        self.command = shlex.join(cmd).replace(str(self.logdir), "<dir>") + (
            "  # <dir>/nginx.conf: bench/peers/nchan.conf.in filled in"
        )
        self.server = gw.Service("nginx", cmd, self.logdir / "nginx.log", dict(os.environ))
        self.services.append(self.server)
        _wait_http(self.port, "/healthz", self.server)

    def log_findings(self) -> list[str]:
        try:
            lines = (self.logdir / "error.log").read_text(errors="replace").splitlines()
        except OSError:
            return []
        hits = [
            ln
            for ln in lines
            if any(f"[{lvl}]" in ln for lvl in ("error", "crit", "alert", "emerg"))
            and "discouraged" not in ln
        ]
        counts = Counter(ln.split("] ", 1)[-1][:160] for ln in hits)
        return [f"{n}x {msg}" for msg, n in counts.most_common(8)]

    def builder(self, last_ids: dict[int, str] | None = None) -> RequestBuilder:
        return nchan_request(last_ids)

    def conns(self) -> int:
        """Publisher connections: nginx answers pipelined requests of one connection one at a
        time, so with Redis (a round trip per publish) the publisher needs many connections."""
        return int(self.h.args.nchan_conns or self.publisher_conns)

    def publish_cmd(self, players: int, rate: float, duration: float) -> list[str]:
        return [
            sys.executable,
            str(PEERS / "httppub.py"),
            "--port",
            str(self.port),
            "--players",
            str(players),
            "--rate",
            f"{rate:g}",
            "--duration",
            f"{duration:g}",
            "--path",
            "/pubnb/",
            "--conns",
            str(self.conns()),
            "--window",
            str(max(1, 2048 // self.conns())),
            "--json",
        ]

    def publish_each(self, players: int, each: int) -> tuple[dict[int, str], dict[str, Any]]:
        with tempfile.NamedTemporaryFile(suffix=".json", dir=self.logdir, delete=False) as f:
            ids_path = f.name
        cmd = [
            sys.executable,
            str(PEERS / "httppub.py"),
            "--port",
            str(self.port),
            "--players",
            str(players),
            "--each",
            str(each),
            "--path",
            "/pub/",
            "--conns",
            str(self.conns()),
            "--window",
            str(max(1, 2048 // self.conns())),
            "--ids",
            ids_path,
            "--json",
        ]
        res = run_tool(cmd, 600.0, None)
        ids = {int(k): v for k, v in json.loads(Path(ids_path).read_text()).items()}
        return ids, res


class NchanRedis(Nchan):
    key = "nchan-redis"
    label = "nchan (Redis)"
    uses_redis = True
    publisher_conns = 256  # 8: 1.7k/s, 64: 4.5k/s, 256: 6.4k/s, 512: 6.5k/s, 1024: 5.6k/s


class Starlette(System):
    key = "starlette"
    label = "sse-starlette"
    kind = "starlette"
    replay = "none"
    switch_keepalive = True
    # publisher.py's closed loop polls CLIENT LIST for the Pub/Sub backlog: with one Pub/Sub
    # connection per stream that is a 10,000-line reply per batch, and the polling itself
    # would load the load core. A fixed rate above sse-starlette's capacity instead.
    flood_rate = 8000.0
    default_workers = 2  # 2 fds per stream: one process cannot hold 10k under 20,000 fds

    def _start_server(self) -> None:
        args = [
            str(PEER_PYTHON),
            "-m",
            "uvicorn",
            "starlette_app:app",
            "--app-dir",
            str(PEERS),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--workers",
            str(self.workers),
            "--loop",
            "uvloop",
            "--http",
            "httptools",
            "--log-level",
            "warning",
            "--no-access-log",
            "--backlog",
            "4096",
            "--timeout-graceful-shutdown",
            "3",
        ]
        cmd = [*self.taskset(), *args]
        env = dict(os.environ)
        env.update(
            BENCH_REDIS_URL=self.redis_url,
            BENCH_JWT_SECRET=self.h.secret,
            BENCH_PING=f"{self.keepalive:g}",
        )
        env.pop("PYTHONPATH", None)
        self.command = (
            f"BENCH_REDIS_URL={self.redis_url} BENCH_JWT_SECRET=<secret> "
            f"BENCH_PING={self.keepalive:g} " + shlex.join(cmd).replace(str(REPO) + "/", "")
        )
        self.server = gw.Service("uvicorn", cmd, self.logdir / "uvicorn.log", env)
        self.services.append(self.server)
        _wait_http(self.port, "/healthz", self.server)
        time.sleep(0.5)  # the second worker

    def publish_each(self, players: int, each: int) -> tuple[dict[int, str], dict[str, Any]]:
        return redis_publish_each(self.redis_url, players, each, lua=False)

    def set_fast_keepalive(self, fast: bool) -> int:
        """SIGUSR1 (1 s pings) / SIGUSR2 (back) to this instance's uvicorn workers."""
        sent = 0
        for pid in gw.proc_tree(self.server_pid)[1:]:
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if b"spawn_main" in cmdline:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGUSR1 if fast else signal.SIGUSR2)
                    sent += 1
        return sent


SYSTEMS: dict[str, type[System]] = {
    "gateway": Gateway,
    "gateway-w2": GatewayW2,
    "nchan-memory": Nchan,
    "nchan-redis": NchanRedis,
    "starlette": Starlette,
}


def redis_publish_each(
    url: str, players: int, each: int, *, lua: bool
) -> tuple[dict[int, str], dict[str, Any]]:
    """`each` events to every player: through publish.lua (history + PUBLISH) when `lua`,
    else a plain PUBLISH of the envelope (no history, nothing to replay)."""
    r = _redis_client(url)
    started = time.time()
    t0 = time.perf_counter()
    ids: dict[int, str] = {}
    published = receivers = 0
    try:
        sha = r.script_load(PUBLISH_LUA.read_text()) if lua else ""
        for _ in range(each):
            for lo in range(0, players, 1000):
                hi = min(players, lo + 1000)
                pipe = r.pipeline(transaction=False)
                for i in range(lo, hi):
                    channel = f"SSE::{BRAND}::p{i}"
                    data = f'{{"t":{time.time_ns()}}}'
                    if lua:
                        pipe.evalsha(sha, 1, channel, "bench", data, HISTORY, 86400)
                    else:
                        pipe.publish(channel, f'{{"type":"bench","data":{data}}}')
                for i, reply in zip(range(lo, hi), pipe.execute(), strict=True):
                    published += 1
                    if lua:
                        ids[i] = reply[0].decode()
                        receivers += int(reply[1])
                    else:
                        receivers += int(reply)
    finally:
        r.close()
    elapsed = time.perf_counter() - t0
    return ids, {
        "started_at": started,
        "published": published,
        "receivers": receivers,
        "elapsed_s": elapsed,
        "achieved_rate": published / elapsed if elapsed > 0 else 0.0,
    }


# --------------------------------------------------------------------------- running tools


def run_tool(
    cmd: list[str],
    budget: float,
    sampler: Sampler | None,
    on_tick: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Runs a publisher that prints one JSON line; bounded by `budget` seconds."""
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        preexec_fn=gw._die_with_parent,
    )
    deadline = time.monotonic() + budget
    try:
        while proc.poll() is None:
            if time.monotonic() > deadline:
                raise SetupError(f"{Path(cmd[1]).name} did not finish within {budget:.0f} s")
            if on_tick is not None:
                on_tick()
            time.sleep(0.1)
        out, err = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
    if sampler is not None:
        sampler.sample()
    lines = out.decode().strip().splitlines()
    if not lines:
        raise SetupError(f"{Path(cmd[1]).name} failed: {err.decode(errors='replace')[-2000:]}")
    result: dict[str, Any] = json.loads(lines[-1])
    return result


def wait_count(lc: LoadClient, target: int, limit: float, stall: float = 1.5) -> tuple[int, float]:
    """Polls the clients until `target` bench events arrived, none for `stall` s, or `limit` s.
    Returns (events, time.time() of the last increase)."""
    started = time.monotonic()
    last = lc.count()
    last_change = time.time()
    last_change_mono = started
    while last < target and time.monotonic() - started < limit:
        time.sleep(0.05)
        now = lc.count()
        if now != last:
            last, last_change, last_change_mono = now, time.time(), time.monotonic()
        elif time.monotonic() - last_change_mono >= stall:
            break
    return last, last_change


# --------------------------------------------------------------------------- harness


class Harness:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.secret = secrets.token_hex(24)
        allowed = sorted(os.sched_getaffinity(0))
        self.pin = not args.no_pin and len(allowed) >= 2
        self.server_cpus = str(allowed[0]) if self.pin else ""
        self.load_cpus: tuple[int, ...] = tuple(allowed[1:]) if self.pin else ()
        if self.pin:
            os.sched_setaffinity(0, set(self.load_cpus))
        self._tmp = tempfile.TemporaryDirectory(prefix="sse-compare-")
        self.logdir = args.keep_logs or Path(self._tmp.name)
        self.logdir.mkdir(parents=True, exist_ok=True)
        self.clients: list[LoadClient] = []
        self.systems: list[System] = []
        self.waited: list[float] = []  # seconds waited for a quiet machine before each start

    def cleanup(self) -> None:
        for lc in self.clients:
            with contextlib.suppress(Exception):
                lc.close()
        self.clients.clear()
        for s in self.systems:
            with contextlib.suppress(Exception):
                s.stop()
        self.systems.clear()
        if self.args.keep_logs is None:
            self._tmp.cleanup()

    # -- clients
    def client(
        self,
        system: System,
        players: int,
        prefix: str = "p",
        last_ids: dict[int, str] | None = None,
        sampler: Sampler | None = None,
        processes: int = 0,
    ) -> LoadClient:
        global REQUEST_BUILDER
        procs = processes or max(2, math.ceil(players / 2500))
        conf = ClientConfig(
            port=system.port,
            brand=BRAND,
            players=players,
            player_prefix=prefix,
            processes=procs,
            jwt_secret=self.secret,
            concurrency=self.args.concurrency,
            max_seconds=self.args.max_seconds + 60.0,
            cpus=self.load_cpus,
        )
        lc = LoadClient(conf)
        self.clients.append(lc)
        original = loadclient.SSEClient
        REQUEST_BUILDER = system.builder(last_ids)
        if system.connected_on_headers:
            loadclient.SSEClient = HeadersConnectedClient  # type: ignore[misc]
        lock = sampler.lock if sampler is not None else contextlib.nullcontext()
        try:
            with lock:  # no /proc sampling in flight while the workers fork
                lc.start()
        finally:
            REQUEST_BUILDER = None
            loadclient.SSEClient = original  # type: ignore[misc]
        return lc

    def close_client(self, lc: LoadClient) -> None:
        lc.close()
        if lc in self.clients:
            self.clients.remove(lc)

    def start(self, cls: type[System], keepalive: float, workers: int = 0, tag: str = "") -> System:
        if self.args.wait_quiet > 0:
            waited = gw.wait_for_quiet(self.args.wait_quiet)
            self.waited.append(round(waited, 1))
        system = cls(self, keepalive, workers, tag)
        self.systems.append(system)
        system.start()
        return system

    def stop(self, system: System) -> dict[str, Any]:
        out = system.stop()
        if system in self.systems:
            self.systems.remove(system)
        return out

    # -- phases
    def connect(self, lc: LoadClient, sampler: Sampler) -> dict[str, Any]:
        sampler.sample()
        t0 = time.time()
        report = lc.connect()
        sampler.sample()
        cpu = sampler.window(t0, time.time())
        client_pct = [100.0 * c / report.elapsed_s for c in report.client_cpu_s if report.elapsed_s]
        out = asdict(report)
        out["client_cpu_pct"] = client_pct
        out["cpu"] = cpu_dict(cpu, *client_pct)
        return out

    def idle(self, lc: LoadClient, sampler: Sampler, seconds: float) -> dict[str, Any]:
        lc.reset(measure_latency=False)
        sampler.sample()
        t0 = time.time()
        time.sleep(seconds)
        sampler.sample()
        stats = lc.stats()
        cpu = sampler.window(t0, time.time())
        return {
            "seconds": stats.wall_s,
            "heartbeats": stats.heartbeats,
            "heartbeats_per_s": stats.heartbeats / stats.wall_s if stats.wall_s else 0.0,
            "open": stats.open,
            "dropped": stats.dropped,
            "client_cpu_pct": stats.client_cpu_pct,
            "cpu": cpu_dict(cpu, *stats.client_cpu_pct),
        }

    def latency(
        self, system: System, lc: LoadClient, sampler: Sampler, players: int, rate: float
    ) -> dict[str, Any]:
        a = self.args
        lc.reset(measure_latency=True)
        cmd = system.publish_cmd(players, rate, a.phase_seconds)
        with gw.HealthProber(system.port, a.phase_seconds + 90.0) as probe:
            pub = run_tool(cmd, a.phase_seconds + 90.0, sampler)
        wait_count(lc, pub["receivers"], a.drain_seconds)
        stats = lc.stats()
        t0 = pub["started_at"]
        cpu = sampler.window(t0, t0 + pub["elapsed_s"])
        pub_pct = 100.0 * pub["cpu_s"] / max(pub["elapsed_s"], 1e-9)
        return {
            "target_rate": rate,
            "achieved_rate": pub["achieved_rate"],
            "published": pub["published"],
            "routed": pub["receivers"],
            "received": stats.bench,
            "publisher_errors": pub.get("errors", 0),
            "latency_ms": stats.latency_ms,
            "publisher_cpu_pct": pub_pct,
            "publisher_max_lag_ms": pub["max_lag_ms"],
            "client_cpu_pct": stats.client_cpu_pct,
            "dropped": stats.dropped,
            "healthz_ms": probe.summary(),
            "cpu": cpu_dict(cpu, pub_pct, *stats.client_cpu_pct),
        }

    def flood(
        self, system: System, lc: LoadClient, sampler: Sampler, players: int
    ) -> dict[str, Any]:
        a = self.args
        duration = a.flood_seconds
        lc.reset(measure_latency=False)
        marks: list[tuple[float, PhaseStats]] = []
        t_start = time.time()
        w0, w1 = t_start + 0.4 + duration * 0.25, t_start + 0.4 + duration * 0.75

        def on_tick() -> None:
            now = time.time()
            if (not marks and now >= w0) or (len(marks) == 1 and now >= w1):
                marks.append((now, lc.stats()))

        cmd = system.publish_cmd(players, system.flood_rate, duration)
        with gw.HealthProber(system.port, duration + 90.0) as probe:
            pub = run_tool(cmd, duration + 90.0, sampler, on_tick)
        # a backlog left here would land in the next phase: wait longer than after a rate
        _, last_at = wait_count(lc, pub["receivers"], 3 * a.drain_seconds, stall=3.0)
        stats = lc.stats()
        pub_end = pub["started_at"] + pub["elapsed_s"]
        if len(marks) == 2:
            (ta, sa), (tb, sb) = marks
            window = sb.wall_s - sa.wall_s
            rate = (sb.bench - sa.bench) / window if window > 0 else 0.0
            cpu = sampler.window(ta, tb)
            client_pct = [
                100.0 * (y - x) / window
                for x, y in zip(_cpu_s(sa), _cpu_s(sb), strict=False)  # per process, in the window
            ]
        else:
            rate = stats.bench / max(pub["elapsed_s"], 1e-9)
            cpu = sampler.window(pub["started_at"], pub_end)
            client_pct = stats.client_cpu_pct
        pub_pct = 100.0 * pub["cpu_s"] / max(pub["elapsed_s"], 1e-9)
        return {
            "delivered_per_s": rate,
            "duration_s": pub["elapsed_s"],
            "published": pub["published"],
            "publish_rate": pub["achieved_rate"],
            "routed": pub["receivers"],
            "received": stats.bench,
            "drain_s": max(0.0, last_at - pub_end),
            "publisher_throttled_s": pub.get("throttled_s", 0.0),
            "publisher_errors": pub.get("errors", 0),
            "publisher_cpu_pct": pub_pct,
            "client_cpu_pct": client_pct,
            "dropped": stats.dropped,
            "heartbeats": stats.heartbeats,
            "wall_s": stats.wall_s,
            "healthz_ms": probe.summary(),
            "cpu": cpu_dict(cpu, pub_pct, *client_pct),
        }

    def replay(
        self, system: System, lc: LoadClient, sampler: Sampler, players: int
    ) -> tuple[dict[str, Any], LoadClient | None]:
        """Seed one event per player (clients connected), drop every client, publish MISSED
        events per player, reconnect all with Last-Event-ID at once."""
        a = self.args
        out: dict[str, Any] = {"players": players, "missed_each": MISSED, "mode": system.replay}
        lc.reset(measure_latency=False)
        ids, seed = system.publish_each(players, 1)
        got, _ = wait_count(lc, seed["receivers"], a.drain_seconds, stall=3.0)
        out["seed_published"] = seed["published"]
        out["seed_received"] = got
        self.close_client(lc)
        self._wait_gone(system)
        _, missed = system.publish_each(players, MISSED)
        out["missed_published"] = missed["published"]
        out["missed_receivers"] = missed["receivers"]  # should be 0: nobody connected
        out["publish_s"] = missed["elapsed_s"]
        r = None
        if system.redis is not None:
            r = _redis_client(system.redis_url)
            with contextlib.suppress(redis.RedisError):
                r.config_set("slowlog-log-slower-than", 1000)
                r.slowlog_reset()
        last_ids = ids if system.replay != "none" else None
        lc2 = self.client(system, players, last_ids=last_ids, sampler=sampler)
        expected = players * MISSED if system.replay != "none" else 0
        sampler.sample()
        t0 = time.time()
        report = lc2.connect()
        got, last_at = wait_count(lc2, expected, a.replay_limit, stall=3.0) if expected else (0, 0)
        t_end = time.time()
        stats = lc2.stats()
        cpu = sampler.window(t0, t_end)
        all_connected = report.connected == players
        received = stats.bench
        out.update(
            connected=report.connected,
            connect_s=report.elapsed_s,
            failed_attempts=report.failed_attempts,
            received=received,
            expected=players * MISSED,
            lost=max(0, players * MISSED - received),
            duplicates=max(0, received - players * MISSED),
            caught_up_s=(
                (max(last_at, t0 + report.elapsed_s) - t0)
                if all_connected and received >= expected
                else None
            ),
            client_cpu_pct=[100.0 * c / max(report.elapsed_s, 1e-9) for c in report.client_cpu_s],
            cpu=cpu_dict(cpu),
        )
        if r is not None:
            try:
                entries = r.slowlog_get(1000)
                durations = [int(e["duration"]) for e in entries]
                cmds = Counter(
                    (e.get("command") or b"?").split()[0].decode(errors="replace")
                    if isinstance(e.get("command"), bytes)
                    else str(e.get("command", "?")).split()[0]
                    for e in entries
                )
                out["redis_slowlog"] = {
                    "over_1ms": len(durations),
                    "over_10ms": sum(1 for d in durations if d > 10_000),
                    "max_ms": max(durations) / 1000 if durations else 0.0,
                    "commands": dict(cmds.most_common(5)),
                }
            except redis.RedisError as exc:
                out["redis_slowlog"] = {"error": str(exc)}
            finally:
                r.close()
        return out, lc2

    def _wait_gone(self, system: System) -> None:
        """After the clients closed: until the server dropped their subscriptions (bounded)."""
        time.sleep(1.0)
        if system.redis is None:
            time.sleep(1.0)
            return
        r = _redis_client(system.redis_url)
        try:
            deadline = time.monotonic() + 30.0
            while time.monotonic() < deadline:
                n = int(r.pubsub_numpat()) + sum(
                    int(v) for _, v in r.pubsub_numsub(*[f"SSE::{BRAND}::p{i}" for i in range(3)])
                )
                clients = int(r.info("clients").get("connected_clients", 0))
                if n == 0 and (system.kind != "starlette" or clients < 20):
                    break
                time.sleep(0.25)
        except redis.RedisError:
            pass
        finally:
            r.close()


def _cpu_s(stats: PhaseStats) -> list[float]:
    """Per-process CPU seconds since the reset, recovered from the % and the wall time."""
    return [p * stats.wall_s / 100.0 for p in stats.client_cpu_pct]


# --------------------------------------------------------------------------- scenarios


def rss(system: System) -> int:
    return gw.rss_kib(system.server_pid)


def run_main(h: Harness, cls: type[System], full: bool) -> dict[str, Any]:
    """The main instance (15 s keep-alive): memory, connect storm, idle heartbeat CPU,
    saturation, latency, reconnect storm."""
    a = h.args
    n = a.connections
    res: dict[str, Any] = {"problems": []}
    system = h.start(cls, 15.0)
    res["label"] = system.label
    res["command"] = system.command
    sampler = Sampler(system.server_pid, system.redis_pid)
    lc: LoadClient | None = None
    try:
        time.sleep(1.0)
        base = rss(system)
        res["rss_base_kib"] = base
        small = min(1000, max(1, n // 2))
        say(f"  {small:,} idle connections ...", flush=True)
        lca = h.client(system, small, prefix="a", sampler=sampler)
        ca = h.connect(lca, sampler)
        time.sleep(a.settle)
        rss_small = rss(system)
        res["rss_small"] = {
            "connections": ca["connected"],
            "rss_kib": rss_small,
            "per_conn_bytes": (rss_small - base) * 1024 / max(1, ca["connected"]),
        }
        h.close_client(lca)
        time.sleep(1.5)
        say(f"  connect storm: {n:,} ...", flush=True)
        lc = h.client(system, n, sampler=sampler)
        res["connect"] = h.connect(lc, sampler)
        c = res["connect"]
        say(
            f"    {c['connected']:,}/{n:,} in {c['elapsed_s']:.2f} s = {c['rate_per_s']:,.0f}/s",
            flush=True,
        )
        time.sleep(a.settle)
        rss_n = rss(system)
        # the first `small` connections' memory was freed and is reused by these
        res["rss_n"] = {
            "connections": c["connected"],
            "rss_kib": rss_n,
            "per_conn_bytes": (rss_n - base) * 1024 / max(1, c["connected"]),
        }
        say(
            f"    RSS/conn {res['rss_small']['per_conn_bytes'] / 1024:.2f} KiB at {small:,}, "
            f"{res['rss_n']['per_conn_bytes'] / 1024:.2f} KiB at {c['connected']:,}",
            flush=True,
        )
        if not c["connected"]:
            res["problems"].append("no client connected")
            return res
        say(f"  idle, 15 s keep-alive, {a.idle_seconds:g} s ...", flush=True)
        res["idle15"] = h.idle(lc, sampler, a.idle_seconds)
        if isinstance(system, Starlette) and not a.no_hb1:
            # 1 s pings on the same N streams (a second 10k connect would take minutes here)
            say("  idle, 1 s keep-alive (switched on the running instance) ...")
            workers = system.set_fast_keepalive(True)
            time.sleep(16.5)  # each stream ends its current 15 s sleep first
            res["idle1"] = h.idle(lc, sampler, a.hb_seconds)
            res["idle1"].update(keepalive_s=1.0, switched_at_runtime=True, workers=workers)
            system.set_fast_keepalive(False)
            time.sleep(1.5)
            say(
                f"    server CPU {fnum(_cpu_pct(res['idle1']), 1, '%')}, "
                f"{fnum(res['idle1'].get('heartbeats_per_s'))} heartbeats/s"
            )
        say(f"  saturation, {a.flood_seconds:g} s ...", flush=True)
        res["flood"] = h.flood(system, lc, sampler, n)
        sat = res["flood"]["delivered_per_s"]
        say(f"    {sat:,.0f} deliveries/s", flush=True)
        res["latency"] = []
        for rate in a.rates:
            if sat > 0 and rate > OVERLOAD_FACTOR * sat:
                res["latency"].append(
                    {"target_rate": rate, "skipped": f"saturates at {sat:,.0f}/s"}
                )
                say(f"  latency at {rate:,.0f}/s: skipped (saturates at {sat:,.0f}/s)")
                continue
            if not system.server or not system.server.alive():
                break
            lr = h.latency(system, lc, sampler, n, rate)
            res["latency"].append(lr)
            lat = lr["latency_ms"]
            say(
                f"  latency at {rate:,.0f}/s: received {lr['received']:,}/{lr['routed']:,}; "
                f"p50 {gw.fmt_ms(lat.get('p50'))} p99 {gw.fmt_ms(lat.get('p99'))} "
                f"p99.9 {gw.fmt_ms(lat.get('p99.9'))} ms",
                flush=True,
            )
        stats = lc.stats()
        res["open_before_replay"] = stats.open
        if full:
            say(f"  reconnect storm with replay ({MISSED} missed each) ...", flush=True)
            rep, lc = h.replay(system, lc, sampler, n)
            res["replay"] = rep
            cu = rep["caught_up_s"]
            say(
                f"    {rep['connected']:,} reconnected, {rep['received']:,}/{rep['expected']:,} "
                f"replayed, lost {rep['lost']:,}, "
                f"caught up in {'-' if cu is None else f'{cu:.2f} s'}",
                flush=True,
            )
        res["rss_end_kib"] = rss(system)
    finally:
        say("  stopping ...")
        if lc is not None:
            h.close_client(lc)
        sampler.close()
        res["stop"] = h.stop(system)
        say("  stopped")
        res["server_alive_at_end"] = res["stop"].get("exit_code") in (0, None, -15)
    return res


def run_heartbeat(h: Harness, cls: type[System], keepalive: float) -> dict[str, Any]:
    """A separate instance with a short keep-alive: server CPU at N idle connections."""
    a = h.args
    n = a.connections
    system = h.start(cls, keepalive, tag=f"-ka{keepalive:g}")
    sampler = Sampler(system.server_pid, system.redis_pid)
    lc = None
    out: dict[str, Any] = {"keepalive_s": keepalive, "command": system.command}
    try:
        lc = h.client(system, n, sampler=sampler)
        c = h.connect(lc, sampler)
        out["connected"] = c["connected"]
        time.sleep(max(2.0, keepalive * 1.5))
        out.update(h.idle(lc, sampler, a.hb_seconds))
    finally:
        if lc is not None:
            h.close_client(lc)
        sampler.close()
        h.stop(system)
    return out


def run_ceiling(h: Harness) -> dict[str, Any]:
    """The bare write() ceiling on the server core (`bench/send_ceiling.py`), both modes."""
    a = h.args
    out: dict[str, Any] = {}
    for mode in ("write", "transport"):
        say(f"== send ceiling ({mode}), {a.connections:,} streams ==", flush=True)
        cmd = [
            sys.executable,
            str(BENCH / "send_ceiling.py"),
            "--json",
            "--mode",
            mode,
            "--connections",
            str(a.connections),
            "--processes",
            str(max(2, math.ceil(a.connections / 2500))),
            "--seconds",
            str(a.flood_seconds),
        ]
        if h.pin:
            cmd += ["--server-cpu", h.server_cpus.split(",")[0], "--client-cpus"]
            cmd += [str(c) for c in h.load_cpus]
        try:
            res = run_tool(cmd, a.flood_seconds + 180.0, None)
        except (SetupError, ValueError) as exc:
            print(f"  setup error: {exc}", file=sys.stderr)
            out[mode] = {"problems": [str(exc)]}
            continue
        out[mode] = res
        say(f"  {fnum(res['sends_per_s'])} sends/s, {res['server_us_per_send']} µs per send")
    return out


def run_big(h: Harness) -> dict[str, Any]:
    """sse-gateway --workers 3 at 50k idle connections: RSS summed over all its processes."""
    a = h.args
    n = a.big_connections
    system = h.start(Gateway, 15.0, workers=3, tag="-50k")
    sampler = Sampler(system.server_pid, system.redis_pid)
    lc = None
    out: dict[str, Any] = {"command": system.command, "workers": 3}
    try:
        time.sleep(1.5)
        base = rss(system)
        lc = h.client(system, n, sampler=sampler, processes=max(2, math.ceil(n / 5000)))
        c = h.connect(lc, sampler)
        time.sleep(a.settle)
        total = rss(system)
        out.update(
            connections=c["connected"],
            wanted=n,
            connect=c,
            rss_base_kib=base,
            rss_kib=total,
            per_conn_bytes=(total - base) * 1024 / max(1, c["connected"]),
            processes=len(gw.proc_tree(system.server_pid)),
        )
        idle = h.idle(lc, sampler, min(3.0, a.idle_seconds))
        out["open_after_idle"] = idle["open"]
        out["dropped"] = idle["dropped"]
    finally:
        if lc is not None:
            h.close_client(lc)
        sampler.close()
        out["stop"] = h.stop(system)
    return out


# --------------------------------------------------------------------------- report


def _nan(v: Any) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def fnum(v: Any, digits: int = 0, suffix: str = "") -> str:
    if _nan(v):
        return DASH
    return f"{v:,.{digits}f}{suffix}"


def fms(v: Any) -> str:
    if _nan(v):
        return DASH
    return f"{v:.2f}" if v < 10 else f"{v:.1f}" if v < 100 else f"{v:,.0f}"


def advantage(gw_value: Any, peer_value: Any, higher_better: bool) -> str:
    """sse-gateway's advantage over a peer: > 1 means sse-gateway is better."""
    if _nan(gw_value) or _nan(peer_value) or not gw_value or not peer_value:
        return DASH
    r = gw_value / peer_value if higher_better else peer_value / gw_value
    return f"**{r:.2f}{TIMES}**" if r >= 1 else f"{r:.2f}{TIMES}"


def _lat(res: dict[str, Any], rate: float, key: str) -> Any:
    for lr in res.get("latency", []):
        if lr.get("target_rate") == rate and "latency_ms" in lr:
            return lr["latency_ms"].get(key)
    return None


def _cpu_pct(d: dict[str, Any] | None, key: str = "gateway") -> Any:
    if not d:
        return None
    return d.get("cpu", {}).get(key)


def _client_cpu(d: dict[str, Any] | None) -> str:
    if not d or not d.get("client_cpu_pct"):
        return DASH
    v = d["client_cpu_pct"]
    return f"{sum(v):.0f}% ({len(v)} procs, max {max(v):.0f}%)"


def _cores(d: dict[str, Any] | None) -> str:
    if not d:
        return DASH
    cpu = d.get("cpu", {})
    cores = cpu.get("cores") or []
    soft = cpu.get("softirq") or []
    steal = cpu.get("steal") or []

    def one(i: int, v: float) -> str:
        notes = []
        if i < len(soft):
            notes.append(f"{soft[i]:.0f}% irq")
        if i < len(steal) and steal[i] >= 0.5:
            # The hypervisor ran another VM: the vCPU stood still, whatever was queued on it.
            notes.append(f"{steal[i]:.0f}% steal")
        return f"{v:.0f}% ({', '.join(notes)})" if notes else f"{v:.0f}%"

    return " / ".join(one(i, v) for i, v in enumerate(cores))


def render(results: dict[str, Any]) -> str:
    systems: dict[str, dict[str, Any]] = results["systems"]
    order = [k for k in SYSTEMS if k in systems]
    labels = {k: systems[k].get("label", k) for k in order}
    gwr = systems.get("gateway", {})
    peers = [k for k in order if k not in ("gateway", "gateway-w2")]
    n = results["connections"]
    L: list[str] = []
    L.append("# sse-gateway against nchan and sse-starlette")
    L.append("")
    L.append(
        "One run, one machine, one command: every figure below comes from the same run of "
        "`bench/compare.py`, and the ratios compare systems measured minutes apart on the same "
        "machine. Absolute figures move from run to run on a shared VM (see "
        "`docs/benchmarks.md` for the spread of sse-gateway's own figures); the ratios move "
        "less. Generated by the script; do not edit by hand."
    )
    L.append("")
    L.append(f"- command: `{results['command']}`")
    L.append(f"- started {results['started']}, took {results['elapsed_min']:.1f} min")
    L.append(
        f"- {n:,} connections (one player each) unless said; load client: "
        f"{results['processes']} processes (`bench/loadclient.py`)"
    )
    L.append(f"- pinning: {results['pinning']}")
    m = results["machine"]
    L.append(
        f"- machine: {m.get('nproc')} vCPUs (`nproc`), {m.get('cpu')}, {m.get('memory', '?')}, "
        f"Linux {m.get('kernel')}, Python {m.get('python')}"
    )
    L.append("")
    L.append("## Summary: sse-gateway's advantage over each peer")
    L.append("")
    L.append(
        "Each cell is the factor by which sse-gateway (one process) is better than the peer in "
        "this run: peer ÷ sse-gateway for memory, latency and CPU, sse-gateway ÷ peer for rates. "
        "Above 1 (bold): sse-gateway is better; below 1: the peer is."
    )
    L.append("")
    L.append("| figure | " + " | ".join(f"vs {labels[k]}" for k in peers) + " |")
    L.append("|---|" + "---|" * len(peers))
    rows: list[tuple[str, Callable[[dict[str, Any]], Any], bool]] = [
        (
            f"RSS per idle connection at {n:,}",
            lambda r: r.get("rss_n", {}).get("per_conn_bytes"),
            False,
        ),
        ("connect storm (connections/s)", lambda r: r.get("connect", {}).get("rate_per_s"), True),
        ("saturation (deliveries/s)", lambda r: r.get("flood", {}).get("delivered_per_s"), True),
    ]
    for rate in results["rates"]:
        rows.append(
            (f"p99 latency at {rate:,.0f} ev/s", lambda r, x=rate: _lat(r, x, "p99"), False)
        )
    rows.append(
        (
            "reconnect storm: time to all caught up",
            lambda r: (r.get("replay") or {}).get("caught_up_s"),
            False,
        )
    )
    rows.append(
        (
            "server CPU, idle, 15 s keep-alive",
            lambda r: _cpu_pct(r.get("idle15")),
            False,
        )
    )
    rows.append(
        ("server CPU, idle, 1 s keep-alive", lambda r: _cpu_pct(r.get("idle1")), False),
    )
    for name, get, higher in rows:
        cells = [
            "no replay"
            if name.startswith("reconnect")
            and (systems[k].get("replay") or {}).get("mode") == "none"
            else advantage(get(gwr), get(systems[k]), higher)
            for k in peers
        ]
        L.append(f"| {name} | " + " | ".join(cells) + " |")
    L.append("")
    lost_cells = []
    for k in peers:
        rep = systems[k].get("replay") or {}
        lost_cells.append(f"{fnum(rep.get('lost'))} lost" if rep else DASH)
    grep = gwr.get("replay") or {}
    L.append(
        f"Events lost in the reconnect storm: sse-gateway {fnum(grep.get('lost'))}; "
        + "; ".join(f"{labels[k]} {c}" for k, c in zip(peers, lost_cells, strict=True))
        + "."
    )
    L.append("")
    L.append("![latency against publish rate](img/comparison-latency.png)")
    L.append("")
    L.append("![memory, connect rate, saturation, heartbeat CPU](img/comparison-summary.png)")
    L.append("")

    # --- systems
    L.append("## Systems")
    L.append("")
    L.append("| system | what | command |")
    L.append("|---|---|---|")
    what = {
        "gateway": "Redis Pub/Sub broker, one shared subscriber connection; JWT checked per stream",
        "gateway-w2": "the same, 2 worker processes (SO_REUSEPORT), both on the server core",
        "nchan-memory": "nginx 1 worker + nchan, channels in shared memory; no auth",
        "nchan-redis": "the same, channels in Redis (`nchan_redis_pass` to an upstream)",
        "starlette": "uvicorn, 2 workers (the 20,000-fd limit: 2 fds per stream), one redis-py "
        "Pub/Sub connection per stream; JWT checked per stream",
    }
    for k in order:
        cmd = systems[k].get("command", "").replace("|", "\\|").replace(str(REPO) + "/", "")
        L.append(f"| {labels[k]} | {what.get(k, '')} | `{cmd}` |")
    L.append("")

    L.append("What differs between the systems, on purpose or by design:")
    L.append("")
    L.append(
        "- **Auth.** sse-gateway and sse-starlette verify an HS256 JWT on every stream; nchan "
        "runs without auth here (its usual setup delegates auth to an upstream request per "
        "subscriber, `nchan_authorize_request`, which would cost it more)."
    )
    L.append(
        "- **Where publishing costs.** sse-gateway and sse-starlette are fed by Redis "
        "`PUBLISH`, and Redis runs on the load core. nchan is fed by HTTP `POST`s that its one "
        "worker parses on the server core, one request per event (in Redis mode it also runs "
        "its own Lua scripts in Redis). That is nchan's publishing interface; it is part of "
        "what its core spends per event."
    )
    L.append(
        "- **Live events are not stored.** sse-gateway's live phases use a plain `PUBLISH` (no "
        "history) and nchan's a location with `nchan_store_messages off`; the replay storm "
        "stores events for both (`publish.lua`; nchan's message buffer)."
    )
    L.append(
        "- **Processes.** sse-starlette runs 2 uvicorn workers: each stream holds a client "
        "socket and a Redis socket, so 10,000 streams need more than the 20,000 open files one "
        "process may have. Both workers are pinned to the server core like everything else."
    )
    busiest = max_client_cpu(results)
    L.append(
        "- **Load side.** The load client, the publishers, Redis and this script share the "
        "second core. The load client's CPU is in every table (*load client CPU*: the sum over "
        "its processes, and the busiest one); the busiest client process used at most "
        f"{busiest:.0f}% of a core in any phase of this run."
    )
    L.append("")

    # --- memory + connect
    L.append("## Idle memory and connect storm")
    L.append("")
    L.append(
        "RSS: `VmRSS` summed over the server's process tree (nginx master + worker, uvicorn "
        "supervisor + workers), minus the same before any client connected, divided by the "
        "connections. Kernel socket buffers are not included. Connect storm: all N clients "
        f"({args_concurrency(results)} attempts in flight per client process) until each has "
        "its stream (sse-gateway and sse-starlette: `event: connected`, written once the "
        "channel is subscribed; nchan: the 200 response headers)."
    )
    L.append("")
    L.append(
        "| system | RSS/conn at ~1k | RSS/conn at N | server RSS at N | connections/s | "
        "time to connected p50 / p99 | failed attempts | server CPU | load client CPU |"
    )
    L.append("|---|---|---|---|---|---|---|---|---|")
    for k in order:
        r = systems[k]
        c = r.get("connect", {})
        ttc = c.get("time_to_connected_ms", {})
        rs, rn = r.get("rss_small", {}), r.get("rss_n", {})
        L.append(
            f"| {labels[k]} | {fnum(rs.get('per_conn_bytes', math.nan) / 1024, 2)} KiB "
            f"({fnum(rs.get('connections'))}) | "
            f"{fnum(rn.get('per_conn_bytes', math.nan) / 1024, 2)} KiB "
            f"({fnum(rn.get('connections'))}) | "
            f"{fnum(rn.get('rss_kib', math.nan) / 1024, 1)} MiB | "
            f"**{fnum(c.get('rate_per_s'))}/s** | {fms(ttc.get('p50'))} / {fms(ttc.get('p99'))} ms"
            f" | {sum((c.get('failed_attempts') or {}).values())} | "
            f"{fnum(_cpu_pct(c), 0, '%')} | {_client_cpu(c)} |"
        )
    big = results.get("big")
    if big:
        L.append("")
        L.append(
            f"**sse-gateway at {big.get('wanted', 0):,} connections** (`--workers 3`: one process "
            "cannot hold more than ~19,850 streams under the 20,000 open-file limit): "
            f"{fnum(big.get('connections'))} connected at "
            f"{fnum(big.get('connect', {}).get('rate_per_s'))}/s, RSS of all "
            f"{big.get('processes', '?')} processes {fnum(big.get('rss_base_kib', 0) / 1024, 1)} "
            f"→ {fnum(big.get('rss_kib', 0) / 1024, 1)} MiB = "
            f"**{fnum(big.get('per_conn_bytes', math.nan) / 1024, 2)} KiB per connection**; "
            f"{fnum(big.get('open_after_idle'))} still open after the idle check, "
            f"{sum((big.get('connect', {}).get('failed_attempts') or {}).values())} failed "
            f"attempts. Command: `{big.get('command', '').replace(str(REPO) + '/', '')}`."
        )
    L.append("")

    # --- saturation
    L.append("## Saturation: deliveries/s received by clients")
    L.append("")
    L.append(
        "Publish as fast as the system takes it, to distinct players (a shuffled cycle over all "
        "N), and count what the clients receive in the middle half of the window. Redis "
        "publishers pause while Redis holds more than 2 MB for its Pub/Sub subscriber "
        "(sse-gateway), so they publish at the rate the server consumes (sse-starlette, whose "
        "10,000 Pub/Sub connections make that check itself costly, gets a fixed "
        f"{Starlette.flood_rate:,.0f} events/s, above what it delivers); the nchan "
        "publisher is a closed loop (`bench/peers/httppub.py`: 2,048 requests in flight over "
        "64 keep-alive connections, 256 for nchan with Redis, whose every publish waits for a "
        "Redis round trip while nginx answers one pipelined request per connection at a time; "
        "those counts were the fastest of 8 to 1,024 in trials). For nchan, the server also "
        "parses one HTTP "
        "request per event, on the same core: that is how nchan is fed. *others*: CPU used "
        "by processes that are not part of this run (other jobs on a shared machine) and by "
        "kernel threads: a large figure there means a disturbed phase."
    )
    L.append("")
    L.append(
        "| system | deliveries/s | published | received | server CPU | Redis CPU | publisher CPU "
        "| load client CPU | others | cores busy (CPU 0 / CPU 1) | `/healthz` p50 / max |"
    )
    L.append("|---|---|---|---|---|---|---|---|---|---|---|")
    for k in order:
        f = systems[k].get("flood")
        if not f:
            continue
        L.append(
            f"| {labels[k]} | **{fnum(f['delivered_per_s'])}/s** | {fnum(f['published'])} | "
            f"{fnum(f['received'])} | {fnum(_cpu_pct(f), 0, '%')} | "
            f"{fnum(_cpu_pct(f, 'redis'), 0, '%')} | {fnum(f['publisher_cpu_pct'], 0, '%')} | "
            f"{_client_cpu(f)} | {fnum(_cpu_pct(f, 'others'), 0, '%')} | {_cores(f)} | "
            f"{gw.fmt_probe(f.get('healthz_ms', {}))} |"
        )
    L.append("")

    # --- latency
    L.append("## Latency: publish → receive")
    L.append("")
    L.append(
        f"{results['phase_seconds']:g} s at each rate, events to random players, with the N "
        "connections open. The publisher stamps `time.time_ns()` into each event just before "
        "its batch is written; the client subtracts it from the time it reads the frame. A rate "
        "above the system's measured saturation rate is marked *over saturation*: the backlog "
        "grows for the whole phase, so its latency says how long the phase was, not how fast "
        f"the system is; a rate more than {OVERLOAD_FACTOR:g} times the saturation rate is "
        "skipped (its backlog would take minutes to drain). *steal* in the last column is "
        "time the hypervisor gave that vCPU to other VMs: the core stood still, and every "
        "event queued on it waited. Compare tails between phases with little steal; a vCPU "
        "that loses a quarter of its time cannot keep a 2 ms p99 whatever runs on it."
    )
    L.append("")
    L.append(
        "| system | rate | received / routed | p50 | p99 | p99.9 | max | server CPU | "
        "publisher CPU | load client CPU | others | cores busy (CPU 0 / CPU 1) |"
    )
    L.append("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for k in order:
        for lr in systems[k].get("latency", []):
            if "skipped" in lr:
                L.append(
                    f"| {labels[k]} | {lr['target_rate']:,.0f}/s | skipped: {lr['skipped']} "
                    "| | | | | | | | | |"
                )
                continue
            lat = lr["latency_ms"]
            sat = (systems[k].get("flood") or {}).get("delivered_per_s") or 0
            over = " (over saturation)" if sat and lr["target_rate"] > sat else ""
            L.append(
                f"| {labels[k]} | {lr['target_rate']:,.0f}/s{over} | {fnum(lr['received'])} / "
                f"{fnum(lr['routed'])} | {fms(lat.get('p50'))} | **{fms(lat.get('p99'))}** | "
                f"{fms(lat.get('p99.9'))} | {fms(lat.get('max'))} | {fnum(_cpu_pct(lr), 0, '%')}"
                f" | {fnum(lr['publisher_cpu_pct'], 0, '%')} | {_client_cpu(lr)} | "
                f"{fnum(_cpu_pct(lr, 'others'), 0, '%')} | {_cores(lr)} |"
            )
    L.append("")
    L.append("(ms)")
    L.append("")

    # --- replay
    L.append("## Reconnect storm with replay")
    L.append("")
    L.append(
        "With all N clients connected, one event is published per player and received (its "
        "id is the client's `Last-Event-ID`). Every client then disconnects, "
        f"{MISSED} events are published per player while they are away, and all N reconnect "
        "at once with `Last-Event-ID` (each client process keeps at most "
        f"{args_concurrency(results)} attempts in flight). sse-gateway publishes through "
        "`publish.lua` (history in a Redis stream per player); nchan through `POST /pub/<player>` "
        f"into its message buffer (`nchan_message_buffer_length {HISTORY}`); sse-starlette "
        "has no history, so what was published while a client was away is lost. "
        "*Caught up*: from the first reconnect until the last client has all its missed "
        "events. Redis slow log: commands over 1 ms during the storm."
    )
    L.append("")
    L.append(
        "| system | reconnected | replayed / expected | lost | duplicates | caught up | "
        "Redis commands > 1 ms / > 10 ms (max) | server CPU |"
    )
    L.append("|---|---|---|---|---|---|---|---|")
    for k in order:
        rep = systems[k].get("replay")
        if not rep:
            continue
        sl = rep.get("redis_slowlog") or {}
        slow = (
            f"{sl.get('over_1ms', 0)} / {sl.get('over_10ms', 0)} ({fms(sl.get('max_ms'))} ms) "
            + ", ".join(f"{c} {n}" for c, n in (sl.get("commands") or {}).items())
            if sl and "error" not in sl
            else DASH
        )
        cu = rep.get("caught_up_s")
        caught = DASH if cu is None else f"**{cu:.2f} s**"
        if rep.get("mode") == "none":
            caught = f"nothing to replay (all reconnected in {fnum(rep.get('connect_s'), 1)} s)"
        L.append(
            f"| {labels[k]} | {fnum(rep.get('connected'))}/{fnum(rep.get('players'))} | "
            f"{fnum(rep.get('received'))} / {fnum(rep.get('expected'))} | "
            f"**{fnum(rep.get('lost'))}** | {fnum(rep.get('duplicates'))} | "
            f"{caught} | {slow} | "
            f"{fnum(_cpu_pct(rep), 0, '%')} |"
        )
    L.append("")

    # --- heartbeat
    L.append("## Heartbeat cost at N idle connections")
    L.append("")
    L.append(
        "Server CPU while N streams are idle, with the keep-alive at 15 s (the main instance) "
        "and at 1 s (a separate instance). sse-gateway: `--keepalive-period`; nchan: "
        "`nchan_eventsource_ping_interval` (an `event: heartbeat` frame); sse-starlette: "
        "`ping=` (an `event: heartbeat` frame). For sse-starlette the 1 s figure comes from the "
        "main instance, its streams switched to 1 s pings by a signal (a benchmark hook in "
        "`bench/peers/starlette_app.py`): connecting N streams to a second instance takes it "
        "minutes, and with 1 s pings it cannot even accept them all."
    )
    L.append("")
    L.append(
        "| system | CPU at 15 s | heartbeats/s received | CPU at 1 s | heartbeats/s received | "
        "load client CPU (1 s) |"
    )
    L.append("|---|---|---|---|---|---|")
    for k in order:
        i15, i1 = systems[k].get("idle15"), systems[k].get("idle1")
        if not i15 and not i1:
            continue
        L.append(
            f"| {labels[k]} | {fnum(_cpu_pct(i15), 1, '%')} | "
            f"{fnum((i15 or {}).get('heartbeats_per_s'))} | **{fnum(_cpu_pct(i1), 1, '%')}** | "
            f"{fnum((i1 or {}).get('heartbeats_per_s'))} | {_client_cpu(i1)} |"
        )
    L.append("")

    L.extend(render_ceiling(results))

    # --- issue 4 targets
    L.extend(render_targets(results))

    # --- problems
    L.append("## Problems seen in this run")
    L.append("")
    any_problem = False
    for k in order:
        r = systems[k]
        items = list(r.get("problems", []))
        c = r.get("connect", {})
        if c.get("failed_attempts"):
            items.append(f"failed connection attempts: {c['failed_attempts']}")
        for lr in r.get("latency", []):
            if "received" in lr and lr["received"] < lr["routed"]:
                items.append(
                    f"{lr['routed'] - lr['received']:,} of {lr['routed']:,} routed events not "
                    f"received at {lr['target_rate']:,.0f}/s within {results['drain_seconds']:g} s"
                )
            if lr.get("publisher_errors"):
                items.append(f"publisher errors at {lr['target_rate']:,.0f}/s")
            if lr.get("dropped"):
                items.append(f"{lr['dropped']} streams dropped at {lr['target_rate']:,.0f}/s")
        f = r.get("flood") or {}
        if f and f.get("received", 0) < f.get("routed", 0):
            items.append(
                f"{f['routed'] - f['received']:,} routed events not received after the "
                "saturation phase"
            )
        if f.get("dropped"):
            items.append(f"{f['dropped']} streams dropped in the saturation phase")
        stop = r.get("stop") or {}
        if stop.get("exit_code") not in (0, None):
            items.append(f"exit code {stop.get('exit_code')} after SIGTERM")
        for line in stop.get("log_findings", [])[:6]:
            if "SSE_CONNECTION_LIMIT=" in line:
                continue  # expected: the default limit is above one process's fd limit
            items.append(f"log: `{line.strip()[:220]}`")
        if items:
            any_problem = True
            L.append(f"- **{labels[k]}**:")
            for it in items:
                L.append(f"  - {it}")
    if big and big.get("connections", 0) < big.get("wanted", 0):
        any_problem = True
        L.append(f"- sse-gateway --workers 3: {big['connections']:,}/{big['wanted']:,} connected")
    if not any_problem:
        L.append("- none")
    L.append("")

    # --- machine
    L.append("## Machine and versions")
    L.append("")
    for k, v in m.items():
        L.append(f"- {k}: {v}")
    L.append("")
    L.append("## How to run it")
    L.append("")
    L.append("```sh")
    L.append(
        "make bench                                   # the full run (~20 min), writes this file"
    )
    L.append(".venv/bin/python bench/compare.py --quick    # smoke run: 200 connections, ~2 min")
    L.append(".venv/bin/python bench/compare.py --systems gateway,nchan-memory --connections 5000")
    L.append("```")
    L.append("")
    L.append(
        "It installs what is missing (as root on Debian: `nginx`, `libnginx-mod-nchan`, "
        "`redis-server` with apt-get; the Python peer and matplotlib in `bench/.venv-peers` "
        "from `bench/requirements-peers.txt`), starts each system on loopback in turn (a fresh "
        "`redis-server` per system, on a free port), and stops every process it started "
        "(process groups, parent-death signal). The load client (`bench/loadclient.py`: raw "
        "asyncio sockets on uvloop, several processes, source addresses 127.0.0.2-250) and the "
        "publishers (`bench/publisher.py` for Redis, `bench/peers/httppub.py` for nchan) are "
        "the same for every system. `--json FILE` keeps every figure; `--keep-logs DIR` keeps "
        "the servers' logs and the generated nginx config."
    )
    L.append("")
    return "\n".join(L)


def render_ceiling(results: dict[str, Any]) -> list[str]:
    """The bare write() ceiling of the server core, against sse-gateway's saturation."""
    ceiling = results.get("ceiling") or {}
    if not ceiling:
        return []
    g = results["systems"].get("gateway") or {}
    sat = (g.get("flood") or {}).get("delivered_per_s")
    L = ["### The send ceiling: what the server core can write at all", ""]
    L.append(
        "`bench/send_ceiling.py`, same machine and pinning, same load client and N: a server "
        "that does nothing but write one `event: bench` frame per socket, round-robin over "
        "the N streams in shuffled order, for the saturation window. No Redis, no parsing, "
        "no hub. *write*: `os.write()` on each descriptor (the kernel's cost and the least "
        "Python); *transport*: uvloop's `transport.write()`, as the gateway writes, returning "
        "to the loop every 256 frames. Per-send CPU: user and system time of the server "
        "process (system includes the loopback TCP receive work done in softirq on its core, "
        "shown separately). Each event to its own socket costs one write(), so no server on "
        "this core delivers more than this to N distinct streams."
    )
    L.append("")
    L.append(
        "| mode | sends/s | received | server CPU | µs per send: user / system "
        "(of which softirq) | load client CPU | sse-gateway's saturation as share of it |"
    )
    L.append("|---|---|---|---|---|---|---|")
    for mode in ("write", "transport"):
        c = ceiling.get(mode) or {}
        if "sends_per_s" not in c:
            L.append(f"| {mode} | {DASH} | | | {'; '.join(c.get('problems', []))} | | |")
            continue
        us = c["server_us_per_send"]
        clients = c.get("client_cpu_pct") or []
        share = f"{100 * sat / c['sends_per_s']:.0f}%" if sat else DASH
        L.append(
            f"| {mode} | **{fnum(c['sends_per_s'])}/s** | {fnum(c['received'])} | "
            f"{fnum(c['server_cpu_pct'], 0, '%')} | {us['user']:.1f} / {us['system']:.1f} "
            f"({us['irq_softirq_cpu0']:.1f}) | {sum(clients)}% ({len(clients)} procs, max "
            f"{max(clients, default=0)}%) | {share} |"
        )
    L.append("")
    return L


def render_targets(results: dict[str, Any]) -> list[str]:
    """sse-gateway against the targets of issue 4, from this run."""
    systems = results["systems"]
    g = systems.get("gateway")
    if not g:
        return []
    nm = systems.get("nchan-memory", {})
    n = results["connections"]
    sat = (g.get("flood") or {}).get("delivered_per_s")
    nsat = (nm.get("flood") or {}).get("delivered_per_s")
    p99_20k = _lat(g, 20_000.0, "p99")
    conn = (g.get("connect") or {}).get("rate_per_s")
    slow = (g.get("replay") or {}).get("redis_slowlog") or {}
    rss_b = (g.get("rss_n") or {}).get("per_conn_bytes")
    big = results.get("big") or {}
    ceil_w = ((results.get("ceiling") or {}).get("write") or {}).get("sends_per_s")

    def verdict(ok: bool | None) -> str:
        return DASH if ok is None else ("met" if ok else "**missed**")

    rows = [
        (
            "RSS per idle connection ≤ 3 KB",
            f"{fnum(rss_b, 0)} B at {n:,}"
            + (
                f"; {fnum(big.get('per_conn_bytes'), 0)} B at {big.get('connections', 0):,}"
                if big
                else ""
            ),
            verdict(None if _nan(rss_b) else rss_b <= 3000),
        ),
        (
            f"≥ 100,000 deliveries/s and ≥ 3{TIMES} nchan",
            f"{fnum(sat)}/s; nchan (memory) {fnum(nsat)}/s: "
            + (f"{sat / nsat:.2f}{TIMES}" if sat and nsat else DASH)
            + (f"; bare write() ceiling {fnum(ceil_w)}/s" if ceil_w else ""),
            verdict(None if not sat else sat >= 100_000 and bool(nsat) and sat >= 3 * nsat),
        ),
        (
            f"p99 ≤ 2 ms at 20,000 ev/s ({n:,} connections)",
            f"{fms(p99_20k)} ms",
            verdict(None if _nan(p99_20k) else p99_20k <= 2.0),
        ),
        (
            "≥ 6,000 connections/s (JWT + subscribe)",
            f"{fnum(conn)}/s",
            verdict(None if not conn else conn >= 6000),
        ),
        (
            "reconnect storm: no Redis command > 10 ms",
            f"{slow.get('over_10ms', DASH)} over 10 ms, longest {fms(slow.get('max_ms'))} ms"
            if slow and "error" not in slow
            else DASH,
            verdict(None if not slow or "error" in slow else slow.get("over_10ms", 1) == 0),
        ),
        (
            "reconnect storm: 0 events lost",
            f"{fnum((g.get('replay') or {}).get('lost'))} lost",
            verdict(None if not g.get("replay") else (g.get("replay") or {}).get("lost") == 0),
        ),
    ]
    out = ["## sse-gateway against the targets of issue 4 (this run)", ""]
    out.append("| target | this run | |")
    out.append("|---|---|---|")
    out.extend(f"| {a} | {b} | {c} |" for a, b, c in rows)
    out.append("")
    return out


def max_client_cpu(results: dict[str, Any]) -> float:
    """The highest per-process load-client CPU % of any phase of any system."""
    best = 0.0

    def walk(v: Any) -> None:
        nonlocal best
        if isinstance(v, dict):
            for key, item in v.items():
                if key == "client_cpu_pct" and isinstance(item, list) and item:
                    best = max(best, *[x for x in item if not _nan(x)])
                else:
                    walk(item)
        elif isinstance(v, list):
            for item in v:
                walk(item)

    walk(results.get("systems", {}))
    walk(results.get("big", {}))
    return best


def args_concurrency(results: dict[str, Any]) -> int:
    return int(results.get("concurrency", 100))


def write_plots(json_path: Path, img_dir: Path) -> list[str]:
    if not PEER_PYTHON.exists():
        return ["plots skipped: no bench/.venv-peers"]
    img_dir.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(
        [str(PEER_PYTHON), str(PEERS / "plot.py"), str(json_path), str(img_dir)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    if proc.returncode != 0:
        return [f"plots failed: {proc.stderr[-1500:]}"]
    return [ln for ln in proc.stdout.splitlines() if ln.strip()]


# --------------------------------------------------------------------------- main


def _on_alarm(signum: int, frame: FrameType | None) -> None:
    raise TimeoutError("compare.py exceeded --max-seconds")


def _on_term(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--connections", type=int, default=None, help="N (default 10000; quick 200)")
    ap.add_argument("--quick", action="store_true", help="smoke run: small N, short phases")
    ap.add_argument(
        "--systems",
        default=",".join(SYSTEMS),
        help=f"comma-separated, from {', '.join(SYSTEMS)}",
    )
    ap.add_argument("--rates", default=None, help="latency rates, events/s (1000,5000,20000,50000)")
    ap.add_argument("--phase-seconds", type=float, default=None, help="per latency rate (8)")
    ap.add_argument("--flood-seconds", type=float, default=None, help="saturation phase (6)")
    ap.add_argument("--idle-seconds", type=float, default=None, help="15 s keep-alive window (15)")
    ap.add_argument("--hb-seconds", type=float, default=None, help="1 s keep-alive window (8)")
    ap.add_argument(
        "--big-connections", type=int, default=None, help="sse-gateway --workers 3 (50000)"
    )
    ap.add_argument("--no-big", action="store_true", help="skip the 50k scenario")
    ap.add_argument(
        "--no-ceiling", action="store_true", help="skip the bare write() ceiling (send_ceiling.py)"
    )
    ap.add_argument("--no-replay", action="store_true", help="skip the reconnect storm")
    ap.add_argument("--no-hb1", action="store_true", help="skip the 1 s keep-alive instances")
    ap.add_argument("--concurrency", type=int, default=100, help="connects in flight per process")
    ap.add_argument(
        "--nchan-conns",
        type=int,
        default=0,
        help="keep-alive connections of the nchan publisher, 2048 requests in flight over\n"
        "them (default: 64 for memory mode, 256 for Redis mode)",
    )
    ap.add_argument(
        "--wait-quiet",
        type=float,
        default=0.0,
        help="before each system starts, wait up to this many seconds for 2 s in which no\n"
        "CPU is more than 15%% busy (a shared machine)",
    )
    ap.add_argument("--no-pin", action="store_true")
    ap.add_argument("--no-install", action="store_true", help="do not apt-get / pip install")
    ap.add_argument(
        "--output",
        type=Path,
        default=None,
        help="markdown (docs/comparison.md; quick: bench/results/)",
    )
    ap.add_argument(
        "--img-dir", type=Path, default=None, help="plots (docs/img; quick: bench/results/img)"
    )
    ap.add_argument("--json", type=Path, default=None, help="raw figures (bench/results/...)")
    ap.add_argument("--keep-logs", type=Path, default=None)
    ap.add_argument(
        "--from-json", type=Path, default=None, help="only re-render the docs of an earlier run"
    )
    ap.add_argument("--max-seconds", type=float, default=None, help="hard limit (2400; quick 400)")
    args = ap.parse_args(argv)
    q = args.quick
    args.connections = args.connections or (200 if q else 10_000)
    args.rates = [
        float(r)
        for r in (args.rates or ("1000,5000" if q else "1000,5000,20000,50000")).split(",")
        if r.strip()
    ]
    args.phase_seconds = args.phase_seconds or (1.5 if q else 8.0)
    args.flood_seconds = args.flood_seconds or (2.0 if q else 6.0)
    args.idle_seconds = args.idle_seconds or (2.0 if q else 15.0)
    args.hb_seconds = args.hb_seconds or (2.0 if q else 8.0)
    args.big_connections = args.big_connections or (600 if q else 50_000)
    args.drain_seconds = 8.0 if q else 15.0
    args.replay_limit = 20.0 if q else 90.0
    args.settle = 1.0 if q else 3.0
    if q:
        args.wait_quiet = min(args.wait_quiet, 5.0)  # a smoke run does not wait long
    args.max_seconds = args.max_seconds or (400.0 if q else 2400.0)
    args.systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = [s for s in args.systems if s not in SYSTEMS]
    if unknown:
        ap.error(f"unknown system(s) {unknown}; known: {', '.join(SYSTEMS)}")
    # a smoke run does not overwrite the published figures
    if args.output is None:
        args.output = BENCH / "results" / "comparison-quick.md" if q else DOCS / "comparison.md"
    if args.img_dir is None:
        args.img_dir = BENCH / "results" / "img" if q else DOCS / "img"
    if args.json is None:
        args.json = BENCH / "results" / f"compare-{time.strftime('%Y%m%d-%H%M%S')}.json"
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.from_json is not None:  # re-render the docs and plots of an earlier run
        results = json.loads(args.from_json.read_text())
        for line in write_plots(args.from_json, args.img_dir):
            print(line)
        args.output.write_text(render(results))
        print(f"wrote {args.output} and plots in {args.img_dir}")
        return 0
    command = "python bench/compare.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    command = command.strip()
    signal.signal(signal.SIGTERM, _on_term)
    signal.signal(signal.SIGALRM, _on_alarm)
    try:
        if not args.no_install:
            ensure_system_packages()
            if "starlette" in args.systems:
                ensure_peer_venv()
            elif not PEER_PYTHON.exists():
                ensure_peer_venv()  # matplotlib
        for tool in ("redis-server", "nginx", "taskset"):
            if shutil.which(tool) is None and (
                tool != "nginx" or any("nchan" in s for s in args.systems)
            ):
                raise SetupError(f"{tool} not found")
    except (SetupError, subprocess.TimeoutExpired) as exc:
        print(f"setup error: {exc}", file=sys.stderr)
        return 2
    h = Harness(args)
    started = time.time()
    results: dict[str, Any] = {
        "command": command,
        "started": time.strftime("%Y-%m-%d %H:%M %Z"),
        "machine": {**gw.machine_info(), **versions()},
        "connections": args.connections,
        "processes": max(2, math.ceil(args.connections / 2500)),
        "concurrency": args.concurrency,
        "pinning": (
            f"servers on CPU {h.server_cpus} (`taskset -c {h.server_cpus}`); Redis, publishers, "
            f"load client and this script on CPU {','.join(map(str, h.load_cpus))}"
            if h.pin
            else "none"
        ),
        "rates": args.rates,
        "phase_seconds": args.phase_seconds,
        "drain_seconds": args.drain_seconds,
        "quick": args.quick,
        "systems": {},
    }
    status = 0
    signal.alarm(int(args.max_seconds))
    try:
        for key in args.systems:
            cls = SYSTEMS[key]
            say(f"== {key} ==", flush=True)
            try:
                full = key != "gateway-w2" and not args.no_replay
                res = run_main(h, cls, full)
                if key != "gateway-w2" and not args.no_hb1 and not cls.switch_keepalive:
                    say("  idle, 1 s keep-alive (separate instance) ...", flush=True)
                    res["idle1"] = run_heartbeat(h, cls, 1.0)
                    i1 = res["idle1"]
                    say(
                        f"    server CPU {fnum(_cpu_pct(i1), 1, '%')}, "
                        f"{fnum(i1.get('heartbeats_per_s'))} heartbeats/s",
                        flush=True,
                    )
            except SetupError as exc:
                print(f"  setup error: {exc}", file=sys.stderr)
                res = {"label": cls.label, "problems": [f"setup error: {exc}"]}
                status = 1
            results["systems"][key] = res
        if "gateway" in args.systems and not args.no_big:
            say(f"== sse-gateway --workers 3, {args.big_connections:,} connections ==", flush=True)
            try:
                results["big"] = run_big(h)
                b = results["big"]
                say(
                    f"  {b['connections']:,}/{b['wanted']:,} connected, "
                    f"{b['per_conn_bytes'] / 1024:.2f} KiB per connection",
                    flush=True,
                )
            except SetupError as exc:
                print(f"  setup error: {exc}", file=sys.stderr)
                results["big"] = {"problems": [str(exc)]}
                status = 1
        if "gateway" in args.systems and not args.no_ceiling:
            results["ceiling"] = run_ceiling(h)
    except (TimeoutError, KeyboardInterrupt) as exc:
        print(f"interrupted: {exc!r}", file=sys.stderr)
        status = 1
    finally:
        signal.alarm(0)
        h.cleanup()
    results["elapsed_min"] = (time.time() - started) / 60.0
    results["waited_quiet_s"] = h.waited
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=1, default=str))
    for line in write_plots(args.json, args.img_dir):
        print(line)
    text = render(results)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text)
    print(f"wrote {args.output}, {args.json} and plots in {args.img_dir}")
    if not results["systems"] or all(
        not r.get("connect", {}).get("connected") for r in results["systems"].values()
    ):
        status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
