"""A real Redis Cluster on loopback for the cluster tests: 3 masters, 3 replicas."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import time
from pathlib import Path

import redis
from redis.cluster import ClusterNode, RedisCluster

from .procs import REDIS_SERVER, free_port

REDIS_CLI = "/usr/bin/redis-cli"


def _cluster_port() -> int:
    """A free port whose cluster bus port (+10000) is free too."""
    while True:
        port = free_port()
        if port <= 55535 and _bindable(port + 10000):
            return port


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


class ClusterNodeProcess:
    """One `redis-server --cluster-enabled yes` on 127.0.0.1 and a free port."""

    def __init__(self, workdir: Path) -> None:
        self.port = _cluster_port()
        self.workdir = workdir / str(self.port)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.workdir / "redis.log", "ab") as log:
            self.proc = subprocess.Popen(
                [
                    REDIS_SERVER,
                    "--port",
                    str(self.port),
                    "--bind",
                    "127.0.0.1",
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    str(self.workdir / "nodes.conf"),
                    "--cluster-node-timeout",
                    "1000",
                    "--repl-diskless-sync-delay",
                    "0",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--dir",
                    str(self.workdir),
                    "--protected-mode",
                    "no",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
            )

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=10)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL, by PID: no goodbye to clients or to the other nodes."""
        if self.running:
            assert self.proc is not None
            self.proc.kill()
            self.proc.wait(10)

    def stop(self) -> None:
        if self.running:
            assert self.proc is not None
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


class RedisClusterProcesses:
    """Six nodes made one cluster by `redis-cli --cluster create --cluster-replicas 1` (by
    default: 3 masters, 3 replicas)."""

    def __init__(self, workdir: Path, size: int = 6, replicas: int = 1) -> None:
        self.workdir = workdir
        self.size = size
        self.nodes = [ClusterNodeProcess(workdir) for _ in range(size)]
        self.replicas = replicas

    @property
    def url(self) -> str:
        seeds = ",".join(f"127.0.0.1:{node.port}" for node in self.nodes)
        return f"redis+cluster://{seeds}"

    def start(self, timeout: float = 30.0) -> RedisClusterProcesses:
        """Starts the nodes and makes them a cluster; once more on fresh ports when that
        fails (a port taken meanwhile by another process of a busy machine, say)."""
        for attempt in (1, 2):
            try:
                return self._start(timeout)
            except (RuntimeError, subprocess.SubprocessError) as exc:
                self.stop()
                if attempt == 2:
                    raise RuntimeError(f"{exc}; last node log:\n{self._log_tail()}") from exc
                self.nodes = [ClusterNodeProcess(self.workdir) for _ in range(self.size)]
            except BaseException:
                self.stop()
                raise
        raise AssertionError("unreachable")

    def _log_tail(self) -> str:
        logs = [node.workdir / "redis.log" for node in self.nodes]
        return "\n".join(p.read_text()[-1500:] for p in logs if p.exists())

    def _start(self, timeout: float) -> RedisClusterProcesses:
        for node in self.nodes:
            node.start()
        deadline = time.monotonic() + timeout
        for node in self.nodes:
            while True:
                with contextlib.suppress(redis.RedisError), contextlib.closing(node.client()) as c:
                    if c.ping():
                        break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"cluster node {node.port} did not answer PING")
                time.sleep(0.05)
        subprocess.run(
            [
                REDIS_CLI,
                "--cluster",
                "create",
                *(f"127.0.0.1:{node.port}" for node in self.nodes),
                "--cluster-replicas",
                str(self.replicas),
                "--cluster-yes",
            ],
            check=True,
            capture_output=True,
            timeout=timeout,
        )
        self.wait_healthy(timeout)
        self.wait_replicas_synced(timeout)
        return self

    def wait_replicas_synced(self, timeout: float = 30.0) -> None:
        """Until every replica is in sync (health online): only then can one take over."""
        deadline = time.monotonic() + timeout
        while True:
            if all(self._synced(node) for node in self.nodes if node.running):
                return
            if time.monotonic() > deadline:
                raise RuntimeError("the replicas did not sync")
            time.sleep(0.1)

    def wait_healthy(self, timeout: float = 30.0) -> None:
        """Until every live node says cluster_state:ok and all 16384 slots are served."""
        deadline = time.monotonic() + timeout
        while True:
            if all(self._ok(node) for node in self.nodes if node.running):
                return
            if time.monotonic() > deadline:
                raise RuntimeError("the cluster did not become healthy")
            time.sleep(0.1)

    @staticmethod
    def _synced(node: ClusterNodeProcess) -> bool:
        try:
            with contextlib.closing(node.client()) as c:
                info = c.info("replication")
        except redis.RedisError:
            return False
        if info.get("role") != "slave":
            return True
        return info.get("master_link_status") == "up" and not info.get("master_sync_in_progress")

    @staticmethod
    def _ok(node: ClusterNodeProcess) -> bool:
        try:
            with contextlib.closing(node.client()) as c:
                info = c.execute_command("CLUSTER", "INFO")
        except redis.RedisError:
            return False
        text = info.decode() if isinstance(info, bytes) else str(info)
        return "cluster_state:ok" in text and "cluster_slots_ok:16384" in text

    def client(self) -> RedisCluster:
        """A redis-py cluster client (seeded with every live node)."""
        seeds = [ClusterNode("127.0.0.1", node.port) for node in self.nodes if node.running]
        return RedisCluster(startup_nodes=seeds, socket_timeout=10)

    def node(self, port: int) -> ClusterNodeProcess:
        return next(node for node in self.nodes if node.port == port)

    def masters(self) -> dict[int, list[tuple[int, int]]]:
        """Port of each live master -> its slot ranges, as a live node sees them."""
        for node in self.nodes:
            if not node.running:
                continue
            with contextlib.suppress(redis.RedisError), contextlib.closing(node.client()) as c:
                out: dict[int, list[tuple[int, int]]] = {}
                for start, end, master, *_ in c.execute_command("CLUSTER", "SLOTS"):
                    out.setdefault(int(master[1]), []).append((int(start), int(end)))
                return out
        raise RuntimeError("no live cluster node")

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
