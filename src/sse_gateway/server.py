"""Process level: event loop, open-file limit, listener, signals, draining and worker processes."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import resource
import shutil
import signal
import socket
import sys
import time
from pathlib import Path

from sse_gateway.app import Gateway, broker_from_settings
from sse_gateway.instance import InstanceView, expect_worker, make_instance_dir, retire
from sse_gateway.keys_file import load_jwt_keys
from sse_gateway.settings import Settings
from sse_gateway.sizing import per_worker_limit, plan_workers

log = logging.getLogger("sse_gateway")

LISTEN_BACKLOG = 4096
WORKER_MIN_LIFETIME = 5.0
BROKER_WAIT_SECONDS = 3.0


def raise_fd_limit() -> int:
    """Raises the soft open-file limit to the hard limit; returns the limit in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as exc:
            log.warning("could not raise the open-file limit from %d to %d: %s", soft, target, exc)
    return soft


class _Hangup:
    """A SIGHUP that came before serve() handles it: the default action would end the process,
    and ignoring it would lose a keys reload sent while a (worker) process starts."""

    pending = False

    @classmethod
    def remember(cls, _signum: int, _frame: object) -> None:
        cls.pending = True


def _use_uvloop() -> None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on every supported platform
        log.warning("uvloop is not installed; running on the default asyncio loop")
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


async def serve(
    settings: Settings, *, reuse_port: bool = False, instance_dir: Path | None = None
) -> int:
    """Runs one gateway process until SIGTERM/SIGINT and its drain; returns the exit code.
    `instance_dir`: a worker's (`--workers`), where it and its siblings share their figures
    for the instance's `/metrics` and `/readyz` (sse_gateway.instance)."""
    loop = asyncio.get_running_loop()
    fd_limit = raise_fd_limit()
    gateway = Gateway(
        settings,
        broker_from_settings(settings),
        fd_limit=fd_limit,
        connection_limit=per_worker_limit(settings.connection_limit, settings.workers),
    )
    await gateway.start()
    view = None
    if instance_dir is not None:
        exposition = gateway.router.exposition
        view = InstanceView(
            instance_dir, exposition.gateway, exposition.process, gateway.ready_reason
        )
        gateway.router.show_instance(view.render, view.readiness)
    # SIGHUP: SSE_JWT_KEYS_FILE is read anew, open streams stay (docs/operations.md).
    loop.add_signal_handler(signal.SIGHUP, gateway.reload_keys)
    if _Hangup.pending:
        _Hangup.pending = False
        gateway.reload_keys()
    # Listen once the broker is connected (waiting at most BROKER_WAIT_SECONDS): the clients
    # of a restarted instance come back the moment it listens, and are better served than
    # refused. A broker still down by then gets refusals EventSource survives (docs/api.md).
    deadline = loop.time() + BROKER_WAIT_SECONDS
    while not gateway.broker.connected and loop.time() < deadline:
        await asyncio.sleep(0.01)
    if view is not None:
        view.start()  # ready by now, mostly: the supervisor's `starting` is replaced
    try:
        server = await loop.create_server(
            gateway.protocol_factory,
            settings.host,
            settings.port,
            backlog=LISTEN_BACKLOG,
            reuse_address=True,
            reuse_port=reuse_port or None,
        )
    except OSError as exc:
        log.error("cannot listen on %s:%d: %s", settings.host, settings.port, exc.strerror)
        if view is not None:
            view.stop()
        await gateway.close()
        return 1
    metrics_server = None
    if settings.metrics_port is not None:
        # Workers each bind it too (SO_REUSEPORT): a scrape reaches one of them.
        try:
            metrics_server = await loop.create_server(
                gateway.metrics_protocol_factory,
                settings.metrics_host,
                settings.metrics_port,
                reuse_address=True,
                reuse_port=reuse_port or None,
            )
        except OSError as exc:
            log.error(
                "cannot listen on %s:%d for metrics: %s",
                settings.metrics_host,
                settings.metrics_port,
                exc.strerror,
            )
            server.close()
            if view is not None:
                view.stop()
            await gateway.close()
            return 1
        metrics_at = ", ".join(_format_address(s) for s in metrics_server.sockets)
        log.info("/metrics on %s only, with /healthz and /readyz", metrics_at)
    addresses = ", ".join(_format_address(s) for s in server.sockets)
    log.info(
        "sse-gateway listening on %s; %s; stream limit %d; keep-alive %.3gs",
        addresses,
        gateway.broker.description,
        gateway.connection_limit,
        settings.keepalive_period,
        extra={"event": "listening"},
    )
    stop = asyncio.Event()
    hurry = asyncio.Event()

    def on_stop() -> None:
        # A second SIGTERM/SIGINT (Ctrl-C twice, or the supervisor passing one on) ends
        # the shutdown delay early; the drain still runs.
        if stop.is_set():
            hurry.set()
        stop.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_stop)
    await stop.wait()
    await announce_shutdown(gateway, settings.shutdown_delay, hurry)
    await drain(gateway, server, settings.drain_seconds)
    if metrics_server is not None:  # open until the end: scrapes see the drain, /readyz 503
        metrics_server.close()
    if view is not None:
        view.stop()
    return 0


