"""`sse-gateway publish` when Redis cannot be reached: one error line and exit 1, on a single
Redis as on a Redis Cluster (whose client connects as it is made), never a traceback."""

from __future__ import annotations

import re

import pytest
from support.procs import cli, free_port


@pytest.mark.parametrize("scheme", ["redis", "redis+cluster"])
def test_publish_to_an_unreachable_redis_says_so_and_exits_1(scheme: str) -> None:
    url = f"{scheme}://127.0.0.1:{free_port()}"  # nothing listens there
    done = cli("publish", "--redis", url, "--brand", "b", "--player", "p", "--type", "t",
               "--data", "1")  # fmt: skip
    assert done.returncode == 1, (done.stdout, done.stderr)
    # "redis unavailable: …", or "redis cluster unavailable: …" for redis+cluster://
    assert re.match(r"error: redis (cluster )?unavailable: ", done.stderr), done.stderr
    assert "Traceback" not in done.stderr
    assert done.stdout == ""
