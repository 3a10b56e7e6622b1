"""The instance's `/metrics` and `/readyz` under `--workers`, whichever worker answers.

The supervisor makes a directory for the instance (`make_instance_dir`). Each worker writes a
snapshot there, `<pid>.json`, every `SNAPSHOT_PERIOD` seconds and whenever it answers a scrape
(written to a temporary name, then renamed: a reader never sees half a file):

    {"pid": 4242, "ready": null | "draining" | "broker_disconnected" | "starting",
     "taken": <time.monotonic() when taken, seconds>,
     "families": [{"name", "type", "help", "unit", "samples": [[name, {labels}, value], ...]}]}

The worker the kernel hands a scrape merges every snapshot (`merge`): counters and histograms
are summed over every worker that ever ran, gauges over the live ones (see `GAUGE_MERGE` for
the few that are not sums). When a worker dies the supervisor folds its counters into
`retired.json` (`retire`), so an instance counter never goes back when a worker is replaced,
as in prometheus-client's multiprocess mode. Single-process mode does none of this.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample

from sse_gateway.metrics import PREFIX

log = logging.getLogger("sse_gateway")

SNAPSHOT_PERIOD = 1.0
"""Seconds between a worker's snapshots; another worker's figures are at most this old."""
READY_CHECK_PERIOD = 0.1
"""Seconds between checks of a worker's readiness: a change is written at once, so another
worker's `/readyz` learns it within about this."""
STALE_AFTER = 10.0
"""Seconds without a new snapshot after which a live worker is `worker_unresponsive`: stopped
(SIGSTOP) or its loop stuck, it still gets its share of new connections from the kernel."""
RETIRED = "retired.json"
# Gauges that are not summed over live workers: the instance is as late as its latest loop,
# connected only while every worker is, and started when its oldest worker started.
GAUGE_MERGE: dict[str, Callable[[Iterable[float]], float]] = {
    PREFIX + "event_loop_lag_seconds": max,
    PREFIX + "broker_connected": min,
    PREFIX + "broker_shard_connected": min,
    "process_start_time_seconds": min,
}
# Kinds whose samples only grow over a worker's life: summed over dead workers too.
_CUMULATIVE = frozenset({"counter", "histogram", "summary"})

Family = dict[str, Any]
Snapshot = dict[str, Any]


def make_instance_dir() -> Path:
    """A new, empty directory for this instance's snapshots (under $TMPDIR, mode 0700)."""
    return Path(tempfile.mkdtemp(prefix="sse-gateway-workers-"))


def families(collector: Collector) -> list[Family]:
    """A collector's families now, as JSON-ready data (no `_created` samples)."""
    found = []
    for family in collector.collect():
        samples = [
            [s.name, s.labels, s.value] for s in family.samples if not s.name.endswith("_created")
        ]
        found.append(
            {
                "name": family.name,
                "type": family.type,
                "help": family.documentation,
                "unit": family.unit,
                "samples": samples,
            }
        )
    return found


def _write(path: Path, data: Snapshot) -> None:
    temporary = path.with_name(f".{path.name}.{threading.get_ident()}.tmp")
    temporary.write_text(json.dumps(data, separators=(",", ":")), encoding="utf-8")
    os.replace(temporary, path)


def _read(path: Path) -> Snapshot | None:
    try:
        data: Snapshot = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # gone (a worker retired), or not ours
        return None
    return data


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # pragma: no cover - a pid reused by another user's process
        return False
    return True


def read_snapshots(directory: Path) -> tuple[list[Snapshot], list[Snapshot]]:
    """(live workers' snapshots, cumulative-only snapshots of dead workers). Worker files
    are read before `retired.json`: a worker folded in meanwhile is counted once, from it."""
    workers = []
    for path in sorted(directory.glob("*.json")):
        if path.name != RETIRED and (data := _read(path)) is not None:
            workers.append(data)
    retired = _read(directory / RETIRED) or {"folded": [], "families": []}
    folded = set(retired["folded"])
    live: list[Snapshot] = []
    dead: list[Snapshot] = [retired]
    for data in workers:
        if data["pid"] in folded:
            continue
        (live if _alive(data["pid"]) else dead).append(data)
    return live, dead


