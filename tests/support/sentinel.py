"""A real Sentinel set on loopback: a primary, a replica and three sentinels."""

from __future__ import annotations

import contextlib
import subprocess
import time
from pathlib import Path

import redis

from .procs import REDIS_SERVER, free_port, wait_for

MASTER_NAME = "mymaster"
DATA_PASSWORD = "data-secret"
SENTINEL_PASSWORD = "sentinel-secret"


class SentinelSet:
    """`primary`/`replica` are data node ports (the replica of the primary at start); the
    data nodes need DATA_PASSWORD, the sentinels SENTINEL_PASSWORD. `url` is the gateway's."""

    def __init__(self, workdir: Path, sentinels: int = 3, down_after_ms: int = 1000) -> None:
        self.workdir = workdir
        self.primary = free_port()
        self.replica = free_port()
        self.sentinels = [free_port() for _ in range(sentinels)]
        self.down_after_ms = down_after_ms
        self.procs: dict[int, subprocess.Popen[bytes]] = {}

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{port}" for port in self.sentinels)
        return (
            f"redis+sentinel://:{DATA_PASSWORD}@{hosts}/{MASTER_NAME}"
            f"?sentinel_password={SENTINEL_PASSWORD}"
        )

    def _spawn(self, port: int, args: list[str]) -> None:
        workdir = self.workdir / str(port)
        workdir.mkdir(parents=True, exist_ok=True)
        with open(workdir / "log", "ab") as log:
            self.procs[port] = subprocess.Popen(
                [REDIS_SERVER, *args], stdout=log, stderr=subprocess.STDOUT, cwd=workdir
            )

    def _data_node(self, port: int, *extra: str) -> None:
        self._spawn(
            port,
            [
                "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                "--protected-mode", "no", "--dir", str(self.workdir / str(port)),
                "--requirepass", DATA_PASSWORD, "--masterauth", DATA_PASSWORD, *extra,
            ],
        )  # fmt: skip

    def client(self, port: int, *, sentinel: bool = False) -> redis.Redis:
        password = SENTINEL_PASSWORD if sentinel else DATA_PASSWORD
        return redis.Redis(port=port, password=password, socket_timeout=5)

    def start(self) -> SentinelSet:
        self._data_node(self.primary)
        self._data_node(self.replica, "--replicaof", "127.0.0.1", str(self.primary))
        quorum = min(2, len(self.sentinels))
        for port in self.sentinels:
            workdir = self.workdir / str(port)
            workdir.mkdir(parents=True, exist_ok=True)
            config = workdir / "sentinel.conf"
            config.write_text(
                f"port {port}\nbind 127.0.0.1\nprotected-mode no\ndir {workdir}\n"
                f"requirepass {SENTINEL_PASSWORD}\nsentinel sentinel-pass {SENTINEL_PASSWORD}\n"
                f"sentinel monitor {MASTER_NAME} 127.0.0.1 {self.primary} {quorum}\n"
                f"sentinel auth-pass {MASTER_NAME} {DATA_PASSWORD}\n"
                f"sentinel down-after-milliseconds {MASTER_NAME} {self.down_after_ms}\n"
                f"sentinel failover-timeout {MASTER_NAME} 3000\n"
            )
            self._spawn(port, [str(config), "--sentinel"])
        wait_for(self._linked, timeout=30, interval=0.1, what="the replica to sync")
        wait_for(self._sentinels_ready, timeout=30, interval=0.1, what="sentinels to meet")
        return self

    def stale_sentinel(self, name: str) -> int:
        """Starts a fourth sentinel that names the replica as the primary of `name` (as one
        that missed a failover would); its port."""
        port = free_port()
        workdir = self.workdir / str(port)
        workdir.mkdir(parents=True, exist_ok=True)
        config = workdir / "sentinel.conf"
        config.write_text(
            f"port {port}\nbind 127.0.0.1\nprotected-mode no\ndir {workdir}\n"
            f"requirepass {SENTINEL_PASSWORD}\n"
            f"sentinel monitor {name} 127.0.0.1 {self.replica} 1\n"
            f"sentinel auth-pass {name} {DATA_PASSWORD}\n"
            f"sentinel down-after-milliseconds {name} 600000\n"
        )
        self._spawn(port, [str(config), "--sentinel"])
        wait_for(lambda: self._answers(port), timeout=20, what="the stale sentinel")
        return port

    def _answers(self, port: int) -> bool:
        with contextlib.suppress(redis.RedisError), self.client(port, sentinel=True) as client:
            return bool(client.ping())
        return False

    def _linked(self) -> bool:
        with contextlib.suppress(redis.RedisError), self.client(self.replica) as client:
            return client.info("replication").get("master_link_status") == "up"
        return False

    def _sentinels_ready(self) -> bool:
        for port in self.sentinels:
            try:
                with self.client(port, sentinel=True) as client:
                    peers = client.execute_command("SENTINEL", "SENTINELS", MASTER_NAME)
                    replicas = client.execute_command("SENTINEL", "REPLICAS", MASTER_NAME)
            except redis.RedisError:
                return False
            if len(peers) < len(self.sentinels) - 1 or not replicas:
                return False
        return True

    def primary_named(self) -> int | None:
        """The primary's port as the first sentinel that answers names it."""
        for port in self.sentinels:
            with contextlib.suppress(redis.RedisError), self.client(port, sentinel=True) as c:
                reply = c.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", MASTER_NAME)
                if reply:
                    return int(reply[1])
        return None

    def kill(self, port: int) -> None:
        """SIGKILL of one process of the set."""
        proc = self.procs[port]
        proc.kill()
        proc.wait(10)

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        deadline = time.monotonic() + 10
        for proc in self.procs.values():
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
