#!/usr/bin/env python3
"""sse-gateway benchmark: one command, every process it starts is stopped when it ends.

Starts a private redis-server and the gateway (pinned to CPU 0 with taskset; Redis, the
publisher and the load client run on CPU 1), then measures:

  (a) RSS per idle connection at N connections (gateway VmRSS after - before, / N)
  (b) connections/s until all N clients have read `event: connected` (JWT checked per connection)
  (c) publish->receive latency p50/p99/p99.9 at fixed publish rates, with N connections open
  (d) max deliveries/s: publish as fast as possible to distinct players, count what clients get
  (e) replay storm: N clients reconnect at once with Last-Event-ID, each having missed 10
      history events; time until all caught up, Redis' slowest command (bench/replay.py)

    .venv/bin/python bench/run.py                      # 10,000 connections, ~1.5 minutes
    .venv/bin/python bench/run.py --quick              # smoke: 200 connections, < 20 s
    .venv/bin/python bench/run.py --replay             # only (e)
    .venv/bin/python bench/run.py --output results.md  # also write the tables as markdown

Exit status: 0 when clients connected and received events, 1 when no events arrived (or no
client connected, or the gateway died, or the replay storm lost, doubled or failed to recover
any event), 2 on a setup error. `--strict` also fails on any lost event, dropped connection or
failed connection attempt.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import math
import os
import platform
import re
import resource
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from types import FrameType
from typing import Any

import redis.exceptions
from loadclient import ClientConfig, LoadClient, PhaseStats
from replay import ReplayResult, run_replay
from replay import render as render_replay
from replay import summary_row as replay_summary_row

REPO = Path(__file__).resolve().parent.parent
BENCH = Path(__file__).resolve().parent
CLK_TCK = os.sysconf("SC_CLK_TCK")


class SetupError(RuntimeError):
    pass


# --------------------------------------------------------------------------- processes


try:
    _PRCTL: Any = ctypes.CDLL(None, use_errno=True).prctl  # resolved before any fork
except (OSError, AttributeError):
    _PRCTL = None


def _die_with_parent() -> None:
    """In a child before exec: SIGTERM it when the benchmark process dies (PR_SET_PDEATHSIG)."""
    if _PRCTL is not None:
        _PRCTL(1, int(signal.SIGTERM), 0, 0, 0)


def _child_setup(cpus: set[int] | None) -> Callable[[], None]:
    def setup() -> None:
        _die_with_parent()
        if cpus:
            os.sched_setaffinity(0, cpus)

    return setup


class Service:
    """A child process in its own session/process group, output to a log file."""

    def __init__(
        self,
        name: str,
        cmd: list[str],
        log_path: Path,
        env: dict[str, str],
        cpus: set[int] | None = None,
    ) -> None:
        self.name = name
        self.cmd = cmd
        self.log_path = log_path
        self.log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            cmd,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
            preexec_fn=_child_setup(cpus),
        )
        self.exit_code: int | None = None
        self.stop_seconds: float | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, grace: float = 15.0) -> None:
        """SIGTERM the process group, wait `grace`, then SIGKILL it."""
        if self.alive():
            started = time.monotonic()
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.exit_code = self.proc.wait(grace)
                self.stop_seconds = time.monotonic() - started
            except subprocess.TimeoutExpired:
                self.exit_code = None
        if self.proc.poll() is None or _group_alive(self.proc.pid):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(5.0)
        if self.exit_code is None:
            self.exit_code = self.proc.poll()
        self.log.close()

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def proc_tree(pid: int) -> list[int]:
    """pid and all its descendants (via /proc/<pid>/task/*/children)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo.extend(int(c) for c in f.read().split())
        except OSError:
            continue
    return out


def _one_kib(path: str, key: str) -> int:
    """The `key:` line of /proc/<pid>/status or smaps_rollup, KiB; 0 when unreadable."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def rss_kib(pid: int) -> int:
    """VmRSS of pid and its descendants, KiB."""
    return sum(_one_kib(f"/proc/{p}/status", "VmRSS:") for p in proc_tree(pid))


def pss_kib(pid: int) -> int:
    """Pss of pid and its descendants, KiB: pages shared after fork (a supervisor's workers)
    are counted once in all, where the VmRSS sum counts them in every process that maps them."""
    return sum(_one_kib(f"/proc/{p}/smaps_rollup", "Pss:") for p in proc_tree(pid))


def tcp_kernel_kib() -> int:
    """Kernel memory of every TCP socket on the machine (/proc/net/sockstat `mem`, pages), KiB:
    socket buffers, both ends of each loopback connection, not in any process's RSS."""
    try:
        with open("/proc/net/sockstat") as f:
            for line in f:
                if line.startswith("TCP:"):
                    fields = line.split()
                    return int(fields[fields.index("mem") + 1]) * os.sysconf("SC_PAGE_SIZE") // 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def slab_kib() -> int:
    """Kernel slab memory of the machine (/proc/meminfo `Slab`), KiB: socket, inode, file and
    epoll structures of every connection (both ends on loopback), and whatever else runs."""
    return _one_kib("/proc/meminfo", "Slab:")


def _own_cpu_seconds(pid: int) -> float | None:
    """utime + stime of one process, seconds; None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK
    except (OSError, IndexError, ValueError):
        return None


def cpu_by_process(pid: int) -> dict[int, float]:
    """utime + stime of pid and of each live descendant, {pid: seconds}."""
    out: dict[int, float] = {}
    for p in proc_tree(pid):
        seconds = _own_cpu_seconds(p)
        if seconds is not None:
            out[p] = seconds
    return out


def cpu_seconds(pid: int) -> float:
    """utime + stime of pid and its live descendants, seconds."""
    return sum(cpu_by_process(pid).values())


@dataclass
class ProcessUsage:
    """One process of the gateway's tree (the supervisor and its workers, or the one process)."""

    pid: int
    role: str  # "gateway" (no workers), "supervisor" or "worker"
    rss_kib: int
    pss_kib: int
    cpu_s: float  # utime + stime since it started
    fds: int = -1  # open file descriptors: a worker has its streams + ~21 others (-1: unreadable)


def gateway_processes(pid: int) -> list[ProcessUsage]:
    """The gateway's process tree now: VmRSS, Pss and CPU time of each process."""
    pids = proc_tree(pid)
    out = []
    for p in pids:
        seconds = _own_cpu_seconds(p)
        if seconds is None:
            continue
        role = "worker" if p != pid else ("supervisor" if len(pids) > 1 else "gateway")
        rss = _one_kib(f"/proc/{p}/status", "VmRSS:")
        pss = _one_kib(f"/proc/{p}/smaps_rollup", "Pss:")
        try:
            fds = len(os.listdir(f"/proc/{p}/fd"))
        except OSError:
            fds = -1
        out.append(ProcessUsage(p, role, rss, pss, seconds, fds))
    return out


def http_get(port: int, path: str, timeout: float = 2.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as r:
            return r.status, r.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode("utf-8", "replace")


_METRIC = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*(?:\{[^}]*\})?)\s+([-+0-9.eEinfNa]+)")


def metrics(port: int) -> dict[str, float]:
    """The gateway's /metrics as {"name{labels}": value}; {} when unavailable."""
    try:
        status, body = http_get(port, "/metrics", timeout=5.0)
    except OSError:
        return {}
    if status != 200:
        return {}
    out: dict[str, float] = {}
    for line in body.splitlines():
        m = _METRIC.match(line)
        if m:
            try:
                out[m.group(1)] = float(m.group(2))
            except ValueError:
                continue
    return out


def metric_delta(before: dict[str, float], after: dict[str, float], prefix: str) -> dict[str, int]:
    return {
        k: int(after[k] - before.get(k, 0.0))
        for k in after
        if k.startswith(prefix) and after[k] != before.get(k, 0.0)
    }


def core_jiffies() -> list[tuple[int, int, int, int]]:
    """(process, irq + softirq, total, steal) jiffies of each CPU from /proc/stat."""
    out: list[tuple[int, int, int, int]] = []
    try:
        with open("/proc/stat") as f:
            for line in f:
                if line.startswith("cpu") and line[3].isdigit():
                    v = [int(x) for x in line.split()[1:9]]
                    # user nice system idle iowait irq softirq steal
                    out.append((v[0] + v[1] + v[2], v[5] + v[6], sum(v), v[7]))
    except (OSError, ValueError, IndexError):
        pass
    return out


@dataclass
class CpuWindow:
    gateway: float = math.nan  # % of one core
    redis: float = math.nan
    cores: list[float] = field(default_factory=list)  # busy % of each CPU, every process
    softirq: list[float] = field(default_factory=list)  # irq + softirq % of each CPU
    steal: list[float] = field(default_factory=list)  # % of each vCPU taken by the hypervisor
    process_pct: float = math.nan  # user + system time of every process, % of one core
    orchestrator: float = 0.0  # this process (sampling, probing, polling the clients)
    # each gateway process (supervisor, workers) alive at both ends of the window: pid -> %
    gateway_procs: dict[int, float] = field(default_factory=dict)

    def others(self, *ours: float) -> float:
        """CPU % used by processes that are not part of the benchmark."""
        mine = self.gateway + self.redis + self.orchestrator + sum(ours)
        return max(0.0, self.process_pct - mine)


class CpuSampler:
    """Samples gateway / redis CPU time and per-core busy time, to read any window later.

    Loopback TCP does the receiving socket's work in softirq on the sending CPU, and that
    time is charged to no process: it shows as `softirq` of the core, not as gateway CPU.
    """

    def __init__(self, gateway_pid: int, redis_pid: int) -> None:
        self.gateway_pid = gateway_pid
        self.redis_pid = redis_pid
        self.samples: list[
            tuple[float, float, float, list[tuple[int, int, int, int]], float, dict[int, float]]
        ] = []

    def sample(self) -> None:
        ru = resource.getrusage(resource.RUSAGE_SELF)
        per_process = cpu_by_process(self.gateway_pid)
        self.samples.append(
            (
                time.time(),
                sum(per_process.values()),
                cpu_seconds(self.redis_pid),
                core_jiffies(),
                ru.ru_utime + ru.ru_stime,
                per_process,
            )
        )

    def window(self, t0: float, t1: float) -> CpuWindow:
        """CPU use between the samples closest to t0 and t1."""
        if len(self.samples) < 2:
            return CpuWindow()
        a = min(self.samples, key=lambda s: abs(s[0] - t0))
        b = min(self.samples, key=lambda s: abs(s[0] - t1))
        wall = b[0] - a[0]
        if wall <= 0.05:
            return CpuWindow()
        cores, soft, steal = [], [], []
        process = 0.0
        for (ap, ai, at, ast), (bp, bi, bt, bst) in zip(a[3], b[3], strict=False):
            total = bt - at
            if total <= 0:
                continue
            cores.append(100.0 * (bp - ap + bi - ai) / total)
            soft.append(100.0 * (bi - ai) / total)
            steal.append(100.0 * (bst - ast) / total)
            process += (bp - ap) / CLK_TCK
        return CpuWindow(
            gateway=100.0 * (b[1] - a[1]) / wall,
            redis=100.0 * (b[2] - a[2]) / wall,
            cores=cores,
            softirq=soft,
            steal=steal,
            process_pct=100.0 * process / wall,
            orchestrator=100.0 * (b[4] - a[4]) / wall,
            gateway_procs={
                pid: 100.0 * (seconds - a[5][pid]) / wall
                for pid, seconds in b[5].items()
                if pid in a[5]
            },
        )


def wait_for_quiet(limit: float, threshold: float = 15.0) -> float:
    """Waits (at most `limit` s) for 2 s in which no CPU is busier than `threshold` %."""
    started = time.monotonic()
    while time.monotonic() - started < limit:
        a = core_jiffies()
        time.sleep(2.0)
        b = core_jiffies()
        busy = [
            100.0 * (bp - ap + bi - ai) / (bt - at)
            for (ap, ai, at, _), (bp, bi, bt, _) in zip(a, b, strict=False)
            if bt > at
        ]
        if busy and max(busy) < threshold:
            break
    return time.monotonic() - started


class HealthProber:
    """A thread that times `GET /healthz` every 0.25 s: how responsive the gateway stays."""

    def __init__(self, port: int, max_seconds: float) -> None:
        self.port = port
        self.max_seconds = max_seconds
        self.times_ms: list[float] = []
        self.failures = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        deadline = time.monotonic() + self.max_seconds
        while not self._stop.is_set() and time.monotonic() < deadline:
            started = time.perf_counter()
            try:
                status, _ = http_get(self.port, "/healthz", timeout=10.0)
                if status == 200:
                    self.times_ms.append((time.perf_counter() - started) * 1000.0)
                else:
                    self.failures += 1
            except OSError:
                self.failures += 1
            self._stop.wait(0.25)

    def __enter__(self) -> HealthProber:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(15.0)

    def summary(self) -> dict[str, float]:
        t = sorted(self.times_ms)
        if not t:
            return {"n": 0, "failures": self.failures}
        return {"n": len(t), "p50": t[len(t) // 2], "max": t[-1], "failures": self.failures}


# --------------------------------------------------------------------------- scenarios


@dataclass
class LatencyResult:
    target_rate: float
    achieved_rate: float
    published: int
    routed: int  # PUBLISH replies: messages Redis handed to a subscriber
    received: int
    latency_ms: dict[str, float]
    cpu: CpuWindow
    publisher_cpu_pct: float
    client_cpu_pct: list[float]
    publisher_max_lag_ms: float
    dropped: int
    heartbeats: int
    wall_s: float
    healthz_ms: dict[str, float] = field(default_factory=dict)
    gateway_metrics: dict[str, int] = field(default_factory=dict)


@dataclass
class FloodResult:
    duration_s: float
    published: int
    publish_rate: float
    routed: int
    received: int
    delivered_per_s: float  # received by clients in the steady window / window length
    drain_s: float  # after the publisher stopped, until clients stopped receiving
    publisher_throttled_s: float  # publisher waiting for the gateway's Redis backlog to shrink
    max_backlog_bytes: int
    cpu: CpuWindow
    publisher_cpu_pct: float
    client_cpu_pct: list[float]
    dropped: int
    heartbeats: int
    wall_s: float
    healthz_ms: dict[str, float] = field(default_factory=dict)
    gateway_metrics: dict[str, int] = field(default_factory=dict)


@dataclass
class Results:
    command: str
    started: str
    machine: dict[str, str]
    connections: int
    processes: int
    pinned: str
    gateway_cmd: str
    keepalive_s: float = 15.0
    rss_baseline_kib: int = 0
    rss_connected_kib: int = 0
    rss_per_conn_bytes: float = 0.0
    pss_baseline_kib: int = 0  # Pss: fork-shared pages counted once over the process tree
    pss_connected_kib: int = 0
    pss_per_conn_bytes: float = 0.0
    rss_end_kib: int = 0
    tcp_kernel_baseline_kib: int = 0  # every TCP socket of the machine, kernel buffers
    tcp_kernel_connected_kib: int = 0
    slab_baseline_kib: int = 0  # kernel slab of the machine
    slab_connected_kib: int = 0
    # each gateway process once all clients connected (and idled), and at the end of the phases
    processes_connected: list[ProcessUsage] = field(default_factory=list)
    processes_end: list[ProcessUsage] = field(default_factory=list)
    rss_after_close_kib: int = 0
    connect: dict[str, Any] = field(default_factory=dict)
    connect_cpu: CpuWindow = field(default_factory=CpuWindow)
    idle: dict[str, Any] = field(default_factory=dict)
    latency: list[LatencyResult] = field(default_factory=list)
    flood: FloodResult | None = None
    replay: ReplayResult | None = None
    final_open: int = -1  # -1: not measured (the run stopped early)
    gateway_alive: bool = True
    gateway_exit_code: int | None = None
    gateway_stop_s: float | None = None
    gateway_log_findings: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def run_publisher(
    redis_url: str,
    players: int,
    rate: float,
    duration: float,
    sampler: CpuSampler,
    on_tick: Any = None,
    extra: tuple[str, ...] = (),
) -> dict[str, Any]:
    cmd = [
        sys.executable,
        str(BENCH / "publisher.py"),
        "--redis",
        redis_url,
        "--players",
        str(players),
        "--rate",
        str(rate),
        "--duration",
        str(duration),
        "--json",
        *extra,
    ]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=_die_with_parent
    )
    deadline = time.monotonic() + duration + 60.0
    try:
        while proc.poll() is None:
            if time.monotonic() > deadline:
                raise SetupError("publisher did not finish in time")
            sampler.sample()
            if on_tick is not None:
                on_tick()
            time.sleep(0.2)
        out, err = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
    sampler.sample()
    if proc.returncode != 0 and not out.strip():
        raise SetupError(f"publisher failed: {err.decode(errors='replace')[-2000:]}")
    result: dict[str, Any] = json.loads(out.decode().strip().splitlines()[-1])
    return result


def wait_for_delivery(lc: LoadClient, target: int, limit: float) -> tuple[int, float]:
    """Polls client counts until `target` bench events arrived, or none for 1.5 s, or `limit` s.

    Returns (events received, seconds until the last one arrived).
    """
    started = time.monotonic()
    last = lc.count()
    last_change = started
    while last < target and time.monotonic() - started < limit:
        time.sleep(0.1)
        now_count = lc.count()
        if now_count != last:
            last, last_change = now_count, time.monotonic()
        elif time.monotonic() - last_change >= 1.5:
            break
    return last, max(0.0, last_change - started)


def latency_phase(
    lc: LoadClient,
    redis_url: str,
    gw_port: int,
    players: int,
    rate: float,
    duration: float,
    sampler: CpuSampler,
) -> LatencyResult:
    lc.reset(measure_latency=True)
    m0 = metrics(gw_port)
    with HealthProber(gw_port, duration + 60.0) as probe:
        pub = run_publisher(redis_url, players, rate, duration, sampler)
    wait_for_delivery(lc, pub["receivers"], 10.0)
    stats = lc.stats()
    m1 = metrics(gw_port)
    t0, t1 = pub["started_at"], pub["started_at"] + pub["elapsed_s"]
    cpu = sampler.window(t0, t1)
    return LatencyResult(
        target_rate=rate,
        achieved_rate=pub["achieved_rate"],
        published=pub["published"],
        routed=pub["receivers"],
        received=stats.bench,
        latency_ms=stats.latency_ms,
        cpu=cpu,
        publisher_cpu_pct=100.0 * pub["cpu_s"] / max(pub["elapsed_s"], 1e-9),
        client_cpu_pct=stats.client_cpu_pct,
        publisher_max_lag_ms=pub["max_lag_ms"],
        dropped=stats.dropped,
        heartbeats=stats.heartbeats,
        wall_s=stats.wall_s,
        healthz_ms=probe.summary(),
        gateway_metrics=_interesting(m0, m1),
    )


def _interesting(m0: dict[str, float], m1: dict[str, float]) -> dict[str, int]:
    out: dict[str, int] = {}
    for prefix in (
        "sse_gateway_events_received_total",
        "sse_gateway_events_delivered_total",
        "sse_gateway_connections_closed_total",
        "sse_gateway_connections_rejected_total",
        "sse_gateway_events_dropped_total",
        "sse_gateway_broker_reconnects_total",
    ):
        out.update(metric_delta(m0, m1, prefix))
    return out


def flood_phase(
    lc: LoadClient,
    redis_url: str,
    gw_port: int,
    players: int,
    duration: float,
    sampler: CpuSampler,
    drain_limit: float,
    max_backlog: int,
) -> FloodResult:
    lc.reset(measure_latency=False)
    m0 = metrics(gw_port)
    marks: list[tuple[float, PhaseStats]] = []
    t_start = time.time()
    # steady window: from 1/4 to 3/4 of the publishing time (the publisher needs ~0.3 s to start)
    w0, w1 = t_start + 0.3 + duration * 0.25, t_start + 0.3 + duration * 0.75

    def on_tick() -> None:
        now = time.time()
        if (not marks and now >= w0) or (len(marks) == 1 and now >= w1):
            marks.append((now, lc.stats()))

    with HealthProber(gw_port, duration + 60.0) as probe:
        pub = run_publisher(
            redis_url,
            players,
            0,
            duration,
            sampler,
            on_tick,
            ("--max-backlog", str(max_backlog)) if max_backlog else (),
        )
    _, drain = wait_for_delivery(lc, pub["receivers"], drain_limit)
    stats = lc.stats()
    m1 = metrics(gw_port)
    if len(marks) == 2:
        (ta, sa), (tb, sb) = marks
        window = sb.wall_s - sa.wall_s
        rate = (sb.bench - sa.bench) / window if window > 0 else 0.0
        cpu = sampler.window(ta, tb)
    else:
        rate = stats.bench / max(pub["elapsed_s"], 1e-9)
        cpu = sampler.window(pub["started_at"], pub["started_at"] + pub["elapsed_s"])
    return FloodResult(
        duration_s=pub["elapsed_s"],
        published=pub["published"],
        publish_rate=pub["achieved_rate"],
        routed=pub["receivers"],
        received=stats.bench,
        delivered_per_s=rate,
        drain_s=drain,
        publisher_throttled_s=pub.get("throttled_s", 0.0),
        max_backlog_bytes=pub.get("max_backlog_bytes", 0),
        cpu=cpu,
        publisher_cpu_pct=100.0 * pub["cpu_s"] / max(pub["elapsed_s"], 1e-9),
        client_cpu_pct=stats.client_cpu_pct,
        dropped=stats.dropped,
        heartbeats=stats.heartbeats,
        wall_s=stats.wall_s,
        healthz_ms=probe.summary(),
        gateway_metrics=_interesting(m0, m1),
    )


# --------------------------------------------------------------------------- environment


def machine_info() -> dict[str, str]:
    info = {
        "nproc": str(os.cpu_count()),
        "cpu": "?",
        "kernel": platform.release(),
        "python": platform.python_version(),
    }
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
        mem = Path("/proc/meminfo").read_text().splitlines()[0].split()[1]
        info["memory"] = f"{int(mem) // 1024} MiB"
    except (OSError, IndexError, ValueError):
        pass
    for dist in ("sse-gateway", "uvloop", "httptools", "redis", "hiredis", "PyJWT"):
        try:
            info[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            info[dist] = "not installed"
    try:
        out = subprocess.run(
            ["redis-server", "--version"], capture_output=True, text=True, timeout=10
        ).stdout
        m = re.search(r"v=(\S+)", out)
        info["redis-server"] = m.group(1) if m else out.strip()
    except (OSError, subprocess.TimeoutExpired):
        info["redis-server"] = "?"
    try:
        info["git"] = (
            subprocess.run(
                ["git", "-C", str(REPO), "describe", "--always", "--dirty"],
                capture_output=True,
                text=True,
                timeout=10,
            ).stdout.strip()
            or "no commit"
        )
    except (OSError, subprocess.TimeoutExpired):
        info["git"] = "?"
    return info


def start_redis(port: int, logdir: Path, wrapper: list[str] | None = None) -> Service:
    """`wrapper`: a command that execs redis-server, e.g. `chrt -f 10` (its pid stays ours)."""
    if shutil.which("redis-server") is None:
        raise SetupError("redis-server not found (Debian: apt-get install redis-server)")
    cmd = [
        *(wrapper or []),
        "redis-server",
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
        "--daemonize",
        "no",
        "--loglevel",
        "warning",
        "--dir",
        str(logdir),
    ]
    svc = Service("redis", cmd, logdir / "redis.log", dict(os.environ))
    deadline = time.monotonic() + 10.0
    while time.monotonic() < deadline:
        if not svc.alive():
            raise SetupError(f"redis-server exited:\n{svc.log_tail()}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                if s.recv(64).startswith(b"+PONG"):
                    return svc
        except OSError:
            pass
        time.sleep(0.05)
    raise SetupError("redis-server did not answer PING within 10 s")


def start_gateway(
    prefix: list[str], args: list[str], port: int, logdir: Path, cpus: str | None
) -> Service:
    cmd = [*prefix, *args]
    affinity: set[int] | None = None
    if cpus is not None:
        if shutil.which("taskset"):
            cmd = ["taskset", "-c", cpus, *cmd]
        else:
            affinity = {int(c) for c in cpus.split(",")}
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(REPO / "src"), env.get("PYTHONPATH", "")) if p
    )
    svc = Service("gateway", cmd, logdir / "gateway.log", env, affinity)
    deadline = time.monotonic() + 30.0
    last = ""
    while time.monotonic() < deadline:
        if not svc.alive():
            raise SetupError(f"gateway exited with {svc.proc.poll()}:\n{svc.log_tail()}")
        try:
            status, body = http_get(port, "/readyz", timeout=1.0)
            if status == 200:
                return svc
            last = f"{status} {body[:200]}"
        except OSError as exc:
            last = str(exc)
        time.sleep(0.1)
    raise SetupError(f"gateway not ready within 30 s (last /readyz: {last}):\n{svc.log_tail()}")


def log_findings(path: Path, limit: int = 12) -> list[str]:
    """Tracebacks and ERROR/CRITICAL/WARNING lines of the gateway log (first few, with counts)."""
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return []
    hits = [
        ln
        for ln in lines
        if "Traceback" in ln or re.search(r"\b(ERROR|CRITICAL|WARNING|Exception)\b", ln)
    ]
    out = hits[:limit]
    if len(hits) > limit:
        out.append(f"... {len(hits) - limit} more matching lines in {path}")
    return out


# --------------------------------------------------------------------------- report


def fmt_ms(v: float | None) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:.2f}" if v < 100 else f"{v:.0f}"


def fmt_pct(v: float) -> str:
    return "-" if math.isnan(v) else f"{v:.0f}%"


def fmt_cpus(values: list[float]) -> str:
    if not values:
        return "-"
    return f"{sum(values):.0f}% total (max {max(values):.0f}%/proc)"


def fmt_probe(p: dict[str, float]) -> str:
    if not p.get("n"):
        return f"no answer ({p.get('failures', 0):.0f} failed)" if p else "-"
    failed = f", {p['failures']:.0f} failed" if p.get("failures") else ""
    return f"{fmt_ms(p['p50'])} / {fmt_ms(p['max'])} ms{failed}"


def fmt_cores(w: CpuWindow) -> str:
    parts = []
    for i, (v, irq) in enumerate(zip(w.cores, w.softirq, strict=False)):
        st = w.steal[i] if i < len(w.steal) else 0.0
        extra = f", {st:.0f}% steal" if st >= 1.0 else ""
        parts.append(f"cpu{i} {fmt_pct(v)} ({fmt_pct(irq)} irq{extra})")
    return " / ".join(parts) or "-"


def render(res: Results) -> str:
    L: list[str] = []
    c = res.connect
    L.append(f"## Results: {res.connections:,} connections, {res.processes} client processes")
    L.append("")
    L.append(f"Pinning: {res.pinned}. Command: `{res.command}`")
    L.append("")
    L.append("| scenario | result | details |")
    L.append("|---|---|---|")
    if not c:  # --replay: only scenario (e)
        if res.replay is not None:
            L.append(replay_summary_row(res.replay))
            L.append("")
            L.extend(render_replay(res.replay, with_problems=False))
        L.append("### Health")
        L.append("")
        _render_tail(L, res)
        return "\n".join(L)
    per_conn = res.rss_per_conn_bytes / 1024
    n_procs = len(res.processes_connected)
    procs = f" (sum of {n_procs} processes)" if n_procs > 1 else ""
    pss = (
        f"; Pss {res.pss_baseline_kib / 1024:.1f} -> {res.pss_connected_kib / 1024:.1f} MiB "
        f"= {res.pss_per_conn_bytes / 1024:.2f} KiB each"
        if res.pss_connected_kib
        else ""
    )
    L.append(
        f"| (a) RSS per idle connection | **{per_conn:.2f} KiB** | gateway VmRSS{procs} "
        f"{res.rss_baseline_kib / 1024:.1f} MiB -> {res.rss_connected_kib / 1024:.1f} MiB "
        f"with {c.get('connected', 0):,} open{pss} |"
    )
    ttc = c.get("time_to_connected_ms", {})
    L.append(
        f"| (b) connections/s | **{c.get('rate_per_s', 0):,.0f}/s** | "
        f"{c.get('connected', 0):,}/{c.get('wanted', 0):,} in {c.get('elapsed_s', 0):.2f} s; "
        f"time to `connected` p50 {fmt_ms(ttc.get('p50'))} / p99 {fmt_ms(ttc.get('p99'))} ms; "
        f"failed attempts {c.get('failed_attempts') or 0} |"
    )
    for lr in res.latency:
        lat = lr.latency_ms
        L.append(
            f"| (c) latency @ {lr.target_rate:,.0f} ev/s | **p50 {fmt_ms(lat.get('p50'))} / "
            f"p99 {fmt_ms(lat.get('p99'))} ms** | p99.9 {fmt_ms(lat.get('p99.9'))}, max "
            f"{fmt_ms(lat.get('max'))} ms; published {lr.published:,} "
            f"({lr.achieved_rate:,.0f}/s), received {lr.received:,}; gateway CPU "
            f"{fmt_pct(lr.cpu.gateway)} |"
        )
    f = res.flood
    if f is not None:
        L.append(
            f"| (d) max deliveries/s | **{f.delivered_per_s:,.0f}/s** | publisher "
            f"{f.publish_rate:,.0f}/s for {f.duration_s:.1f} s; received {f.received:,} of "
            f"{f.published:,}; drain {f.drain_s:.1f} s; publisher paused "
            f"{f.publisher_throttled_s:.1f} s for backlog; gateway CPU {fmt_pct(f.cpu.gateway)} |"
        )
    if res.replay is not None:
        L.append(replay_summary_row(res.replay))
    L.append("")
    L.append("### CPU during each phase (% of one core)")
    L.append("")
    L.append(
        "Per-core busy time counts every process on the machine; `others` is what the cores "
        "spent beyond our processes' own CPU time: other programs, and kernel threads such as "
        "ksoftirqd doing loopback TCP work. `irq` is interrupt/softirq time charged to no "
        "process (loopback TCP receive work runs there on the sending core); `steal` is time "
        "the hypervisor gave to other VMs."
    )
    L.append("")
    L.append(
        "| phase | gateway | redis | publisher | load client | others (incl. kernel threads) | "
        "busy per core (of which irq) | `GET /healthz` p50 / max |"
    )
    L.append("|---|---|---|---|---|---|---|---|")
    conn_cpu = c.get("client_cpu_s", [])
    if conn_cpu and c.get("elapsed_s"):
        cw = res.connect_cpu
        cl = [100 * x / c["elapsed_s"] for x in conn_cpu]
        L.append(
            f"| connect | {fmt_pct(cw.gateway)} | {fmt_pct(cw.redis)} | - | {fmt_cpus(cl)} | "
            f"{fmt_pct(cw.others(*cl))} | {fmt_cores(cw)} | - |"
        )
    for lr in res.latency:
        L.append(
            f"| {lr.target_rate:,.0f} ev/s | {fmt_pct(lr.cpu.gateway)} | "
            f"{fmt_pct(lr.cpu.redis)} | {lr.publisher_cpu_pct:.0f}% | "
            f"{fmt_cpus(lr.client_cpu_pct)} | "
            f"{fmt_pct(lr.cpu.others(lr.publisher_cpu_pct, *lr.client_cpu_pct))} | "
            f"{fmt_cores(lr.cpu)} | {fmt_probe(lr.healthz_ms)} |"
        )
    if f is not None:
        L.append(
            f"| max rate | {fmt_pct(f.cpu.gateway)} | {fmt_pct(f.cpu.redis)} | "
            f"{f.publisher_cpu_pct:.0f}% | {fmt_cpus(f.client_cpu_pct)} | "
            f"{fmt_pct(f.cpu.others(f.publisher_cpu_pct, *f.client_cpu_pct))} | "
            f"{fmt_cores(f.cpu)} | {fmt_probe(f.healthz_ms)} |"
        )
    L.append("")
    _render_processes(L, res)
    L.append("### Latency detail (ms)")
    L.append("")
    L.append(
        "| rate | published | routed | received | p50 | p90 | p99 | p99.9 | max | pub lag max |"
    )
    L.append("|---|---|---|---|---|---|---|---|---|---|")
    for lr in res.latency:
        lat = lr.latency_ms
        L.append(
            f"| {lr.target_rate:,.0f}/s | {lr.published:,} | {lr.routed:,} | {lr.received:,} | "
            f"{fmt_ms(lat.get('p50'))} | {fmt_ms(lat.get('p90'))} | {fmt_ms(lat.get('p99'))} | "
            f"{fmt_ms(lat.get('p99.9'))} | {fmt_ms(lat.get('max'))} | "
            f"{lr.publisher_max_lag_ms:.1f} |"
        )
    L.append("")
    L.append("### Health")
    L.append("")
    idle = res.idle
    L.append(
        f"- idle {idle.get('wall_s', 0):.1f} s after connect: "
        f"heartbeats {idle.get('heartbeats', 0)}"
        f", other events {idle.get('other', 0)}, dropped {idle.get('dropped', 0)}"
    )
    hb = [(f"{lr.target_rate:,.0f}/s", lr.heartbeats, lr.wall_s) for lr in res.latency]
    if f is not None:
        hb.append(("max rate", f.heartbeats, f.wall_s))
    if hb and res.keepalive_s > 0:
        n = c.get("connected", 0)
        L.append(
            "- heartbeats received (expected about connections x seconds / "
            f"{res.keepalive_s:g} s): "
            + "; ".join(
                f"{name}: {got:,} in {wall:.1f} s (~{n * wall / res.keepalive_s:,.0f})"
                for name, got, wall in hb
            )
        )
    if res.tcp_kernel_connected_kib:
        L.append(
            "- kernel TCP memory, every socket of the machine (both ends of each connection; "
            f"in no process's RSS): {res.tcp_kernel_baseline_kib:,} KiB before the clients, "
            f"{res.tcp_kernel_connected_kib:,} KiB with {c.get('connected', 0):,} open; kernel "
            f"slab (socket, inode, file, epoll structures, both ends): "
            f"{res.slab_baseline_kib / 1024:,.1f} -> {res.slab_connected_kib / 1024:,.1f} MiB"
        )
    if res.final_open >= 0:
        L.append(
            f"- open at the end: {res.final_open:,}/{res.connections:,}; gateway RSS at the end "
            f"{res.rss_end_kib / 1024:.1f} MiB, after all clients closed "
            f"{res.rss_after_close_kib / 1024:.1f} MiB"
        )
    for lr in res.latency:
        if lr.gateway_metrics:
            L.append(f"- metrics @ {lr.target_rate:,.0f}/s: {lr.gateway_metrics}")
    if f is not None and f.gateway_metrics:
        L.append(f"- metrics @ max rate: {f.gateway_metrics}")
    _render_tail(L, res)
    return "\n".join(L)


def _render_processes(L: list[str], res: Results) -> None:
    """Each gateway process: memory with every client connected, CPU in each phase."""
    procs = res.processes_connected
    if not procs:
        return
    windows = [("connect", res.connect_cpu)]
    windows += [(f"{lr.target_rate:,.0f} ev/s", lr.cpu) for lr in res.latency]
    if res.flood is not None:
        windows.append(("max rate", res.flood.cpu))
    L.append("### Gateway processes")
    L.append("")
    L.append(
        f"Open files (a worker: its streams + ~21 others), VmRSS and Pss of each process with "
        f"{res.connect.get('connected', 0):,} connections open, and CPU in % of one core per "
        "phase. The VmRSS sum counts a page that workers still share with the supervisor "
        "(copy-on-write after fork) once per process: an upper bound. Pss divides each shared "
        "page among the processes that map it, so the Pss sum is what the instance holds; it "
        "also grows as workers write to inherited pages."
    )
    L.append("")
    L.append(
        "| process | open files | VmRSS | Pss | "
        + " | ".join(f"CPU {name}" for name, _ in windows)
        + " |"
    )
    L.append("|---|---|---|---|" + "---|" * len(windows))
    for pu in procs:
        cpus = [fmt_pct(w.gateway_procs.get(pu.pid, math.nan)) for _, w in windows]
        L.append(
            f"| {pu.role} {pu.pid} | {pu.fds:,} | {pu.rss_kib / 1024:.1f} MiB | "
            f"{pu.pss_kib / 1024:.1f} MiB | " + " | ".join(cpus) + " |"
        )
    L.append(
        f"| **all** | **{sum(p.fds for p in procs):,}** | "
        f"**{sum(p.rss_kib for p in procs) / 1024:.1f} MiB** | "
        f"**{sum(p.pss_kib for p in procs) / 1024:.1f} MiB** | "
        + " | ".join(f"**{fmt_pct(w.gateway)}**" for _, w in windows)
        + " |"
    )
    L.append("")


def _render_tail(L: list[str], res: Results) -> None:
    """Gateway stop, problems, log findings, (e) and the machine: the end of every report."""
    L.append(
        f"- gateway stop: exit code {res.gateway_exit_code}, "
        f"{fmt_ms(res.gateway_stop_s)} s after SIGTERM"
    )
    for p in res.problems:
        L.append(f"- **problem:** {p}")
    if res.gateway_log_findings:
        L.append("- gateway log (warnings/errors):")
        L.append("")
        L.append("```")
        L.extend(res.gateway_log_findings)
        L.append("```")
    L.append("")
    if res.replay is not None and res.connect:
        L.extend(render_replay(res.replay, with_problems=False))
    L.append("### Machine")
    L.append("")
    for k, v in res.machine.items():
        L.append(f"- {k}: {v}")
    L.append("")


# --------------------------------------------------------------------------- main


def _on_alarm(signum: int, frame: FrameType | None) -> None:
    raise TimeoutError("benchmark exceeded --max-seconds")


def _on_term(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--connections", type=int, default=None, help="default 10000 (quick: 200)")
    ap.add_argument("--processes", type=int, default=0, help="client processes (default N/2500)")
    ap.add_argument("--quick", action="store_true", help="seconds-long smoke run")
    ap.add_argument("--rates", default=None, help="latency phases, events/s (1000,5000,20000)")
    ap.add_argument("--phase-seconds", type=float, default=None, help="per latency rate (10)")
    ap.add_argument("--flood-seconds", type=float, default=None, help="max-rate phase (6; 0 skips)")
    ap.add_argument("--idle-seconds", type=float, default=None, help="settle before RSS (3)")
    ap.add_argument(
        "--flood-backlog",
        type=int,
        default=2_000_000,
        help="max-rate phase: the publisher pauses while Redis buffers more than this many\n"
        "bytes for the gateway (0: never; Redis then drops the gateway at 32 MB)",
    )
    ap.add_argument("--concurrency", type=int, default=100, help="connects in flight per process")
    ap.add_argument("--output", type=Path, default=None, help="write the tables as markdown")
    ap.add_argument("--json", type=Path, default=None, help="write all figures as JSON")
    ap.add_argument("--no-pin", action="store_true", help="do not pin gateway / load to CPUs")
    ap.add_argument(
        "--gateway-cmd",
        default=None,
        help="command that starts the gateway, before `serve` (default: <python> -m sse_gateway)",
    )
    ap.add_argument(
        "--gateway-arg",
        action="append",
        default=[],
        help="extra argument for `serve` (repeatable), e.g. --gateway-arg=--workers=2",
    )
    ap.add_argument(
        "--keepalive",
        type=float,
        default=15.0,
        help="heartbeat period passed to the gateway (--keepalive-period), seconds",
    )
    ap.add_argument("--keep-logs", type=Path, default=None, help="directory for process logs")
    ap.add_argument(
        "--redis-wrapper",
        default="",
        help="command that execs redis-server, e.g. 'chrt -f 10' so that the load client\n"
        "sharing its CPU cannot preempt it (SLOWLOG times are wall-clock)",
    )
    ap.add_argument(
        "--wait-quiet",
        type=float,
        default=0.0,
        help="first wait up to this many seconds for an idle machine (no CPU > 15%% busy)",
    )
    ap.add_argument("--replay", action="store_true", help="run only scenario (e), the replay storm")
    ap.add_argument("--no-replay", action="store_true", help="skip scenario (e)")
    ap.add_argument(
        "--replay-clients", type=int, default=None, help="(e): clients (default: --connections)"
    )
    ap.add_argument("--replay-missed", type=int, default=10, help="(e): events each client misses")
    ap.add_argument(
        "--replay-concurrency",
        type=int,
        default=0,
        help="(e): reconnect attempts in flight per client process (0: all at once)",
    )
    ap.add_argument("--strict", action="store_true", help="fail on any loss / drop / error")
    ap.add_argument("--max-seconds", type=float, default=None, help="hard time limit (900)")
    args = ap.parse_args(argv)
    if args.replay and args.no_replay:
        ap.error("--replay and --no-replay exclude each other")
    q = args.quick
    args.connections = args.connections or (200 if q else 10_000)
    args.rates = [
        float(r) for r in (args.rates or ("200,1000" if q else "1000,5000,20000")).split(",") if r
    ]
    args.phase_seconds = args.phase_seconds or (1.5 if q else 10.0)
    if args.flood_seconds is None:
        args.flood_seconds = 2.0 if q else 6.0
    args.drain_seconds = 3.0 if q else 15.0
    args.idle_seconds = args.idle_seconds if args.idle_seconds is not None else (0.5 if q else 3.0)
    args.max_seconds = args.max_seconds or (60.0 if q else 900.0)
    args.processes = args.processes or max(2, math.ceil(args.connections / 2500))
    args.replay_clients = args.replay_clients or args.connections
    args.replay_timeout = 10.0 if q else 30.0
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _on_term)
    signal.signal(signal.SIGALRM, _on_alarm)
    command = "python bench/run.py " + shlex.join(sys.argv[1:] if argv is None else argv)

    allowed = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    pin = not args.no_pin and len(allowed) >= 2
    gateway_cpus = str(allowed[0]) if pin else None
    load_cpus: tuple[int, ...] = tuple(allowed[1:]) if pin else ()
    if pin:
        os.sched_setaffinity(0, set(load_cpus))  # redis, publisher, load client inherit these
    pinned = (
        f"gateway on CPU {gateway_cpus} ({'taskset' if shutil.which('taskset') else 'affinity'}); "
        "redis, publisher and load client on CPU "
        f"{','.join(map(str, load_cpus))}"
        if pin
        else "none"
    )

    if args.wait_quiet > 0:
        waited = wait_for_quiet(args.wait_quiet)
        print(f"waited {waited:.0f} s for an idle machine")
    signal.alarm(int(args.max_seconds))
    secret = secrets.token_hex(16)
    redis_port = free_port()
    gw_port = free_port()
    redis_url = f"redis://127.0.0.1:{redis_port}"
    prefix = (
        shlex.split(args.gateway_cmd) if args.gateway_cmd else [sys.executable, "-m", "sse_gateway"]
    )
    serve_args = [
        "serve",
        "--redis",
        redis_url,
        "--jwt-secret",
        secret,
        "--port",
        str(gw_port),
        "--host",
        "127.0.0.1",
        "--log-level",
        "WARNING",
        "--keepalive-period",
        f"{args.keepalive:g}",
        *args.gateway_arg,
    ]
    shown = [*prefix, *serve_args]
    shown[shown.index(secret)] = "<secret>"
    res = Results(
        command=command,
        started=time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        machine=machine_info(),
        connections=args.connections,
        processes=args.processes,
        pinned=pinned,
        gateway_cmd=shlex.join(shown),
        keepalive_s=args.keepalive,
    )

    tmp = tempfile.TemporaryDirectory(prefix="sse-bench-")
    logdir = args.keep_logs or Path(tmp.name)
    logdir.mkdir(parents=True, exist_ok=True)
    services: list[Service] = []
    lc: LoadClient | None = None
    gateway: Service | None = None
    status = 0
    try:
        services.append(start_redis(redis_port, logdir, shlex.split(args.redis_wrapper)))
        gateway = start_gateway(prefix, serve_args, gw_port, logdir, gateway_cpus)
        services.append(gateway)
        sampler = CpuSampler(gateway.pid, services[0].pid)
        time.sleep(0.5)
        res.rss_baseline_kib = rss_kib(gateway.pid)
        res.pss_baseline_kib = pss_kib(gateway.pid)
        res.tcp_kernel_baseline_kib = tcp_kernel_kib()
        res.slab_baseline_kib = slab_kib()

        if not args.replay:  # scenarios (a)-(d)
            conf = ClientConfig(
                port=gw_port,
                players=args.connections,
                processes=args.processes,
                jwt_secret=secret,
                concurrency=args.concurrency,
                max_seconds=args.max_seconds + 30.0,
                cpus=load_cpus,
            )
            lc = LoadClient(conf)
            lc.start()
            print(f"connecting {args.connections:,} clients from {args.processes} processes ...")
            sampler.sample()
            t_connect = time.time()
            report = lc.connect()
            sampler.sample()
            res.connect_cpu = sampler.window(t_connect, time.time())
            res.connect = asdict(report)
            print(
                f"  connected {report.connected:,}/{report.wanted:,} in {report.elapsed_s:.2f} s "
                f"({report.rate_per_s:,.0f}/s)"
            )
            if report.failed_attempts:
                print(f"  failed attempts: {report.failed_attempts}")
            lc.reset(measure_latency=True)
            time.sleep(args.idle_seconds)
            res.rss_connected_kib = rss_kib(gateway.pid)
            res.pss_connected_kib = pss_kib(gateway.pid)
            res.tcp_kernel_connected_kib = tcp_kernel_kib()
            res.slab_connected_kib = slab_kib()
            res.processes_connected = gateway_processes(gateway.pid)
            if report.connected:
                res.rss_per_conn_bytes = (
                    (res.rss_connected_kib - res.rss_baseline_kib) * 1024 / report.connected
                )
                res.pss_per_conn_bytes = (
                    (res.pss_connected_kib - res.pss_baseline_kib) * 1024 / report.connected
                )
            idle = lc.stats()
            res.idle = {k: v for k, v in asdict(idle).items() if k != "latency_ms"}
            print(f"  RSS per connection: {res.rss_per_conn_bytes / 1024:.2f} KiB")

            if report.connected:
                for rate in args.rates:
                    print(f"latency at {rate:,.0f} events/s for {args.phase_seconds:g} s ...")
                    lr = latency_phase(
                        lc, redis_url, gw_port, args.connections, rate, args.phase_seconds, sampler
                    )
                    res.latency.append(lr)
                    print(
                        f"  received {lr.received:,}/{lr.published:,}; "
                        f"p50 {fmt_ms(lr.latency_ms.get('p50'))} "
                        f"p99 {fmt_ms(lr.latency_ms.get('p99'))} ms"
                    )
                    if not gateway.alive():
                        break
                if gateway.alive() and args.flood_seconds > 0:
                    print(f"max deliveries/s for {args.flood_seconds:g} s ...")
                    res.flood = flood_phase(
                        lc,
                        redis_url,
                        gw_port,
                        args.connections,
                        args.flood_seconds,
                        sampler,
                        args.drain_seconds,
                        args.flood_backlog,
                    )
                    print(f"  {res.flood.delivered_per_s:,.0f} deliveries/s")

            final = lc.stats()
            res.final_open = final.open
            res.rss_end_kib = rss_kib(gateway.pid)
            res.processes_end = gateway_processes(gateway.pid)
            res.gateway_alive = gateway.alive()
            lc.close()
            lc = None
            time.sleep(1.0 if args.quick else 3.0)
            res.rss_after_close_kib = rss_kib(gateway.pid)
        if not args.no_replay and gateway.alive():
            print(f"replay storm with {args.replay_clients:,} clients ...")
            try:
                res.replay = run_replay(
                    redis_url=redis_url,
                    port=gw_port,
                    jwt_secret=secret,
                    clients=args.replay_clients,
                    missed=args.replay_missed,
                    concurrency=args.replay_concurrency,
                    load_cpus=load_cpus,
                    sampler=sampler,
                    catchup_timeout=args.replay_timeout,
                    max_seconds=args.max_seconds,
                    log=lambda line: print(line, flush=True),
                )
            except (RuntimeError, OSError, ValueError, redis.exceptions.RedisError) as exc:
                res.problems.append(f"replay scenario failed: {exc!r}")
                status = 1
            res.gateway_alive = gateway.alive()
    except SetupError as exc:
        print(f"setup error: {exc}", file=sys.stderr)
        status = 2
    except (TimeoutError, KeyboardInterrupt) as exc:
        print(f"interrupted: {exc!r}", file=sys.stderr)
        res.problems.append(f"run interrupted: {exc!r}")
        status = 1
    finally:
        signal.alarm(0)
        if lc is not None:
            lc.close()
        if gateway is not None:
            res.gateway_alive = res.gateway_alive and gateway.alive()
        for svc in reversed(services):
            svc.stop()
        if gateway is not None:
            res.gateway_exit_code = gateway.exit_code
            res.gateway_stop_s = gateway.stop_seconds
            res.gateway_log_findings = log_findings(gateway.log_path)
        if args.keep_logs is None:
            tmp.cleanup()

    if status == 2:
        return status
    status = max(status, judge(res, strict=args.strict))
    text = render(res)
    print()
    print(text)
    if args.output is not None:
        args.output.write_text(text)
    if args.json is not None:
        args.json.write_text(json.dumps(asdict(res), indent=2, default=str))
    return status


def judge(res: Results, *, strict: bool) -> int:
    """Adds problems to `res`; 1 when the run shows the gateway did not work."""
    c = res.connect
    fatal = False
    if not c and res.replay is None:
        res.problems.append("no scenario ran")
        fatal = True
    elif c and not c.get("connected"):
        res.problems.append("no client connected")
        fatal = True
    elif c and c["connected"] < c["wanted"]:
        res.problems.append(f"only {c['connected']:,} of {c['wanted']:,} clients connected")
    if res.replay is not None:
        res.problems.extend(res.replay.problems)
        fatal = fatal or res.replay.fatal
    if c.get("failed_attempts"):
        res.problems.append(f"failed connection attempts: {c['failed_attempts']}")
    received = sum(lr.received for lr in res.latency) + (res.flood.received if res.flood else 0)
    if c.get("connected") and received == 0:
        res.problems.append("no events received")
        fatal = True
    if not res.gateway_alive:
        res.problems.append("the gateway process died during the run")
        fatal = True
    if res.gateway_exit_code not in (0, None) and res.gateway_stop_s is not None:
        res.problems.append(f"gateway exited with {res.gateway_exit_code} after SIGTERM")
    if res.gateway_stop_s is None and res.gateway_exit_code is None:
        res.problems.append("gateway did not exit within 15 s of SIGTERM (killed)")
    lost = [
        (lr.target_rate, lr.routed - lr.received) for lr in res.latency if lr.received < lr.routed
    ]
    for rate, n in lost:
        res.problems.append(f"{n:,} events routed by Redis but not received at {rate:,.0f}/s")
    if res.flood and res.flood.received < res.flood.routed:
        res.problems.append(
            f"{res.flood.routed - res.flood.received:,} events routed by Redis but not "
            f"received in the max-rate phase"
        )
    unrouted = [lr for lr in res.latency if lr.routed < lr.published]
    for lr in unrouted:
        res.problems.append(
            f"{lr.published - lr.routed:,} publishes at {lr.target_rate:,.0f}/s found no "
            f"subscriber (channel not subscribed)"
        )
    phases = [(f"{lr.target_rate:,.0f}/s", lr.gateway_metrics) for lr in res.latency]
    if res.flood:
        phases.append(("max-rate", res.flood.gateway_metrics))
    for name, m in phases:
        n = m.get("sse_gateway_broker_reconnects_total", 0)
        if n:
            res.problems.append(
                f"the gateway reconnected to Redis {n}x in the {name} phase (see the Redis log: "
                f"'output buffer limits' means the gateway fell behind by > 32 MB)"
            )
        closed = {
            k: v for k, v in m.items() if k.startswith("sse_gateway_connections_closed_total")
        }
        if closed:
            res.problems.append(f"streams closed by the gateway in the {name} phase: {closed}")
    noisy = [
        f"{lr.target_rate:,.0f}/s ({lr.cpu.others(lr.publisher_cpu_pct, *lr.client_cpu_pct):.0f}%)"
        for lr in res.latency
        if lr.cpu.others(lr.publisher_cpu_pct, *lr.client_cpu_pct) > 15.0
    ]
    if (
        res.flood
        and res.flood.cpu.others(res.flood.publisher_cpu_pct, *res.flood.client_cpu_pct) > 15
    ):
        noisy.append("max rate")
    if noisy:
        res.problems.append(
            "other processes used the CPUs during " + ", ".join(noisy) + ": those figures are "
            "disturbed (try --wait-quiet 120 on a shared machine)"
        )
    dropped = c.get("connected", 0) - res.final_open if res.final_open >= 0 else 0
    if dropped > 0:
        res.problems.append(f"{dropped:,} connections closed by the gateway during the run")
    if fatal:
        return 1
    if strict and res.problems:
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
