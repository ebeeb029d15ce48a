"""Processes and sockets: bind once, serve from one or several worker processes.

With ``workers == 1`` the gateway serves from this process. With more, this process binds
the socket, forks the workers (each with its own event loop on the shared socket), restarts
a worker that dies, and on SIGTERM or SIGINT asks them all to drain and stop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
import time
from typing import Any

from .config import Config
from .http1 import ServerProtocol
from .keypool import key_id
from .proxy import Proxy

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
    family = socket.AF_INET6 if ":" in config.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((config.host, config.port))
    sock.listen(2048)
    sock.setblocking(False)
    return sock


def serve(config: Config) -> int:
    """Run the gateway until a signal stops it; returns the exit code."""
    setup_logging(config.log_level)
    try:
        sock = bind(config)
    except OSError as exc:
        log.error("cannot listen on %s:%d: %s", config.host, config.port, exc.strerror)
        return 1
    host, port = sock.getsockname()[:2]
    log.info("openai-forward listening on http://%s:%d, %d worker(s)", host, port, config.workers)
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
    if config.workers == 1:
        return run_worker(config, sock)
    return supervise(config, sock)


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


def run_worker(config: Config, sock: socket.socket, shared: Any = None, index: int = 0) -> int:
    loop = _new_loop()
    asyncio.set_event_loop(loop)
    if shared is not None:
        shared.attach(index)
    try:
        loop.run_until_complete(_worker(config, sock, state_store(config, shared)))
    finally:
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()
    return 0


async def _worker(config: Config, sock: socket.socket, state: Any) -> None:
    loop = asyncio.get_running_loop()
    proxy = Proxy(config, loop, state)
    proxy.start()
    connections: set[ServerProtocol] = set()
    server = await loop.create_server(
        lambda: ServerProtocol(proxy, config, connections), sock=sock, backlog=2048
    )
    stop = asyncio.Event()
    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, stop.set)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)  # blocked across fork
    await stop.wait()
    log.info("stopping: draining %d connection(s)", len(connections))
    server.close()
    for conn in list(connections):
        conn.shutdown()
    deadline = loop.time() + config.shutdown_timeout
    while connections and loop.time() < deadline:
        await asyncio.sleep(0.05)
    for conn in list(connections):
        conn.abort()
    await proxy.aclose()
    await asyncio.sleep(0)


def supervise(config: Config, sock: socket.socket) -> int:
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
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                signal.signal(signal.SIGINT, signal.SIG_DFL)
                code = run_worker(config, sock, shared, index)
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
    sock.close()
    return code