def merge(live: list[Snapshot], dead: list[Snapshot]) -> list[Family]:
    """The instance's families: see the module docstring for how each kind is merged."""
    order: list[str] = []
    kinds: dict[str, Family] = {}
    values: dict[str, dict[tuple[str, str], list[float]]] = {}
    for data, is_live in [*((d, True) for d in live), *((d, False) for d in dead)]:
        for family in data["families"]:
            name = family["name"]
            if not is_live and family["type"] not in _CUMULATIVE:
                continue
            if name not in kinds:
                order.append(name)
                kinds[name] = {k: family[k] for k in ("name", "type", "help", "unit")}
                values[name] = {}
            for sample_name, labels, value in family["samples"]:
                key = (sample_name, json.dumps(labels, sort_keys=True))
                values[name].setdefault(key, []).append(value)
    merged = []
    for name in order:
        combine = GAUGE_MERGE.get(name, sum)
        samples = [[s, json.loads(labels), combine(v)] for (s, labels), v in values[name].items()]
        merged.append({**kinds[name], "samples": samples})
    if live:
        merged.append(
            {
                "name": PREFIX + "workers",
                "type": "gauge",
                "help": "Worker processes of this instance reporting.",
                "unit": "",
                "samples": [[PREFIX + "workers", {}, float(len(live))]],
            }
        )
    return merged


def expect_worker(directory: Path, pid: int) -> None:
    """The supervisor's part when it has started worker `pid`: until the worker writes its
    first snapshot, the instance is not ready (`starting`). Never replaces a snapshot the
    worker wrote first. A directory that cannot be written ($TMPDIR full) is logged, not
    raised: the supervisor must live on to tend its workers."""
    try:
        _expect_worker(directory, pid)
    except OSError as exc:
        log.warning(
            "instance directory %s: %s; /metrics and /readyz may miss a worker", directory, exc
        )


def _expect_worker(directory: Path, pid: int) -> None:
    retired = _read(directory / RETIRED)
    if retired is not None and pid in retired["folded"]:
        # A pid used again (pid_max reached): the retired worker's file went long ago, and
        # this one's snapshots must not be taken for it.
        retired["folded"] = [p for p in retired["folded"] if p != pid]
        _write(directory / RETIRED, retired)
    placeholder = {"pid": pid, "ready": "starting", "families": []}
    path = directory / f"{pid}.json"
    with contextlib.suppress(FileExistsError), open(path, "x", encoding="utf-8") as file:
        json.dump(placeholder, file)


def retire(directory: Path, pid: int) -> None:
    """The supervisor's part when worker `pid` has exited: its counters and histograms join
    `retired.json` (which names it, so it is never counted twice), then its file goes. As
    `expect_worker`, logs an OSError rather than raising it."""
    try:
        _retire(directory, pid)
    except OSError as exc:
        log.warning(
            "instance directory %s: %s; worker %d's counts may be lost", directory, exc, pid
        )


def _retire(directory: Path, pid: int) -> None:
    path = directory / f"{pid}.json"
    retired = _read(directory / RETIRED) or {"folded": [], "families": []}
    last = _read(path)
    if last is not None:
        families = merge([], [retired, last])
        retired = {"folded": [*retired["folded"], pid], "families": families}
        _write(directory / RETIRED, retired)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


class _Families(Collector):
    def __init__(self, families: list[Family]) -> None:
        self._families = families

    def collect(self) -> Iterator[Metric]:
        for family in self._families:
            metric = Metric(family["name"], family["help"], family["type"], family["unit"])
            metric.samples = [Sample(n, labels, value) for n, labels, value in family["samples"]]
            yield metric


