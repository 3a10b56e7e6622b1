"""Merging the workers' snapshots into the instance's figures (sse_gateway.instance)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from sse_gateway.instance import (
    RETIRED,
    STALE_AFTER,
    InstanceView,
    expect_worker,
    merge,
    read_snapshots,
    retire,
)
from sse_gateway.metrics import Exposition, Metrics

DEAD_PID = 2**22 + 12345  # above the default pid_max: never a live process


def _snapshot(pid: int, opened: int, open_now: int, lag: float, up: float) -> dict[str, Any]:
    return {
        "pid": pid,
        "ready": None,
        "families": [
            {
                "name": "sse_gateway_connections_opened",
                "type": "counter",
                "help": "SSE streams accepted.",
                "unit": "",
                "samples": [["sse_gateway_connections_opened_total", {}, opened]],
            },
            {
                "name": "sse_gateway_connections",
                "type": "gauge",
                "help": "Open SSE streams, by brand.",
                "unit": "",
                "samples": [["sse_gateway_connections", {"brand": "b"}, open_now]],
            },
            {
                "name": "sse_gateway_event_loop_lag_seconds",
                "type": "gauge",
                "help": "lag",
                "unit": "",
                "samples": [["sse_gateway_event_loop_lag_seconds", {}, lag]],
            },
            {
                "name": "sse_gateway_broker_connected",
                "type": "gauge",
                "help": "up",
                "unit": "",
                "samples": [["sse_gateway_broker_connected", {}, up]],
            },
        ],
    }


def _values(families: list[dict[str, Any]]) -> dict[str, float]:
    return {s[0]: s[2] for f in families for s in f["samples"]}


def test_counters_sum_every_worker_gauges_only_the_live_ones() -> None:
    live = [_snapshot(1, 5, 2, 0.01, 1), _snapshot(2, 7, 3, 0.2, 0)]
    dead = [_snapshot(3, 11, 4, 9.0, 1)]
    values = _values(merge(live, dead))
    assert values["sse_gateway_connections_opened_total"] == 23
    assert values["sse_gateway_connections"] == 5
    assert values["sse_gateway_event_loop_lag_seconds"] == 0.2  # the latest loop
    assert values["sse_gateway_broker_connected"] == 0  # connected only if every worker is
    assert values["sse_gateway_workers"] == 2


def test_a_retired_worker_is_counted_once_whatever_a_reader_saw(tmp_path: Path) -> None:
    live = _snapshot(os.getpid(), 1, 1, 0.0, 1)
    (tmp_path / f"{os.getpid()}.json").write_text(json.dumps(live))
    (tmp_path / f"{DEAD_PID}.json").write_text(json.dumps(_snapshot(DEAD_PID, 10, 9, 0.0, 1)))
    before = _values(merge(*read_snapshots(tmp_path)))
    assert before["sse_gateway_connections_opened_total"] == 11
    assert before["sse_gateway_connections"] == 1  # the dead worker's streams are gone
    retire(tmp_path, DEAD_PID)
    assert not (tmp_path / f"{DEAD_PID}.json").exists()
    # A reader that listed the worker's file before it went, and reads retired.json after.
    (tmp_path / f"{DEAD_PID}.json").write_text(json.dumps(_snapshot(DEAD_PID, 10, 9, 0.0, 1)))
    after = _values(merge(*read_snapshots(tmp_path)))
    assert after["sse_gateway_connections_opened_total"] == 11
    retired = json.loads((tmp_path / RETIRED).read_text())
    assert retired["folded"] == [DEAD_PID]
    assert {f["type"] for f in retired["families"]} == {"counter"}


def test_the_view_renders_valid_exposition_and_names_a_worker_not_ready(tmp_path: Path) -> None:
    metrics = Metrics()
    metrics.stream_opened("b")
    exposition = Exposition(metrics)
    view = InstanceView(tmp_path, exposition.gateway, exposition.process, lambda: None)
    other = _snapshot(os.getppid(), 3, 2, 0.0, 1) | {"ready": "draining"}
    (tmp_path / f"{os.getppid()}.json").write_text(json.dumps(other))
    body, content_type = view.render(None)
    assert content_type.startswith("text/plain")
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(body.decode())
        for s in family.samples
    }
    assert samples[("sse_gateway_connections_opened_total", ())] == 4
    assert samples[("sse_gateway_connections", (("brand", "b"),))] == 3
    assert samples[("sse_gateway_workers", ())] == 2
    openmetrics, kind = view.render("application/openmetrics-text; version=1.0.0")
    assert kind.startswith("application/openmetrics-text") and openmetrics.endswith(b"# EOF\n")
    assert view.readiness() == {"reason": "draining", "worker": os.getppid()}


def test_a_worker_with_a_retired_workers_pid_is_seen(tmp_path: Path) -> None:
    """pids are used again once pid_max is reached: the new worker is not the folded one."""
    (tmp_path / f"{DEAD_PID}.json").write_text(json.dumps(_snapshot(DEAD_PID, 10, 9, 0.0, 1)))
    retire(tmp_path, DEAD_PID)
    expect_worker(tmp_path, os.getpid())
    assert read_snapshots(tmp_path)[0][0]["ready"] == "starting"
    (tmp_path / f"{os.getpid()}.json").unlink()
    retired = json.loads((tmp_path / RETIRED).read_text())
    (tmp_path / RETIRED).write_text(json.dumps(retired | {"folded": [os.getpid()]}))
    expect_worker(tmp_path, os.getpid())
    live, _ = read_snapshots(tmp_path)
    assert [d["pid"] for d in live] == [os.getpid()]
    assert _values(merge(*read_snapshots(tmp_path)))["sse_gateway_connections_opened_total"] == 10


def test_a_live_worker_whose_snapshots_stopped_is_named_not_ready(tmp_path: Path) -> None:
    """A worker stopped (SIGSTOP) or stuck in its loop still gets its share of the
    connections from the kernel, and answers none: the instance is not ready."""
    exposition = Exposition(Metrics())
    view = InstanceView(tmp_path, exposition.gateway, exposition.process, lambda: None)
    stuck = _snapshot(os.getppid(), 1, 1, 0.0, 1) | {"taken": time.monotonic() - STALE_AFTER - 1}
    (tmp_path / f"{os.getppid()}.json").write_text(json.dumps(stuck))
    assert view.readiness() == {"reason": "worker_unresponsive", "worker": os.getppid()}
    fresh = stuck | {"taken": time.monotonic()}
    (tmp_path / f"{os.getppid()}.json").write_text(json.dumps(fresh))
    assert view.readiness() is None


def test_the_supervisor_survives_an_instance_directory_it_cannot_write(tmp_path: Path) -> None:
    """$TMPDIR full or removed: the workers run on, each answering for the instance as it
    can; the supervisor must not die of it (its workers would be left unsupervised)."""
    gone = tmp_path / "gone"
    expect_worker(gone, os.getpid())
    retire(gone, DEAD_PID)