async def announce_shutdown(gateway: Gateway, delay: float, hurry: asyncio.Event) -> None:
    """SSE_SHUTDOWN_DELAY (seconds; 0: none): not ready, yet serving as before, until `delay`
    passes or `hurry` is set. A load balancer that has not seen the pod go (Kubernetes takes
    endpoints out while SIGTERM is on its way) still connects and is served, not refused."""
    if delay <= 0:
        return
    log.info(
        "stopping: /readyz 503 draining, still serving for %.3gs (SSE_SHUTDOWN_DELAY)",
        delay,
        extra={"event": "shutdown_delay"},
    )
    # 0. /readyz 503 `draining`, on new connections too: the listener stays open. New
    #    streams are served, not refused: a client the balancer sends here now gets its
    #    events until the drain ends its stream with `event: close` and a spread `retry:`
    #    (the same reconnect a refusal would cause, later and without a gap).
    gateway.announce_shutdown()
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(hurry.wait(), timeout=delay)


async def drain(gateway: Gateway, server: asyncio.Server, drain_seconds: float) -> None:
    """Stop accepting, report not-ready, close every stream, all within the drain period."""
    started = time.monotonic()
    lifecycle = gateway.lifecycle
    log.info(
        "draining: %d streams, at most %.3gs",
        lifecycle.open_streams,
        drain_seconds,
        extra={"event": "draining"},
    )
    # 1. Not ready, no keep-alive, no new stream: a stream request already read is refused
    #    `draining` (with a `close` event and `retry:` an EventSource survives, or 503).
    gateway.begin_drain()
    # 2. No new sockets.
    server.close()
    # 3. Every stream ends with `event: close` and its own jittered `retry:`, so clients come
    #    back spread out.
    gateway.close_all_streams("shutdown")
    deadline = started + max(0.0, drain_seconds - 0.5)
    # 4. Wait for the streams' sockets: their last `retry:` must be flushed. Idle keep-alive
    #    sockets (health checkers) are not waited for; they go with the process.
    while lifecycle.open_sockets > 0 and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    # 5. Heartbeats and the broker last: nothing is left to deliver to.
    try:
        await asyncio.wait_for(gateway.close(), timeout=max(0.2, deadline - time.monotonic()))
    except Exception as exc:  # a broken broker connection must not fail the shutdown
        log.debug("while closing the broker: %r", exc)
    took = time.monotonic() - started
    log.info("drained in %.2fs", took, extra={"event": "drained", "duration": round(took, 3)})


