"""`--workers auto` and the start line's advice (sse_gateway.sizing)."""

from __future__ import annotations

import re

import pytest

from sse_gateway.edge.admission import effective_connection_limit
from sse_gateway.redis_address import parse_redis_address
from sse_gateway.settings import MAX_WORKERS, WORKERS_AUTO, Settings, parse_value
from sse_gateway.sizing import plan_workers, workers_needed

REDIS = parse_redis_address("redis://127.0.0.1:6379/0")


def test_auto_parses_and_counts_are_bounded() -> None:
    assert parse_value("workers", "auto") == WORKERS_AUTO
    assert parse_value("workers", "AUTO") == WORKERS_AUTO
    assert parse_value("workers", "64") == 64
    with pytest.raises(ValueError, match="or auto"):
        parse_value("workers", "65")


def test_auto_is_one_per_cpu_at_least_and_enough_for_the_limit() -> None:
    settings = Settings(redis=REDIS, workers=WORKERS_AUTO)
    plan = plan_workers(settings, fd_limit=20_000, cpus=2)
    assert plan.workers == 3 and plan.holds == 50_000 and not plan.short
    assert plan_workers(settings, fd_limit=1_000_000, cpus=4).workers == 4
    # Never more workers than streams to share.
    tiny = Settings(redis=REDIS, workers=WORKERS_AUTO, connection_limit=2)
    assert plan_workers(tiny, fd_limit=20_000, cpus=8).workers == 2


def test_auto_with_the_embedded_broker_is_one_process() -> None:
    plan = plan_workers(Settings(workers=WORKERS_AUTO), fd_limit=20_000, cpus=8)
    assert plan.workers == 1
    assert "embedded broker" in plan.message()


@pytest.mark.parametrize("fd_limit", [150, 300, 1000, 5000, 20_000, 65_536])
@pytest.mark.parametrize("limit", [1, 10, 2000, 50_000, 1_000_000])
def test_every_worker_count_advised_fits(fd_limit: int, limit: int) -> None:
    """Whatever the limits: a count printed is at most 64 and holds the limit."""
    plan = plan_workers(Settings(redis=REDIS, connection_limit=limit), fd_limit, cpus=2)
    message = plan.message()
    for count in map(int, re.findall(r"--workers (\d+)", message)):
        assert count <= MAX_WORKERS, message
        share = -(-limit // count)
        assert effective_connection_limit(share, fd_limit) >= share, message
    advised = re.search(r"SSE_CONNECTION_LIMIT=(\d+)", message)
    if advised:
        again = plan_workers(
            Settings(redis=REDIS, connection_limit=int(advised.group(1))), fd_limit, cpus=2
        )
        assert not again.short, again.message()
    assert plan.short == ("run with" in message or "SSE_CONNECTION_LIMIT=" in message)


def test_warning_only_for_a_limit_the_user_set() -> None:
    default = plan_workers(Settings(redis=REDIS), fd_limit=20_000, cpus=2)
    assert default.short and not default.warn
    chosen = plan_workers(Settings(redis=REDIS, connection_limit=30_000), 20_000, cpus=2)
    assert chosen.short and chosen.warn


def test_workers_needed() -> None:
    assert workers_needed(50_000, 20_000) == 3
    assert workers_needed(10, 20_000) == 1
    assert workers_needed(50_000, 150) is None
