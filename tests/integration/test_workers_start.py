"""The start line (issue 11, workers on one host): a user who changed nothing sees a clean start
that says at INFO what the instance holds and why; any advice it prints works as printed
(the real CLI, run under a chosen open-file limit with `prlimit`)."""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.procs import Gateway, RedisServer

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.skipif(shutil.which("prlimit") is None, reason="needs prlimit (util-linux)"),
]

HOLDS = re.compile(r"this instance holds up to (\d+) streams")
WORKERS_COUNT = re.compile(r"--workers (\d+)")
LIMIT_ADVICE = re.compile(r"set SSE_CONNECTION_LIMIT=(\d+)")


class LimitedGateway(Gateway):
    """The gateway under an open-file limit of `nofile` (soft and hard), as `ulimit -n` sets
    it: prlimit execs the gateway, so the pid is the gateway's."""

    nofile = 20_000

    @property
    def command(self) -> list[str]:
        return ["prlimit", f"--nofile={self.nofile}", *super().command]


class Starts:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.started: list[Gateway] = []

    def __call__(
        self,
        *flags: str,
        nofile: int = 20_000,
        redis: RedisServer | None = None,
        env: dict[str, str] | None = None,
        dev: bool = False,
    ) -> str:
        """Starts a gateway, waits for /readyz 200, stops it; its log."""
        all_flags = [*flags, *(["--redis", redis.url] if redis is not None else [])]
        if dev:
            all_flags.append("--dev")
        gateway = LimitedGateway(
            all_flags,
            env=env,
            workdir=self.workdir / f"gw-{len(self.started)}",
            jwt_secret=None if dev else "start-line-test-secret-" + "x" * 32,
        )
        gateway.nofile = nofile
        self.started.append(gateway)
        gateway.start()
        logs = gateway.logs()
        gateway.stop()
        return logs


@pytest.fixture
def starts(tmp_path: Path) -> Iterator[Starts]:
    runner = Starts(tmp_path)
    try:
        yield runner
    finally:
        for gateway in runner.started:
            gateway.stop()


def number(pattern: re.Pattern[str], line: str) -> int:
    """The number `pattern` finds in `line` (asserted to be there)."""
    found = pattern.search(line)
    assert found is not None, f"{pattern.pattern!r} not in {line}"
    return int(found.group(1))


def holds_line(logs: str) -> str:
    """The one start line, asserted to be there once."""
    lines = [line for line in logs.splitlines() if HOLDS.search(line)]
    assert len(lines) == 1, logs[-3000:]
    return lines[0]


def assert_clean(logs: str, holds: int) -> str:
    """No WARNING or ERROR; the start line at INFO says `holds` and gives no advice."""
    noisy = [line for line in logs.splitlines() if " WARNING " in line or " ERROR " in line]
    assert not noisy, noisy
    line = holds_line(logs)
    assert " INFO " in line, line
    assert number(HOLDS, line) == holds, line
    assert "run with" not in line and "set SSE_CONNECTION_LIMIT" not in line, line
    return line


def assert_quiet_but_informed(logs: str) -> str:
    """A default start that holds less than 50000: INFO with the why and the remedy."""
    noisy = [line for line in logs.splitlines() if " WARNING " in line or " ERROR " in line]
    assert not noisy, noisy
    line = holds_line(logs)
    assert " INFO " in line, line
    assert "SSE_CONNECTION_LIMIT 50000" in line and "open-file limit 20000" in line, line
    return line


def test_defaults_with_the_embedded_broker_start_clean(starts: Starts) -> None:
    line = assert_quiet_but_informed(starts())
    assert "1 worker process" in line, line
    # Workers would exit 2 with the embedded broker: no worker count is offered.
    assert not WORKERS_COUNT.search(line), line
    assert "set EVENTS_REDIS_STORAGE and run with --workers auto" in line, line


def test_defaults_with_redis_start_clean_and_the_advice_works(
    starts: Starts, redis_server: RedisServer
) -> None:
    line = assert_quiet_but_informed(starts(redis=redis_server))
    count = number(WORKERS_COUNT, line)
    assert "--workers auto" in line and 1 < count <= 64, line
    assert_clean(starts("--workers", str(count), redis=redis_server), 50_000)
    auto = assert_clean(starts("--workers", "auto", redis=redis_server), 50_000)
    assert "--workers auto:" in auto, auto


def test_dev_mode_starts_clean_and_never_offers_workers(starts: Starts) -> None:
    line = assert_quiet_but_informed(starts(dev=True))
    assert not WORKERS_COUNT.search(line), line
    advised = number(LIMIT_ADVICE, line)
    # As printed: the limit it names gives a start that holds all of it.
    assert_clean(starts(dev=True, env={"SSE_CONNECTION_LIMIT": str(advised)}), advised)
    # `--workers auto` is one process with the embedded broker, not an exit 2.
    auto = assert_clean(
        starts("--workers", "auto", dev=True, env={"SSE_CONNECTION_LIMIT": "500"}), 500
    )
    assert "the embedded broker lives in one" in auto, auto


def test_a_tiny_limit_starts_clean(starts: Starts, redis_server: RedisServer) -> None:
    assert_clean(starts("--connection-limit", "3", "--workers", "2", redis=redis_server), 3)
    assert_clean(starts("--connection-limit", "1"), 1)


def test_a_low_open_file_limit_names_a_worker_count_that_fits(
    starts: Starts, redis_server: RedisServer
) -> None:
    logs = starts("--connection-limit", "2000", nofile=1000, redis=redis_server)
    line = holds_line(logs)
    # The user set this limit and does not get it: a WARNING, with a count that fits.
    assert " WARNING " in line, line
    count = number(WORKERS_COUNT, line)
    assert 1 < count <= 64, line
    flags = ("--connection-limit", "2000")
    assert_clean(starts(*flags, "--workers", str(count), nofile=1000, redis=redis_server), 2000)
    assert_clean(starts(*flags, "--workers", "auto", nofile=1000, redis=redis_server), 2000)


def test_a_tiny_open_file_limit_offers_no_absurd_worker_count(
    starts: Starts, redis_server: RedisServer
) -> None:
    """Before: `run with --workers 1316` (the cap is 64). Now: what can work as printed."""
    logs = starts(nofile=150, redis=redis_server)
    line = holds_line(logs)
    assert " INFO " in line, line
    assert all(int(n) <= 64 for n in WORKERS_COUNT.findall(line)), line
    assert "raise the open-file limit" in line, line
    advised = number(LIMIT_ADVICE, line)
    env = {"SSE_CONNECTION_LIMIT": str(advised)}
    assert_clean(starts(nofile=150, redis=redis_server, env=env), advised)
