"""Smoke run of the benchmark tools: `bench/run.py --quick` end to end.

A real redis-server, a real gateway and the real load client, publisher and replay storm, at
200 connections. It proves the tools work and that the figure lines are printed; it asserts no
timing, so it passes on a loaded 2-core machine.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

FIGURE_LINES = (
    "| (a) RSS per idle connection |",
    "| (b) connections/s |",
    "| (c) latency @ 200 ev/s |",
    "| (c) latency @ 1,000 ev/s |",
    "| (d) max deliveries/s |",
    "| (e) replay storm: 200 reconnect, 10 missed each |",
    "| time until all caught up (`connected` + 10 events each) |",
    "| Redis slowest command (SLOWLOG,",
)


@pytest.mark.timeout(180)
def test_quick_benchmark_runs_end_to_end(tmp_path: Path) -> None:
    results = tmp_path / "results.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "bench" / "run.py"),
            "--quick",
            "--max-seconds",
            "110",
            "--json",
            str(results),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-6000:]
    missing = [line for line in FIGURE_LINES if line not in proc.stdout]
    assert not missing, f"figure lines missing: {missing}\n{output[-6000:]}"

    data = json.loads(results.read_text())
    assert data["connect"]["connected"] > 0
    assert sum(phase["received"] for phase in data["latency"]) > 0
    replay = data["replay"]
    assert replay["clients"] == 200
    assert replay["complete"] == 200, replay["problems"]
    assert replay["recovered"] == 200
    assert (replay["lost"], replay["duplicated"], replay["out_of_order"]) == (0, 0, 0)
    assert replay["slowest"], "no Redis command was logged during the replay storm"


def _run_json(args: list[str], timeout: float = 90) -> dict[str, object]:
    proc = subprocess.run(
        [sys.executable, *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    result: dict[str, object] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode", ["write", "transport"])
def test_send_ceiling_writes_to_every_stream_and_clients_receive(mode: str) -> None:
    result = _run_json(
        [
            str(REPO / "bench" / "send_ceiling.py"),
            "--json",
            "--mode",
            mode,
            "--connections",
            "200",
            "--processes",
            "2",
            "--seconds",
            "1",
            "--server-cpu",
            "0",
            "--client-cpus",
            "0",
            "1",
        ]
    )
    assert result["connections"] == 200
    sends = result["sends_per_s"]
    assert isinstance(sends, int) and sends > 0
    received = result["received"]
    assert isinstance(received, int) and received > 0
    per_send = result["server_us_per_send"]
    assert isinstance(per_send, dict) and set(per_send) >= {"user", "system"}


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    "args",
    [
        ["--streams", "300", "--messages", "3000"],
        ["--connect", "--streams", "300"],
    ],
    ids=["delivery", "connect"],
)
def test_hotpath_runs_the_real_path_to_every_stream(args: list[str]) -> None:
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "hotpath.py"), *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=90,
        stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    # Every event (or every stream's `connected`) went through a Stream to a transport.
    count = "3,000 events" if "--connect" not in args else "300 streams"
    assert count in proc.stdout, proc.stdout


@pytest.mark.timeout(180)
def test_c50k_scenario_sums_every_gateway_process(tmp_path: Path) -> None:
    """Issue 11's scenario at 300 streams: the figures cover the supervisor and each worker."""
    results = tmp_path / "c50k.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "bench" / "c50k.py"),
            "--connections",
            "300",
            "--workers",
            "2",
            "--rate",
            "200",
            "--seconds",
            "2",
            "--json",
            str(results),
            "--",
            "--idle-seconds",
            "0.5",
            "--max-seconds",
            "110",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=150,
        stdin=subprocess.DEVNULL,
    )
    output = proc.stdout + proc.stderr
    assert "## Issue 11 scenario: 300 streams" in proc.stdout, output[-6000:]
    assert "| events | published 400 " in proc.stdout, output[-6000:]
    data = json.loads(results.read_text())
    roles = sorted(p["role"] for p in data["processes_connected"])
    assert roles == ["supervisor", "worker", "worker"], data["processes_connected"]
    assert data["rss_connected_kib"] == sum(p["rss_kib"] for p in data["processes_connected"])
    phase = data["latency"][0]
    assert phase["received"] == phase["routed"] == phase["published"] == 400
    worker_pids = {str(p["pid"]) for p in data["processes_connected"] if p["role"] == "worker"}
    assert worker_pids <= set(phase["cpu"]["gateway_procs"]), phase["cpu"]
    assert proc.returncode == 0, output[-6000:]


@pytest.mark.timeout(120)
def test_redis_cost_counts_every_event_and_the_history() -> None:
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "bench" / "redis_cost.py"),
            "--players",
            "500",
            "--events",
            "5000",
            "--history-players",
            "20",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=90,
        stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    lines = [json.loads(line) for line in proc.stdout.strip().splitlines()]
    modes = {line["mode"]: line for line in lines if "mode" in line}
    assert set(modes) == {"publish", "lua"}
    for result in modes.values():
        assert result["received"] == result["receivers"] == 5000
    history = lines[-1]
    assert history["entries_per_player"] == 101
    # 101 entries of data were kept per player (a history of one entry would be ~100x less)
    assert history["bytes_per_player"] > 101 * history["data_bytes"] // 2, history
