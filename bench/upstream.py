"""Fast fake OpenAI upstream for the benchmark (raw asyncio protocol on uvloop, no framework).

    python bench/upstream.py [--host 127.0.0.1] [--port 0] [--chunk-delay 0.0]

Prints "READY <port>" on stdout once listening; stops on SIGTERM/SIGINT.

POST (any path) answers a fixed ~600-byte chat.completion JSON with Content-Length.
If the request body contains ``"stream": true`` (or ``"stream":true``) the answer is a chunked
text/event-stream of 50 ``data: {...}`` events (~150 bytes each, one HTTP chunk each, written one
by one with a yield to the event loop or ``delay`` seconds between them), then ``data: [DONE]``
and the terminating 0-chunk. The delay between chunks is ``--chunk-delay`` unless the body
contains ``"bench_chunk_delay": <seconds>``. GET anything answers the same JSON (handy for curl),
except ``GET /__stats``: counters (connections accepted, open, requests, streams) as JSON.
HTTP/1.1 keep-alive; request bodies with Content-Length or chunked; pipelining tolerated.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import signal
import sys

import uvloop

N_CHUNKS = 50

_COMMON_HEADERS = (
    b"date: Tue, 25 Nov 2025 01:00:00 GMT\r\n"
    b"openai-organization: org-bench\r\n"
    b"openai-processing-ms: 123\r\n"
    b"openai-version: 2020-10-01\r\n"
    b"x-ratelimit-limit-requests: 10000\r\n"
    b"x-ratelimit-limit-tokens: 2000000\r\n"
    b"x-ratelimit-remaining-requests: 9999\r\n"
    b"x-ratelimit-remaining-tokens: 1999980\r\n"
    b"x-ratelimit-reset-requests: 6ms\r\n"
    b"x-ratelimit-reset-tokens: 0s\r\n"
    b"x-request-id: req_0123456789abcdef0123456789abcdef\r\n"
)

_COMPLETION = {
    "id": "chatcmpl-B9MHDbslfkBeAs8l4bebGdFOJ6PeG",
    "object": "chat.completion",
    "created": 1741570283,
    "model": "gpt-4o-mini-2024-07-18",
    "choices": [
        {
            "index": 0,
            "message": {
                "role": "assistant",
                "content": "Hello! A fixed answer from the benchmark's fake upstream.",
                "refusal": None,
                "annotations": [],
            },
            "logprobs": None,
            "finish_reason": "stop",
        }
    ],
    "usage": {
        "prompt_tokens": 19,
        "completion_tokens": 28,
        "total_tokens": 47,
        "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": 0,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    },
    "service_tier": "default",
    "system_fingerprint": "fp_06737a9306",
}
COMPLETION_BODY = json.dumps(_COMPLETION, separators=(",", ":")).encode()

JSON_RESPONSE = (
    b"HTTP/1.1 200 OK\r\n"
    b"content-type: application/json\r\n"
    + _COMMON_HEADERS
    + b"content-length: "
    + str(len(COMPLETION_BODY)).encode()
    + b"\r\n\r\n"
    + COMPLETION_BODY
)

STREAM_HEAD = (
    b"HTTP/1.1 200 OK\r\n"
    b"content-type: text/event-stream; charset=utf-8\r\n"
    + _COMMON_HEADERS
    + b"transfer-encoding: chunked\r\n\r\n"
)


def _chunk(payload: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(payload), payload)


def _event(i: int, usage: bool = False) -> bytes:
    delta = {"content": f" tok{i:02d}"} if i else {"role": "assistant", "content": ""}
    ev: dict[str, object] = {
        "id": "chatcmpl-B9MHDbslfkBeAs8l",
        "object": "chat.completion.chunk",
        "created": 1741570283,
        "model": "gpt-4o-mini",
        "choices": [{"index": 0, "delta": delta}],
    }
    if usage:  # as OpenAI does when the request has stream_options.include_usage
        ev["usage"] = None
    return b"data: " + json.dumps(ev, separators=(",", ":")).encode() + b"\n\n"


def _usage_event() -> bytes:
    ev = {
        "id": "chatcmpl-B9MHDbslfkBeAs8l",
        "object": "chat.completion.chunk",
        "created": 1741570283,
        "model": "gpt-4o-mini",
        "choices": [],
        "usage": {
            "prompt_tokens": 19,
            "completion_tokens": N_CHUNKS,
            "total_tokens": 19 + N_CHUNKS,
        },
    }
    return b"data: " + json.dumps(ev, separators=(",", ":")).encode() + b"\n\n"


STREAM_CHUNKS = [_chunk(_event(i)) for i in range(N_CHUNKS)]
# with stream_options.include_usage: "usage":null in each chunk, then one usage-only chunk
USAGE_CHUNKS = [_chunk(_event(i, usage=True)) for i in range(N_CHUNKS)]
USAGE_CHUNKS.append(_chunk(_usage_event()))
STREAM_TAIL = _chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n"

_CL_RE = re.compile(rb"\r\ncontent-length:[ \t]*(\d+)", re.IGNORECASE)
_TE_RE = re.compile(rb"\r\ntransfer-encoding:[^\r]*chunked", re.IGNORECASE)
_CLOSE_RE = re.compile(rb"\r\nconnection:[^\r]*close", re.IGNORECASE)
_DELAY_RE = re.compile(rb'"bench_chunk_delay"\s*:\s*([0-9.]+)')
_USAGE_RE = re.compile(rb'"include_usage"\s*:\s*true')


class _NeedMore(Exception):
    pass


def _parse_chunked(buf: bytearray, pos: int) -> tuple[bytes, int]:
    """Decode a chunked body starting at pos. Returns (body, end) or raises _NeedMore."""
    out = bytearray()
    while True:
        eol = buf.find(b"\r\n", pos)
        if eol < 0:
            raise _NeedMore
        size = int(bytes(buf[pos:eol]).split(b";", 1)[0].strip() or b"0", 16)
        pos = eol + 2
        if size == 0:
            # skip trailers up to the empty line
            while True:
                eol = buf.find(b"\r\n", pos)
                if eol < 0:
                    raise _NeedMore
                if eol == pos:
                    return bytes(out), eol + 2
                pos = eol + 2
        if len(buf) < pos + size + 2:
            raise _NeedMore
        out += buf[pos : pos + size]
        pos += size + 2


STATS = {"connections": 0, "open": 0, "requests": 0, "streams": 0}


def _stats_response() -> bytes:
    body = json.dumps(STATS).encode()
    return b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (
        len(body),
        body,
    )


class UpstreamProtocol(asyncio.Protocol):
    __slots__ = ("buf", "busy", "closed", "default_delay", "transport")

    def __init__(self, default_delay: float) -> None:
        self.default_delay = default_delay
        self.buf = bytearray()
        self.busy = False
        self.closed = False
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        STATS["connections"] += 1
        STATS["open"] += 1

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        STATS["open"] -= 1

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if not self.busy:
            self._process()

    def _process(self) -> None:
        buf = self.buf
        while buf and not self.busy and not self.closed:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(buf[: end + 2])
            body_start = end + 4
            if _TE_RE.search(head):
                try:
                    body, stop = _parse_chunked(buf, body_start)
                except _NeedMore:
                    return
            else:
                m = _CL_RE.search(head)
                n = int(m.group(1)) if m else 0
                stop = body_start + n
                if len(buf) < stop:
                    return
                body = bytes(buf[body_start:stop])
            del buf[:stop]
            close = bool(_CLOSE_RE.search(head))
            if head.startswith(b"GET /__stats "):
                self.transport.write(_stats_response())  # type: ignore[union-attr]
                continue
            STATS["requests"] += 1
            if b'"stream":true' in body or b'"stream": true' in body:
                m = _DELAY_RE.search(body)
                delay = float(m.group(1)) if m else self.default_delay
                self.busy = True
                STATS["streams"] += 1
                chunks = USAGE_CHUNKS if _USAGE_RE.search(body) else STREAM_CHUNKS
                asyncio.get_running_loop().create_task(self._stream(delay, close, chunks))
                return
            self.transport.write(JSON_RESPONSE)  # type: ignore[union-attr]
            if close:
                self.transport.close()  # type: ignore[union-attr]
                self.closed = True
                return

    async def _stream(self, delay: float, close: bool, chunks: list[bytes]) -> None:
        t = self.transport
        assert t is not None
        try:
            t.write(STREAM_HEAD)
            for c in chunks:
                if delay > 0:
                    await asyncio.sleep(delay)
                else:
                    await asyncio.sleep(0)
                if self.closed:
                    return
                t.write(c)
            if delay > 0:
                await asyncio.sleep(delay)
            if self.closed:
                return
            t.write(STREAM_TAIL)
            if close:
                t.close()
                self.closed = True
                return
        finally:
            self.busy = False
        if self.buf:
            self._process()


async def serve(host: str, port: int, delay: float) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: UpstreamProtocol(delay), host, port, backlog=4096, reuse_address=True
    )
    actual = server.sockets[0].getsockname()[1]
    sys.stdout.write(f"READY {actual}\n")
    sys.stdout.flush()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    server.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--chunk-delay", type=float, default=0.0)
    a = ap.parse_args()
    uvloop.run(serve(a.host, a.port, a.chunk_delay))


if __name__ == "__main__":
    main()