class InstanceView:
    """A worker's part: writes its snapshot, and answers `/metrics` and `/readyz` for the
    instance. `gateway`: this worker's own series (read on the event loop); `process`: its
    process series (read from /proc, in a thread for the periodic snapshot: listing 20,000
    open descriptors takes ~20 ms); `ready_reason()`: why it is not ready, or None."""

    def __init__(
        self,
        directory: Path,
        gateway: Collector,
        process: Collector,
        ready_reason: Callable[[], str | None],
    ) -> None:
        self.directory = directory
        self.pid = os.getpid()
        self._gateway = gateway
        self._process = process
        self._ready_reason = ready_reason
        self._path = directory / f"{self.pid}.json"
        self._timer: asyncio.TimerHandle | None = None
        self._writing: asyncio.Future[None] | None = None
        # Snapshots are numbered when taken; one taken earlier but written later (the
        # periodic thread behind a scrape) must not replace a newer one: counters would go back.
        self._taken = 0
        self._written = 0
        self._lock = threading.Lock()
        self._reported: str | None = None
        self._due = 0.0

    def _take(self, *, with_process: bool) -> tuple[int, Snapshot]:
        self._taken += 1
        found = families(self._gateway)
        if with_process:
            found += families(self._process)
        # monotonic: CLOCK_MONOTONIC, one clock for every process of the host.
        taken = time.monotonic()
        ready = self._ready_reason()
        return self._taken, {"pid": self.pid, "ready": ready, "taken": taken, "families": found}

    def _store(self, number: int, data: Snapshot, *, with_process: bool) -> None:
        if not with_process:
            data["families"] += families(self._process)
        with self._lock:
            if number < self._written:
                return
            with contextlib.suppress(OSError):  # the supervisor removed it: stopping
                _write(self._path, data)
            self._written = number

    def write(self) -> Snapshot:
        """Takes and writes this worker's snapshot now, on the calling thread; returns it."""
        number, data = self._take(with_process=True)
        self._store(number, data, with_process=True)
        return data

    def start(self) -> None:
        self._reported = self.write()["ready"]
        loop = asyncio.get_running_loop()
        self._due = loop.time() + SNAPSHOT_PERIOD
        self._timer = loop.call_later(READY_CHECK_PERIOD, self._tick)

    def _tick(self) -> None:
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(READY_CHECK_PERIOD, self._tick)
        reason = self._ready_reason()
        if reason == self._reported and loop.time() < self._due:
            return
        if self._writing is not None and not self._writing.done():
            return  # the next tick tries again
        self._reported = reason
        self._due = loop.time() + SNAPSHOT_PERIOD
        # The worker's own series on the loop (they change on it); /proc, JSON and the file
        # in a thread, off the loop.
        number, data = self._take(with_process=False)
        self._writing = loop.run_in_executor(
            None, lambda: self._store(number, data, with_process=False)
        )

    def stop(self) -> None:
        """No more periodic snapshots; a last one, so the supervisor keeps every count."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.write()

    def _others(self) -> tuple[list[Snapshot], list[Snapshot]]:
        live, dead = read_snapshots(self.directory)
        return [d for d in live if d["pid"] != self.pid], dead

    def render(self, accept: str | None) -> tuple[bytes, str]:
        """(body, content type) of the instance's `/metrics`, as `Exposition.render`."""
        own = self.write()  # fresh, so what the next scrape reads of this worker is not older
        others, dead = self._others()
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Families(merge([own, *others], dead)))
        encoder, content_type = choose_encoder(accept or "")
        return encoder(registry), content_type

    def readiness(self) -> dict[str, Any] | None:
        """None while every live worker is ready; else `{"reason": …, "worker": pid}` of the
        first that is not (this worker first): its own reason, or `worker_unresponsive` when
        its last snapshot is older than STALE_AFTER."""
        reason = self._ready_reason()
        if reason is not None:
            return {"reason": reason, "worker": self.pid}
        now = time.monotonic()
        for data in self._others()[0]:
            if data["ready"] is not None:
                return {"reason": data["ready"], "worker": data["pid"]}
            if now - data.get("taken", now) > STALE_AFTER:
                return {"reason": "worker_unresponsive", "worker": data["pid"]}
        return None
