"""Processes and sockets: bind once, serve from one or several worker processes.

With ``workers == 1`` the gateway serves from this process. With more, this process binds
the socket, forks the workers (each with its own event loop on the shared socket), restarts
a worker that dies, and on SIGTERM or SIGINT asks them all to drain and stop.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import sys
import time
from typing import Any

from .banner import banner, http_url
from .config import Config, listen_address
from .errors import GatewayError
from .http1 import Request, ServerProtocol
from .keypool import key_id
from .proxy import METRICS, Proxy

log = logging.getLogger("openai_forward")

STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format="%(asctime)s %(levelname)s [%(process)d] %(message)s",
        stream=sys.stderr,
    )


def bind(config: Config) -> socket.socket:
    """The listening socket; IPv6 hosts get an AF_INET6 socket."""
    return bind_address(config.host, config.port)


def bind_address(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.setblocking(False)
    return sock


class Sockets:
    """What the workers serve: the gateway's socket, and the metrics' own if configured."""

    def __init__(self, main: socket.socket, metrics: socket.socket | None) -> None:
        self.main = main
        self.metrics = metrics

    def close(self) -> None:
        self.main.close()
        if self.metrics is not None:
            self.metrics.close()


def serve(config: Config) -> int:
    """Run the gateway until a signal stops it; returns the exit code."""
    setup_logging(config.log_level)
    try:
        sock = bind(config)
    except OSError as exc:
        log.error("cannot listen on %s:%d: %s", config.host, config.port, exc.strerror)
        return 1
    host, port = sock.getsockname()[:2]
    log.info("openai-forward listening on %s, %d worker(s)", http_url(host, port), config.workers)
    msock = None
    if config.metrics and config.metrics_listen:
        mhost, mport = listen_address(config.metrics_listen, "metrics_listen")
        try:
            msock = bind_address(mhost, mport)
        except OSError as exc:
            log.error("cannot listen on %s for the metrics: %s", config.metrics_listen, exc)
            sock.close()
            return 1
        bound = msock.getsockname()
        log.info("metrics on %s%s", http_url(bound[0], bound[1]), config.metrics_path)
    elif config.metrics:
        log.info("metrics on %s (admin token required)", config.metrics_path)
    log.info("startup %s", json.dumps(banner(config, host, port), separators=(",", ":")))
    problem = _check_cache(config)
    if problem is not None:
        log.error("cache_store: %s", problem)
        Sockets(sock, msock).close()
        return 2
    sockets = Sockets(sock, msock)
    for up in config.routes:
        target = up.upstream
        log.info(
            "route %s -> %s (%s://%s:%d%s)%s%s%s",
            up.route,
            up.name,
            target.scheme,
            target.host,
            target.port,
            target.base_path,
            f", models {', '.join(up.models)}" if up.models else "",
            f", keys {' '.join(key_id(k.encode()) for k in dict.fromkeys(up.all_keys))}"
            if up.all_keys
            else "",
            ", via proxy" if up.proxy or config.proxy else "",
        )
    if config.metrics:
        from . import metrics

        metrics.setup(config.workers, None)
    try:
        if config.workers == 1:
            return run_worker(config, sockets)
        return supervise(config, sockets)
    finally:
        if config.metrics:
            metrics.teardown()


def _check_cache(config: Config) -> str | None:
    """Why the response cache cannot be used, or None: found before any worker starts."""
    if config.cache_mode == "off":
        return None
    from .cachestore import CacheError, open_cache
    from .caching import cache_location

    try:
        store = open_cache(cache_location(config), max_bytes=config.cache_max_bytes)
        asyncio.run(store.aclose())
    except (CacheError, ValueError, OSError) as exc:
        return str(exc)
    return None


def state_store(config: Config, shared: Any = None) -> Any:
    """Where limit counters live: Redis when ``state`` names it, else the memory shared by
    the workers (several), else this process's memory (one worker)."""
    from .limits import LocalStore

    if config.state:
        from .redisstore import RedisStore

        return RedisStore(config.state, timeout=config.state_timeout, fallback=LocalStore())
    return shared if shared is not None else LocalStore()


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:  # Windows, or a platform without uvloop wheels
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def run_worker(
    config: Config,
    sockets: Sockets,
    shared: Any = None,
    index: int = 0,
    parent: int | None = None,
) -> int:
    """Serve until a stop signal; ``parent``: the supervisor's pid, for a forked worker,
    which stops by itself (draining, as on SIGTERM) if its supervisor is gone."""
    loop = _new_loop()
    asyncio.set_event_loop(loop)
    if shared is not None:
        shared.attach(index)
    try:
        loop.run_until_complete(_worker(config, sockets, state_store(config, shared), parent))
    finally:
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()
    return 0


