"""How many worker processes, and what the instance holds: `--workers auto` and the start line.

One process holds at most what its open-file limit allows (`effective_connection_limit`);
SSE_CONNECTION_LIMIT is split evenly over the workers. `plan_workers` picks the worker count
(`auto`: one per CPU at least, more while a worker's share does not fit, at most
`MAX_WORKERS`) and `Plan.message` says in one line what the instance holds, why, and, when it
holds less than SSE_CONNECTION_LIMIT, what to change: advice that works as printed (never a
worker count above `MAX_WORKERS`, never workers with the embedded broker).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

from sse_gateway.edge.admission import effective_connection_limit
from sse_gateway.settings import MAX_WORKERS, WORKERS_AUTO, Settings


def cpu_count() -> int:
    """CPUs this process may run on (its affinity mask: a container's cpuset, `taskset`)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def per_worker_limit(connection_limit: int, workers: int) -> int:
    """A worker's share of SSE_CONNECTION_LIMIT (streams), rounded up."""
    return math.ceil(connection_limit / max(1, workers))


def workers_needed(connection_limit: int, fd_limit: int) -> int | None:
    """The fewest workers whose shares each fit under `fd_limit` open files, or None when
    even `MAX_WORKERS` do not."""
    for workers in range(1, MAX_WORKERS + 1):
        share = per_worker_limit(connection_limit, workers)
        if effective_connection_limit(share, fd_limit) >= share:
            return workers
    return None


@dataclass(frozen=True, slots=True)
class Plan:
    """The worker count chosen and what it holds.

    `workers`: processes to run (resolved: never `auto`); `per_worker`: streams each holds
    (its share, lowered to the open-file limit); `holds`: the instance's total, at most
    SSE_CONNECTION_LIMIT; `needed`: workers that would hold all of it (None: more than
    MAX_WORKERS)."""

    connection_limit: int
    fd_limit: int
    workers: int
    auto: bool
    embedded: bool
    cpus: int
    per_worker: int
    holds: int
    needed: int | None
    default_limit: bool

    @property
    def short(self) -> bool:
        """The instance holds less than SSE_CONNECTION_LIMIT."""
        return self.holds < self.connection_limit

    @property
    def warn(self) -> bool:
        """A limit the user set is not met (the default one is only reported, at INFO)."""
        return self.short and not self.default_limit

    def message(self) -> str:
        """The start line: what the instance holds, why, and what would hold the limit."""
        processes = _count(self.workers, "worker process", "worker processes")
        if self.auto:
            why = f"--workers auto: {processes} for {_count(self.cpus, 'CPU', 'CPUs')}"
            if self.embedded:
                why = "--workers auto: 1 process, the embedded broker lives in one"
        else:
            why = processes
        head = (
            f"this instance holds up to {self.holds} streams "
            f"({self.workers} x {self.per_worker}; SSE_CONNECTION_LIMIT {self.connection_limit}, "
            f"open-file limit {self.fd_limit} per process, {why})"
        )
        if not self.short:
            return head
        head += f": one process holds at most {self.per_worker} under the open-file limit"
        if self.embedded:
            return (
                f"{head}; to hold {self.connection_limit}, set EVENTS_REDIS_STORAGE and run with "
                f"--workers auto (the embedded broker serves one process), or set "
                f"SSE_CONNECTION_LIMIT={self.holds} to make this the limit"
            )
        if self.needed is not None:
            return (
                f"{head}; run with --workers auto or --workers {max(self.needed, 1)} "
                f"(SSE_WORKERS) to hold {self.connection_limit}"
            )
        return (
            f"{head}; even {MAX_WORKERS} workers cannot hold {self.connection_limit}: raise the "
            f"open-file limit (ulimit -n, LimitNOFILE), or set SSE_CONNECTION_LIMIT={self.holds} "
            "to make this the limit"
        )


def plan_workers(settings: Settings, fd_limit: int, cpus: int | None = None) -> Plan:
    """Resolves `settings.workers` (`WORKERS_AUTO` included) against the open-file limit."""
    cpus = cpu_count() if cpus is None else cpus
    limit = settings.connection_limit
    embedded = settings.redis is None
    auto = settings.workers == WORKERS_AUTO
    needed = workers_needed(limit, fd_limit)
    if not auto:
        workers = settings.workers
    elif embedded:
        workers = 1
    else:
        # One per CPU (never more than streams to share), more while a share does not fit.
        workers = max(min(cpus, limit), needed or MAX_WORKERS)
        workers = min(MAX_WORKERS, workers)
    share = per_worker_limit(limit, workers)
    per_worker = effective_connection_limit(share, fd_limit)
    return Plan(
        connection_limit=limit,
        fd_limit=fd_limit,
        workers=workers,
        auto=auto,
        embedded=embedded,
        cpus=cpus,
        per_worker=per_worker,
        holds=min(limit, per_worker * workers),
        needed=needed,
        default_limit=limit == Settings().connection_limit,
    )


def _count(n: int, one: str, many: str) -> str:
    return f"{n} {one if n == 1 else many}"
