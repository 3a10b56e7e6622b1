"""Smoke run of `bench/cluster.py`: a single Redis and a Redis Cluster side by side.

Real processes at a small size; it proves the tool works and prints its table, and asserts
no timing (the figures of a loaded 2-core machine mean nothing here).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(150)
def test_cluster_benchmark_prints_both_targets_and_the_ratio() -> None:
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "cluster.py"), "--players", "100", "--seconds", "2"],
        capture_output=True,
        text=True,
        timeout=140,
        cwd=REPO,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "| deliveries/s |" in out, out
    assert "| gateway CPU per delivery |" in out, out
    row = next(line for line in out.splitlines() if line.startswith("| deliveries/s |"))
    single, cluster = (float(cell.replace(",", "")) for cell in row.split("|")[2:4])
    assert single > 0 and cluster > 0, row  # events reached the clients on both