async def _worker(config: Config, sockets: Sockets, state: Any, parent: int | None) -> None:
    loop = asyncio.get_running_loop()
    metrics = None
    if config.metrics:
        from .metrics import Metrics

        metrics = Metrics()
    proxy = Proxy(config, loop, state, metrics)
    proxy.start()
    connections: set[ServerProtocol] = set()
    server = await loop.create_server(
        lambda: ServerProtocol(proxy, config, connections), sock=sockets.main, backlog=2048
    )
    metrics_server = None
    if sockets.metrics is not None:
        scrapes = MetricsApp(proxy)
        metrics_server = await loop.create_server(
            lambda: ServerProtocol(scrapes, config, set()), sock=sockets.metrics
        )
    stop = asyncio.Event()
    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, stop.set)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)  # blocked across fork
    orphaned = None
    if parent is not None:  # a supervisor killed by SIGKILL tells nobody: look once a second
        orphaned = loop.create_task(_orphaned(parent, stop))
    await stop.wait()
    if orphaned is not None:
        orphaned.cancel()
    log.info("stopping: draining %d connection(s)", len(connections))
    server.close()
    if metrics_server is not None:
        metrics_server.close()
    for conn in list(connections):
        conn.shutdown()
    deadline = loop.time() + config.shutdown_timeout
    while connections and loop.time() < deadline:
        await asyncio.sleep(0.05)
    for conn in list(connections):
        conn.abort()
    await proxy.aclose()
    await asyncio.sleep(0)


async def _orphaned(parent: int, stop: asyncio.Event) -> None:
    """Set ``stop`` once this process's parent is no longer ``parent`` (it died, and the
    worker was handed to init): nobody would stop or restart this worker, and the port
    could not be served again while it held the socket."""
    while os.getppid() == parent:
        await asyncio.sleep(1.0)
    log.warning("the supervisor (pid %d) is gone: stopping this worker", parent)
    stop.set()


def supervise(config: Config, sockets: Sockets) -> int:
    """Fork the workers, keep them running, stop them together."""
    stopping = False
    children: dict[int, tuple[float, int]] = {}
    shared = None
    if not config.state:
        from .shmstore import SharedStore

        shared = SharedStore(slots=config.state_slots, workers=config.workers)

    def spawn(index: int) -> None:
        # A stop signal that arrives before the worker has its handlers must wait for them,
        # not kill it half-started: block across fork, the worker unblocks when ready.
        signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        parent = os.getpid()
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                signal.signal(signal.SIGINT, signal.SIG_DFL)
                code = run_worker(config, sockets, shared, index, parent)
            except BaseException:
                log.exception("worker failed")
            finally:
                os._exit(code)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
        children[pid] = (time.monotonic(), index)

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    for index in range(config.workers):
        spawn(index)
    code = 0
    deadline = None
    while children:
        if stopping and deadline is None:
            deadline = time.monotonic() + config.shutdown_timeout + 5
        try:
            # polled, not blocking: a stop signal must be able to start the kill deadline
            # even while every worker is still busy draining
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            break
        if pid == 0:
            if deadline is not None and time.monotonic() > deadline:
                for child in children:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(child, signal.SIGKILL)
            time.sleep(0.1)
            continue
        entry = children.pop(pid, None)
        if entry is None:
            continue
        if config.metrics:
            from . import metrics

            metrics.worker_died(pid)  # its in-flight gauges go; its counters stay
        started, index = entry
        exit_code = os.waitstatus_to_exitcode(status)
        if stopping:
            if exit_code != 0:
                code = 1
            continue
        log.error("worker %d exited with %d; starting a new one", pid, exit_code)
        if shared is not None:
            shared.reset_worker(index)  # the concurrency slots it held are free again
        if time.monotonic() - started < 1.0:
            time.sleep(1.0)  # a worker that dies at once: do not spin
        spawn(index)
    sockets.close()
    return code


class MetricsApp:
    """What the metrics' own address serves: ``metrics_path``, and nothing else."""

    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy
        self.path = proxy.metrics_path

    def begin(self, req: Request) -> bytes | None:
        path = req.target.split(b"?", 1)[0].decode("latin-1")
        if path != self.path:
            raise GatewayError(404, "not_found", f"Only {self.path} is served here.")
        if req.method not in (b"GET", b"HEAD"):
            raise GatewayError(405, "method_not_allowed", "Use GET for the metrics.")
        req.ctx = METRICS
        return None

    def handle(self, req: Request) -> None:
        self.proxy.loop.create_task(self.proxy.serve_metrics(req))

    def refused(self, req: Request, error: GatewayError, request_id: str) -> None:
        pass  # a bad scrape is not a request of the gateway's
