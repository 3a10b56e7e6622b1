#!/usr/bin/env python3
"""Issue 11's scenario: 50,000 concurrent SSE streams on one instance, events at 5,000/s.

A thin wrapper around `bench/run.py`: one gateway instance (`--workers 3`, SO_REUSEPORT, under
its supervisor) holds N streams from several load-client processes whose sockets rotate over
source addresses 127.0.0.2-127.0.0.250; a publisher sends `--rate` events/s to random players
for `--seconds`, heartbeats run at the default 15 s. No max-rate phase, no replay storm.

    .venv/bin/python bench/c50k.py                          # 50,000 streams, ~2 minutes
    .venv/bin/python bench/c50k.py --connections 5000 --seconds 10 --output c5k.md
    .venv/bin/python bench/c50k.py --wait-quiet 120 --json c50k.json -- --keep-logs /tmp/l

Arguments after `--` go to `bench/run.py` as they are. Prints run.py's report, then the
scenario's own table (connected, memory of every gateway process, events lost, latency,
CPU of each process); `--output` writes both as markdown.

Exit status: run.py's (2: setup error), or 1 when an event was lost or a stream did not connect
or was closed during the run.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path
from typing import Any

import run

# Streams per worker: above N / workers by far more than the kernel's SO_REUSEPORT hash
# spreads them unevenly (a standard deviation of ~100 at 50,000 over 3), and under what
# 20,000 open files leave for streams beside the request readers (no fd-limit warning).
PER_WORKER_LIMIT = 18_000
STREAMS_PER_CLIENT_PROCESS = 12_500  # well under the client's own 20,000 open files


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    argv = list(sys.argv[1:] if argv is None else argv)
    passthrough: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, passthrough = argv[:cut], argv[cut + 1 :]
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--connections", type=int, default=50_000, help="streams (50000)")
    ap.add_argument(
        "--processes",
        type=int,
        default=0,
        help=f"load-client processes (default: one per {STREAMS_PER_CLIENT_PROCESS:,} streams)",
    )
    ap.add_argument("--workers", type=int, default=3, help="gateway worker processes (3)")
    ap.add_argument(
        "--connection-limit",
        type=int,
        default=0,
        help=f"SSE_CONNECTION_LIMIT of the instance (default {PER_WORKER_LIMIT:,} per worker)",
    )
    ap.add_argument("--rate", type=float, default=5000.0, help="events/s to random players (5000)")
    ap.add_argument("--seconds", type=float, default=60.0, help="publishing time (60)")
    ap.add_argument("--keepalive", type=float, default=15.0, help="heartbeat period, s (15)")
    ap.add_argument("--wait-quiet", type=float, default=0.0, help="run.py --wait-quiet")
    ap.add_argument("--output", type=Path, default=None, help="write the report as markdown")
    ap.add_argument("--json", type=Path, default=None, help="write run.py's figures as JSON")
    args = ap.parse_args(argv)
    if args.processes <= 0:
        args.processes = max(2, math.ceil(args.connections / STREAMS_PER_CLIENT_PROCESS))
    if args.connection_limit <= 0:
        args.connection_limit = PER_WORKER_LIMIT * args.workers
    return args, passthrough


def run_argv(args: argparse.Namespace, json_path: Path, passthrough: list[str]) -> list[str]:
    """bench/run.py's arguments for the scenario."""
    return [
        "--connections",
        str(args.connections),
        "--processes",
        str(args.processes),
        "--rates",
        f"{args.rate:g}",
        "--phase-seconds",
        f"{args.seconds:g}",
        "--flood-seconds",
        "0",
        "--no-replay",
        "--keepalive",
        f"{args.keepalive:g}",
        f"--gateway-arg=--workers={args.workers}",
        f"--gateway-arg=--connection-limit={args.connection_limit}",
        "--wait-quiet",
        f"{args.wait_quiet:g}",
        "--json",
        str(json_path),
        *passthrough,
    ]


def _mib(kib: float) -> str:
    return f"{kib / 1024:,.1f} MiB"


def _pct(v: Any) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.0f}%"