def _format_address(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def run(settings: Settings) -> int:
    """Runs the gateway in this process, or supervises `settings.workers` worker processes."""
    _use_uvloop()
    signal.signal(signal.SIGHUP, _Hangup.remember)
    plan = plan_workers(settings, raise_fd_limit())
    # One line says what the instance holds and why; a WARNING only for a limit the user set
    # that is not met (the default one is simply reported).
    log.log(
        logging.WARNING if plan.warn else logging.INFO,
        "%s",
        plan.message(),
        extra={"event": "capacity"},
    )
    settings = settings.replace(workers=plan.workers)
    if settings.workers <= 1:
        return asyncio.run(serve(settings))
    return _supervise(settings)


def _worker_main(settings: Settings, instance_dir: Path) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor turns Ctrl-C into SIGTERM
    # Not the supervisor's handler inherited through fork: until serve() installs its own,
    # SIGTERM must end a worker (one stuck at start, say).
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGHUP, _Hangup.remember)
    _use_uvloop()
    sys.exit(asyncio.run(serve(settings, reuse_port=True, instance_dir=instance_dir)))


def _supervise(settings: Settings) -> int:
    """Worker processes share the port with SO_REUSEPORT; the kernel spreads connections.
    Their figures meet in a directory of the instance's own, removed at the end."""
    instance_dir = make_instance_dir()
    try:
        return _run_workers(settings, instance_dir)
    finally:
        shutil.rmtree(instance_dir, ignore_errors=True)


def _run_workers(settings: Settings, instance_dir: Path) -> int:
    context = multiprocessing.get_context("fork")
    workers: list[multiprocessing.process.BaseProcess] = []
    stopping = False

    started_at: dict[int, float] = {}

    def spawn() -> multiprocessing.process.BaseProcess:
        process = context.Process(target=_worker_main, args=(settings, instance_dir), daemon=False)
        process.start()
        started_at[id(process)] = time.monotonic()
        if process.pid is not None:
            expect_worker(instance_dir, process.pid)  # not ready until it says it is
        return process

    def on_signal(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        for process in workers:
            if process.pid is not None and process.is_alive():
                os.kill(process.pid, signal.SIGTERM)

    hangup = False

    def on_hangup(_signum: int, _frame: object) -> None:
        nonlocal hangup
        hangup = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGHUP, on_hangup)
    log.info("starting %d worker processes", settings.workers)
    workers.extend(spawn() for _ in range(settings.workers))
    while True:
        time.sleep(0.2)
        if hangup and not stopping:
            hangup = False
            # A worker started later (one that died) gets the keys its siblings now have.
            settings = _reload_keys(settings)
            alive = [p.pid for p in workers if p.pid is not None and p.is_alive()]
            log.info("SIGHUP: reloading SSE_JWT_KEYS_FILE in %d workers", len(alive))
            for pid in alive:
                os.kill(pid, signal.SIGHUP)
        if stopping:
            deadline = time.monotonic() + settings.shutdown_delay + settings.drain_seconds + 2
            for process in workers:
                process.join(max(0.0, deadline - time.monotonic()))
                if process.is_alive():
                    process.kill()
            failed = [p for p in workers if p.exitcode not in (0, -signal.SIGTERM)]
            return 1 if failed else 0
        for index, process in enumerate(workers):
            if process.is_alive():
                continue
            lived = time.monotonic() - started_at.pop(id(process), 0.0)
            if lived < WORKER_MIN_LIFETIME:
                # Dying at start (port taken, bad config) would only repeat: give up.
                log.error(
                    "worker %d exited with %s %.1fs after start; stopping",
                    process.pid,
                    process.exitcode,
                    lived,
                )
                on_signal(signal.SIGTERM, None)
                for other in workers:
                    other.join(settings.shutdown_delay + settings.drain_seconds + 2)
                    if other.is_alive():
                        other.kill()
                        other.join(1)
                return 1
            log.error("worker %d exited with %s; restarting it", process.pid, process.exitcode)
            if process.pid is not None:
                retire(instance_dir, process.pid)  # its counts stay in the instance's
            workers[index] = spawn()


def _reload_keys(settings: Settings) -> Settings:
    """The supervisor's copy of the keys file, as the workers will have it after a SIGHUP;
    unchanged when the file does not load (each worker logs why and keeps its keys)."""
    if settings.jwt_keys_file is None:
        return settings
    try:
        return settings.replace(jwt_keys=load_jwt_keys(settings.jwt_keys_file))
    except ValueError:
        return settings
