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