def summary(data: dict[str, Any], args: argparse.Namespace) -> tuple[list[str], bool]:
    """The scenario's table from run.py's JSON, and whether it passed (all connected, 0 lost)."""
    c = data.get("connect") or {}
    connected = int(c.get("connected", 0))
    phase = data["latency"][0] if data.get("latency") else None
    procs = data.get("processes_connected") or []
    rss = sum(p["rss_kib"] for p in procs)
    pss = sum(p["pss_kib"] for p in procs)
    workers = sum(1 for p in procs if p["role"] == "worker")
    L = [f"## Issue 11 scenario: {args.connections:,} streams, {args.rate:,.0f} events/s", ""]
    L.append("| figure | value |")
    L.append("|---|---|")
    failed = c.get("failed_attempts") or {}
    L.append(
        f"| connected | **{connected:,} / {args.connections:,}** in {c.get('elapsed_s', 0):.1f} s "
        f"({c.get('rate_per_s', 0):,.0f}/s), failed attempts {failed or 0}; open at the end "
        f"{data.get('final_open', -1):,} |"
    )
    L.append(
        f"| gateway RSS, all {len(procs)} processes (supervisor + {workers} workers) | "
        f"**{_mib(rss)}** VmRSS ({_mib(data.get('rss_baseline_kib', 0))} before any client), "
        f"Pss {_mib(pss)} |"
    )
    all_in = rss * 1024 / max(connected, 1)
    L.append(
        f"| RSS per connection | **{data.get('rss_per_conn_bytes', 0):,.0f} B** (VmRSS sum, "
        f"after - before); {data.get('pss_per_conn_bytes', 0):,.0f} B (Pss); all-in "
        f"{all_in:,.0f} B (total VmRSS / connections) |"
    )
    tcp = data.get("tcp_kernel_connected_kib", 0) - data.get("tcp_kernel_baseline_kib", 0)
    slab = data.get("slab_connected_kib", 0) - data.get("slab_baseline_kib", 0)
    per = slab * 1024 / max(connected, 1)
    L.append(
        f"| kernel memory (not in RSS; both ends of every loopback connection) | slab "
        f"{slab / 1024:,.1f} MiB more with the streams open = {per:,.0f} B per connection "
        "(socket, inode, file, epoll structures; the server's end is about "
        f"half); TCP buffers {tcp:,} KiB more |"
    )
    ok = connected == args.connections and connected > 0
    if phase is None:
        L.append("| events | no event phase ran |")
        return L, False
    published, routed, received = phase["published"], phase["routed"], phase["received"]
    lost = max(0, routed - received)
    ok = ok and lost == 0 and published == routed == received
    L.append(
        f"| events | published {published:,} ({phase['achieved_rate']:,.0f}/s for "
        f"{args.seconds:g} s), routed by Redis {routed:,}, received {received:,}: "
        f"**lost {lost:,}**, without a subscriber {published - routed:,} |"
    )
    lat = phase["latency_ms"]
    L.append(
        f"| latency publish -> client | **p50 {run.fmt_ms(lat.get('p50'))} / p99 "
        f"{run.fmt_ms(lat.get('p99'))} / p99.9 {run.fmt_ms(lat.get('p99.9'))} ms**, max "
        f"{run.fmt_ms(lat.get('max'))} ms |"
    )
    expected_hb = connected * phase["wall_s"] / args.keepalive if args.keepalive > 0 else 0
    L.append(
        f"| heartbeats in the event phase | {phase['heartbeats']:,} (~{expected_hb:,.0f} expected "
        f"at one per {args.keepalive:g} s per stream); streams dropped {phase['dropped']:,} |"
    )
    cpu = phase["cpu"]
    per = cpu.get("gateway_procs") or {}
    roles = {str(p["pid"]): p["role"] for p in procs}
    parts = [f"{roles.get(str(pid), 'process')} {_pct(v)}" for pid, v in per.items()]
    L.append(
        f"| gateway CPU in the event phase (% of one core) | **{_pct(cpu.get('gateway'))} "
        f"total**: {', '.join(parts) or '-'} |"
    )
    clients = phase.get("client_cpu_pct") or []
    L.append(
        f"| other CPU in the event phase | redis {_pct(cpu.get('redis'))}, publisher "
        f"{phase['publisher_cpu_pct']:.0f}%, load clients {sum(clients):.0f}% "
        f"({len(clients)} processes); busy per core: {run.fmt_cores(_window(cpu))} |"
    )
    connect_cpu = data.get("connect_cpu") or {}
    L.append(
        f"| gateway CPU while connecting | {_pct(connect_cpu.get('gateway'))} total: "
        + ", ".join(
            f"{roles.get(str(pid), 'process')} {_pct(v)}"
            for pid, v in (connect_cpu.get("gateway_procs") or {}).items()
        )
        + " |"
    )
    L.append("")
    L.append(f"Result: **{'pass' if ok else 'FAIL'}** (every stream connected, 0 events lost).")
    L.append("")
    return L, ok


def _window(d: dict[str, Any]) -> run.CpuWindow:
    return run.CpuWindow(
        cores=d.get("cores", []), softirq=d.get("softirq", []), steal=d.get("steal", [])
    )


def main(argv: list[str] | None = None) -> int:
    args, passthrough = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="c50k-") as tmp:
        json_path = args.json or Path(tmp) / "results.json"
        run_args = run_argv(args, json_path, passthrough)
        if args.output is not None:
            run_args += ["--output", str(args.output)]
        status = run.main(run_args)
        if status == 2 or not json_path.exists():
            return status or 2
        data = json.loads(json_path.read_text())
    lines, ok = summary(data, args)
    text = "\n".join(lines)
    print(text)
    if args.output is not None:
        args.output.write_text(text + "\n" + args.output.read_text())
    return status if status else (0 if ok else 1)


if __name__ == "__main__":
    sys.exit(main())
