"""Closed-loop HTTP/1.1 load generator for the benchmark (raw asyncio protocols on uvloop).

    python bench/load.py --url http://127.0.0.1:PORT --mode json|stream|slow \
        --concurrency C --requests N [--warmup W] [--chunk-delay S] [--sync] [--timeout T]

C keep-alive connections each send POST /v1/chat/completions (pre-built request bytes), wait for
the complete response and immediately send the next one until N requests have been sent in
total (closed loop). Responses are parsed minimally: status line, Content-Length or chunked
framing until the 0-chunk. In stream modes the SSE payload is kept and checked: every stream
must carry 50 ``data: {...}`` events and ``data: [DONE]``. Latency = monotonic time from the
write of the request to the last byte of the response (ttfb: to its first byte).

mode json: non-stream chat completion. mode stream: ``"stream": true``, chunks without delay
(or paced: ``"bench_chunk_delay": S`` with --chunk-delay S).
mode slow: ``"stream": true`` with ``"bench_chunk_delay": S`` (the fake upstream waits S
seconds between chunks), warmed up with one round of streams with a 2 ms delay on every
connection (all in flight at once).

With --sync: after connecting and warming up, prints "READY" and waits for a line on stdin,
then runs the measured load, prints "DONE" and then the JSON result on one line (this lets the
caller read the proxy's CPU counters exactly around the measured window). Without --sync it
prints only the JSON result.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import sys
import time
from urllib.parse import urlsplit

import uvloop

# the key every request carries; BENCH_API_KEY=fk-... measures the forward-key path
API_KEY = os.environ.get("BENCH_API_KEY", "sk-bench-0123456789abcdef0123456789abcdef")
EXPECTED_EVENTS = 50
_perf = time.perf_counter

REQUEST_MESSAGES = [
    {"role": "system", "content": "You are a helpful assistant. Answer briefly."},
    {"role": "user", "content": "Say hello and tell me, in one sentence, what a gateway does."},
]


def build_request(host: str, prefix: str, mode: str, chunk_delay: float) -> bytes:
    body: dict[str, object] = {"model": "gpt-4o-mini", "messages": REQUEST_MESSAGES}
    if mode in ("stream", "slow"):
        body["stream"] = True
    if mode == "slow" or (mode == "stream" and chunk_delay > 0):
        body["bench_chunk_delay"] = chunk_delay
    raw = json.dumps(body).encode()
    head = (
        f"POST {prefix}/v1/chat/completions HTTP/1.1\r\n"
        f"Host: {host}\r\n"
        "User-Agent: openai-forward-bench/1\r\n"
        "Accept: application/json\r\n"
        f"Authorization: Bearer {API_KEY}\r\n"
        "Content-Type: application/json\r\n"
        f"Content-Length: {len(raw)}\r\n\r\n"
    ).encode()
    return head + raw


class Run:
    """Shared state of one closed-loop run over a set of connections."""

    def __init__(self, request: bytes, total: int, check_stream: bool) -> None:
        self.request = request
        self.to_send = total
        self.total = total
        self.check_stream = check_stream
        self.done_count = 0
        self.lat: list[float] = []
        self.ttfb: list[float] = []
        self.errors = 0
        self.error_samples: list[str] = []
        self.bad_streams = 0
        self.body_bytes = 0
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def take(self) -> bool:
        if self.to_send > 0:
            self.to_send -= 1
            return True
        return False

    def finished_one(self) -> None:
        self.done_count += 1
        if self.done_count >= self.total and not self.done.done():
            self.done.set_result(None)

    def error(self, msg: str) -> None:
        self.errors += 1
        if len(self.error_samples) < 5:
            self.error_samples.append(msg)
        self.finished_one()


class Client(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.run: Run | None = None
        self.lost = False
        self.closed_fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._reset()

    def _reset(self) -> None:
        self.buf = bytearray()
        self.in_flight = False
        self.head_done = False
        self.t0 = 0.0
        self.t_first = 0.0
        self.status = 0
        self.chunked = False
        self.cl_left = 0
        self.chunk_left = 0
        self.final = False
        self.payload = bytearray()
        self.nbytes = 0
        self.conn_close = False

    # -- asyncio callbacks
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if not self.closed_fut.done():
            self.closed_fut.set_result(None)
        if self.in_flight and self.run is not None:
            self.in_flight = False
            self.run.error(f"connection lost mid-response ({exc!r}, status {self.status})")

    def data_received(self, data: bytes) -> None:
        if not self.in_flight:
            return
        if not self.t_first:
            self.t_first = _perf()
        buf = self.buf
        buf += data
        if not self.head_done:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(buf[:end]).lower()
            try:
                self.status = int(head[9:12])
            except ValueError:
                self._fail(f"bad status line {head[:40]!r}")
                return
            self.head_done = True
            self.conn_close = b"\r\nconnection: close" in head
            del buf[: end + 4]
            if b"\r\ntransfer-encoding: chunked" in head:
                self.chunked = True
            else:
                i = head.find(b"\r\ncontent-length:")
                if i < 0:
                    self._fail("response without content-length or chunked framing")
                    return
                j = head.find(b"\r\n", i + 2)
                self.cl_left = int(head[i + 17 : j if j > 0 else None])
        if self.chunked:
            self._feed_chunked()
        else:
            n = len(buf)
            self.nbytes += n
            if self.run is not None and self.run.check_stream:
                self.payload += buf
            self.cl_left -= n
            buf.clear()
            if self.cl_left <= 0:
                self._complete()

    def _feed_chunked(self) -> None:
        buf = self.buf
        pos = 0
        n = len(buf)
        keep = self.run is not None and self.run.check_stream
        while pos < n:
            if self.chunk_left:
                take = min(self.chunk_left, n - pos)
                if keep:
                    self.payload += buf[pos : pos + take]
                self.nbytes += take
                pos += take
                self.chunk_left -= take
                if self.chunk_left == 0 and self.final:
                    del buf[:pos]
                    self._complete()
                    return
                continue
            eol = buf.find(b"\r\n", pos)
            if eol < 0:
                break
            try:
                size = int(bytes(buf[pos:eol]).split(b";", 1)[0], 16)
            except ValueError:
                self._fail(f"bad chunk size line {bytes(buf[pos:eol])[:40]!r}")
                return
            pos = eol + 2
            # chunk data plus its CRLF (kept in payload: harmless for the event count)
            self.chunk_left = size + 2
            if size == 0:
                self.final = True  # assumes no trailers
        del buf[:pos]

    def _fail(self, msg: str) -> None:
        self.in_flight = False
        if self.run is not None:
            self.run.error(msg)
        if self.transport is not None:
            self.transport.close()

    def _complete(self) -> None:
        t = _perf()
        run = self.run
        assert run is not None
        self.in_flight = False
        ok = self.status == 200
        if ok and run.check_stream:
            p = bytes(self.payload)
            events = p.count(b"data: {")
            if events != EXPECTED_EVENTS or b"data: [DONE]" not in p:
                ok = False
                run.bad_streams += 1
                msg = f"stream with {events} events, [DONE]={b'data: [DONE]' in p}"
                if len(run.error_samples) < 5:
                    run.error_samples.append(msg)
        if ok:
            run.lat.append(t - self.t0)
            run.ttfb.append(self.t_first - self.t0)
            run.body_bytes += self.nbytes
            run.finished_one()
        else:
            if self.status != 200:
                run.error(f"status {self.status}")
            else:
                run.errors += 1
                run.finished_one()
        if self.conn_close:
            assert self.transport is not None
            self.transport.close()
            return
        if run.take():
            self.send()

    def send(self) -> None:
        run = self.run
        assert run is not None and self.transport is not None
        self._reset()
        self.in_flight = True
        self.t0 = _perf()
        self.transport.write(run.request)


async def connect_all(host: str, port: int, n: int) -> list[Client]:
    loop = asyncio.get_running_loop()
    clients: list[Client] = []
    batch = 64  # gentle with small listen backlogs
    for i in range(0, n, batch):
        res = await asyncio.gather(
            *(loop.create_connection(Client, host, port) for _ in range(min(batch, n - i)))
        )
        clients.extend(p for _, p in res)
    return clients


async def run_load(
    clients: list[Client],
    host: str,
    port: int,
    request: bytes,
    total: int,
    check_stream: bool,
    timeout: float,
) -> tuple[Run, float]:
    """Runs `total` requests over the clients; replaces connections the server closed."""
    run = Run(request, total, check_stream)
    loop = asyncio.get_running_loop()
    t0 = _perf()
    for c in clients:
        c.run = run
        if not c.lost and run.take():
            c.send()
    deadline = t0 + timeout
    # Keep the concurrency: reopen connections that were closed (Connection: close, errors).
    while not run.done.done():
        left = deadline - _perf()
        if left <= 0:
            break
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.shield(run.done), min(left, 0.05))
        for idx, c in enumerate(clients):
            if c.lost and run.to_send > 0:
                try:
                    _, nc = await loop.create_connection(Client, host, port)
                except OSError as e:
                    run.error(f"reconnect failed: {e!r}")
                    run.take()
                    continue
                clients[idx] = nc
                nc.run = run
                if run.take():
                    nc.send()
    elapsed = _perf() - t0
    if not run.done.done():
        missing = run.total - run.done_count
        run.errors += missing
        run.error_samples.append(f"timeout after {timeout:.0f}s: {missing} requests unfinished")
    return run, elapsed


def pct(sorted_vals: list[float], p: float) -> float:
    if not sorted_vals:
        return float("nan")
    k = min(len(sorted_vals) - 1, max(0, round(p / 100 * len(sorted_vals) + 0.5) - 1))
    return sorted_vals[k]


def summarize(run: Run, elapsed: float, cpu: float) -> dict[str, object]:
    lat = sorted(run.lat)
    ttfb = sorted(run.ttfb)
    ok = len(lat)

    def ms(v: float) -> float:
        return round(v * 1000, 4)

    return {
        "requests": run.total,
        "ok": ok,
        "errors": run.errors,
        "bad_streams": run.bad_streams,
        "error_samples": run.error_samples,
        "elapsed_s": round(elapsed, 4),
        "rps": round(ok / elapsed, 1) if elapsed > 0 else 0.0,
        "body_bytes": run.body_bytes,
        "lat_ms": {
            "p50": ms(pct(lat, 50)),
            "p90": ms(pct(lat, 90)),
            "p99": ms(pct(lat, 99)),
            "max": ms(lat[-1]) if lat else None,
            "mean": ms(sum(lat) / ok) if ok else None,
        },
        "ttfb_ms": {"p50": ms(pct(ttfb, 50)), "p99": ms(pct(ttfb, 99))},
        "loadgen_cpu_s": round(cpu, 4),
    }


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


async def amain(a: argparse.Namespace) -> dict[str, object]:
    u = urlsplit(a.url)
    host = u.hostname or "127.0.0.1"
    port = u.port or 80
    hosthdr = f"{host}:{port}"
    prefix = u.path.rstrip("/")
    check = a.mode in ("stream", "slow")
    clients = await connect_all(host, port, a.concurrency)
    if a.warmup > 0:
        # slow mode: a round of short slow streams, all in flight at once, so that the proxy
        # opens as many upstream connections as the measured run will need
        wdelay = min(a.chunk_delay, 0.002)
        wreq = build_request(hosthdr, prefix, a.mode, wdelay)
        wtotal = max(a.warmup, a.concurrency)
        wrun, _ = await run_load(clients, host, port, wreq, wtotal, check, a.timeout)
        if wrun.errors:
            return {"fatal": f"warmup failed: {wrun.errors} errors: {wrun.error_samples}"}
    if a.sync:
        sys.stdout.write("READY\n")
        sys.stdout.flush()
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    req = build_request(hosthdr, prefix, a.mode, a.chunk_delay)
    c0 = _cpu()
    run, elapsed = await run_load(clients, host, port, req, a.requests, check, a.timeout)
    cpu = _cpu() - c0
    if a.sync:
        sys.stdout.write("DONE\n")
        sys.stdout.flush()
    res = summarize(run, elapsed, cpu)
    res.update(mode=a.mode, concurrency=a.concurrency, url=a.url)
    for c in clients:
        if c.transport is not None:
            c.transport.close()
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description="closed-loop HTTP/1.1 load generator")
    ap.add_argument("--url", required=True, help="base URL, e.g. http://127.0.0.1:8000")
    ap.add_argument("--mode", choices=("json", "stream", "slow"), default="json")
    ap.add_argument("--concurrency", "-c", type=int, default=1)
    ap.add_argument("--requests", "-n", type=int, default=1000)
    ap.add_argument("--warmup", type=int, default=0, help="requests before the measured run")
    ap.add_argument(
        "--chunk-delay",
        type=float,
        help="seconds between chunks (slow mode: default 0.1; stream mode: 0)",
    )
    ap.add_argument("--timeout", type=float, default=120.0, help="max seconds for one run")
    ap.add_argument("--sync", action="store_true", help="READY / wait stdin / DONE handshake")
    a = ap.parse_args()
    if a.chunk_delay is None:
        a.chunk_delay = 0.1 if a.mode == "slow" else 0.0
    res = uvloop.run(amain(a))
    sys.stdout.write(json.dumps(res) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
