"""Who is online on Redis Cluster: `GET /v1/players/…` asked of a gateway process that holds
none of the player's streams and has not published anything yet (its cluster client has not
read the slot map), so it publishes the presence query before any other cluster command."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from support.cluster import RedisClusterProcesses
from support.procs import Gateway, wait_for

pytestmark = pytest.mark.timeout(120)

KEY = "cluster-presence-test-key-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[RedisClusterProcesses]:
    processes = RedisClusterProcesses(tmp_path / "cluster", size=3, replicas=0).start()
    try:
        yield processes
    finally:
        processes.stop()


def test_a_process_with_no_command_sent_yet_counts_the_streams_of_another(
    cluster: RedisClusterProcesses, tmp_path: Path, ids: Callable[..., str]
) -> None:
    flags = ["--redis", cluster.url, "--publish-api-key", KEY]
    holder = Gateway(flags, workdir=tmp_path / "holder").start()
    asker = Gateway(flags, workdir=tmp_path / "asker").start()
    try:
        brand, player = ids("b"), ids("p")
        stream, _ = holder.player_stream(brand, player)

        def counted() -> dict[str, Any] | None:
            response = asker.get(f"/v1/players/{brand}/{player}", AUTH)
            assert response.status == 200, f"{response.status} {response.body[:300]!r}"
            body: dict[str, Any] = response.json()
            # A reply that misses the 0.5 s wait on a loaded machine: ask again.
            return body if body["answered"] >= body["instances"] else None

        body = wait_for(counted, timeout=30, what="the holder's reply")
        assert body["instances"] == 1
        assert (body["connections"], body["local_connections"], body["answered"]) == (1, 0, 1)
        assert body["online"] is True
        stream.close()
    finally:
        asker.stop()
        holder.stop()
    assert "Traceback" not in asker.logs() + holder.logs()
