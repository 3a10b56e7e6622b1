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
