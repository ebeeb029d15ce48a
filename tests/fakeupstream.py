"""A scriptable fake of the OpenAI API, speaking raw HTTP/1.1 over real sockets.

The server is a plain asyncio TCP server (no framework) running its own event loop in a
daemon thread, on 127.0.0.1 and a free port. Requests are parsed with httptools and
recorded exactly as they arrived (raw request-target, header order and case, body bytes);
replies are written byte by byte, so a test can send odd headers, duplicate headers,
custom reason phrases, broken framing, resets and stalls.

    with FakeUpstream() as up:
        up.script("POST", "/v1/chat/completions", Reply(status=429, body=b"..."))
        ...  # point the gateway at up.url
        [req] = up.wait_for_requests(1)

Without a script, requests get OpenAI-shaped default answers (see ``_default_reply``).
The helpers ``chat_reply_text``, ``completion_text``, ``speech_bytes``, ``embedding_vector``
and ``image_bytes`` say what those defaults contain, so tests can compare exactly.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import http
import itertools
import json
import re
import secrets
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import httptools

__all__ = [
    "FakeUpstream",
    "Part",
    "Recorded",
    "Reply",
    "chat_reply_text",
    "completion_text",
    "embedding_vector",
    "image_bytes",
    "parse_multipart",
    "speech_bytes",
    "sse",
    "sse_event",
]

# --------------------------------------------------------------------------- data types


@dataclass
class Recorded:
    """One request as the upstream received it."""

    method: str
    target: str
    path: str
    query: str
    headers: list[tuple[str, str]]
    body: bytes
    conn_id: int
    chunked: bool
    received_at: float  # monotonic time at which the request head was complete
    completed_at: float = 0.0  # monotonic time at which the whole body had arrived
    http_version: str = "1.1"

    def header(self, name: str) -> str | None:
        """First value of header `name` (case-insensitive), or None."""
        values = self.headers_named(name)
        return values[0] if values else None

    def headers_named(self, name: str) -> list[str]:
        lname = name.lower()
        return [v for k, v in self.headers if k.lower() == lname]

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.body).hexdigest()

    def multipart(self) -> list[Part]:
        """The body parsed as multipart/form-data (raises ValueError if it is not)."""
        return parse_multipart(self.body, self.header("content-type") or "")


@dataclass
class Reply:
    """What the upstream answers."""

    status: int = 200
    reason: str | None = None
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""
    chunks: Iterable[bytes] | None = None  # a list, or any iterable (generated lazily)
    chunk_delay: float = 0.0
    headers_delay: float = 0.0
    end: str = "finish"  # "finish" | "reset" | "stall" | "close"
    raw: bytes | None = None
    # held until set: with chunks, every chunk after the first; with a body, the whole answer
    gate: threading.Event | None = None
    close: bool = False

    def __post_init__(self) -> None:
        if self.end not in ("finish", "reset", "stall", "close"):
            raise ValueError(f"Reply.end must be finish/reset/stall/close, not {self.end!r}")


@dataclass
class Part:
    """One part of a multipart/form-data body."""

    name: str | None
    filename: str | None
    headers: list[tuple[str, str]]
    data: bytes


# --------------------------------------------------------------------------- helpers


def sse_event(data: dict[str, Any] | str, event: str | None = None) -> bytes:
    """One SSE event: optional `event:` line, then `data: <json or text>` and a blank line."""
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {payload}\n\n".encode()


def sse(events: list[dict[str, Any] | str]) -> list[bytes]:
    """`data: {json}\\n\\n` per event, plus the final `data: [DONE]\\n\\n`."""
    return [sse_event(e) for e in events] + [b"data: [DONE]\n\n"]


def parse_multipart(body: bytes, content_type: str) -> list[Part]:
    m = re.search(r'boundary="?([^";]+)"?', content_type)
    if not m or not content_type.lower().startswith("multipart/"):
        raise ValueError(f"not a multipart content type: {content_type!r}")
    delimiter = b"\r\n--" + m.group(1).encode("latin-1")
    pieces = (b"\r\n" + body).split(delimiter)
    parts: list[Part] = []
    for piece in pieces[1:]:
        if piece.startswith(b"--"):
            break
        _, _, rest = piece.partition(b"\r\n")
        head, sep, data = rest.partition(b"\r\n\r\n")
        if not sep:
            raise ValueError("multipart part without a blank line after its headers")
        headers = []
        for line in head.split(b"\r\n"):
            k, _, v = line.decode("latin-1").partition(":")
            headers.append((k.strip(), v.strip()))
        disp = next((v for k, v in headers if k.lower() == "content-disposition"), "")
        name = re.search(r'(?:^|;)\s*name="([^"]*)"', disp)
        filename = re.search(r'filename="([^"]*)"', disp)
        parts.append(
            Part(
                name=name.group(1) if name else None,
                filename=filename.group(1) if filename else None,
                headers=headers,
                data=data,
            )
        )
    return parts


def chat_reply_text(user_text: str) -> str:
    """What the default chat completion answers to a last user message `user_text`."""
    return f"Echo: {user_text}"


def completion_text(prompt: str) -> str:
    return f"Completed: {prompt}"


def speech_bytes(text: str) -> bytes:
    """The deterministic 'audio' the default /v1/audio/speech returns for `text` (~8 KiB)."""
    seed = hashlib.sha256(text.encode()).digest()
    return b"ID3\x04\x00\x00" + b"".join(
        hashlib.sha256(seed + i.to_bytes(4, "big")).digest() for i in range(256)
    )


def image_bytes(prompt: str, index: int = 0) -> bytes:
    return b"\x89PNG\r\n\x1a\n" + hashlib.sha256(f"{prompt}/{index}".encode()).digest() * 4


def embedding_vector(text: str, dims: int = 8) -> list[float]:
    """Deterministic floats, exactly representable as float32 (so base64 round-trips)."""
    digest = hashlib.sha256(text.encode()).digest()
    return [(digest[i] - 128) / 128 for i in range(dims)]


def _split_words(text: str) -> list[str]:
    """Pieces whose concatenation is `text` (one per word, keeping the spaces)."""
    return re.findall(r"\S+\s*|\s+", text) or [""]


def _message_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return ""


def _last_user_text(messages: Any) -> str:
    for msg in reversed(messages if isinstance(messages, list) else []):
        if isinstance(msg, dict) and msg.get("role") == "user":
            return _message_text(msg.get("content"))
    return ""


def _hex(n: int = 12) -> str:
    return secrets.token_hex(n)[:n]


# --------------------------------------------------------------------------- the server


class _Conn:
    """Per-connection state: the request parser and the queue of complete requests."""

    def __init__(self, up: FakeUpstream, conn_id: int, writer: asyncio.StreamWriter) -> None:
        self.up = up
        self.id = conn_id
        self.writer = writer
        self.queue: asyncio.Queue[Recorded | None] = asyncio.Queue()
        self.peer_closed = asyncio.Event()
        self.parser = httptools.HttpRequestParser(self)
        self._reset_message()

    def _reset_message(self) -> None:
        self._url = bytearray()
        self._headers: list[tuple[str, str]] = []
        self._body = bytearray()
        self._head_at = 0.0

    # httptools callbacks
    def on_message_begin(self) -> None:
        self._reset_message()

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name.decode("latin-1"), value.decode("latin-1")))

    def on_headers_complete(self) -> None:
        self._head_at = time.monotonic()

    def on_body(self, body: bytes) -> None:
        self._body += body

    def on_message_complete(self) -> None:
        target = self._url.decode("latin-1")
        path, _, query = target.partition("?")
        te = ",".join(v for k, v in self._headers if k.lower() == "transfer-encoding")
        rec = Recorded(
            method=self.parser.get_method().decode("latin-1"),
            target=target,
            path=path,
            query=query,
            headers=self._headers,
            body=bytes(self._body),
            conn_id=self.id,
            chunked="chunked" in te.lower(),
            received_at=self._head_at,
            completed_at=time.monotonic(),
            http_version=self.parser.get_http_version(),
        )
        rec_keep_alive = self.parser.should_keep_alive()
        self._reset_message()
        self.up._record(rec)
        self.queue.put_nowait(rec)
        if not rec_keep_alive:
            self.queue.put_nowait(None)

    async def read_loop(self, reader: asyncio.StreamReader) -> None:
        try:
            while True:
                data = await reader.read(262144)
                if not data:
                    break
                try:
                    self.parser.feed_data(data)
                except httptools.HttpParserUpgrade:
                    pass
                except httptools.HttpParserError:
                    self.writer.write(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n")
                    break
        except (ConnectionError, OSError):
            pass
        finally:
            self.peer_closed.set()
            self.up._mark_closed(self.id)
            self.queue.put_nowait(None)


class FakeUpstream:
    """The fake OpenAI upstream. Thread-safe API; the server runs in its own loop thread."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host = host
        self.port = port
        self._lock = threading.Condition()
        self._requests: list[Recorded] = []
        self._scripts: dict[tuple[str, str], Reply | Callable[[Recorded], Reply]] = {}
        self._closed_at: dict[int, float] = {}
        self._open: set[int] = set()
        self._conn_ids = itertools.count(1)
        self._files: dict[str, tuple[dict[str, Any], bytes]] = {}
        self._batches: dict[str, dict[str, Any]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._stopping: asyncio.Event | None = None
        self.errors: list[BaseException] = []  # exceptions raised by scripts or the fake itself

    # ---- lifecycle

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> FakeUpstream:
        ready = threading.Event()
        errors: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(self._serve_start())
            except BaseException as exc:
                errors.append(exc)
                ready.set()
                loop.close()
                return
            ready.set()
            try:
                loop.run_forever()
            finally:
                loop.run_until_complete(self._serve_stop())
                loop.run_until_complete(loop.shutdown_asyncgens())
                loop.close()

        self._thread = threading.Thread(target=run, name="fake-upstream", daemon=True)
        self._thread.start()
        ready.wait(10)
        if errors:
            raise errors[0]
        return self

    def stop(self) -> None:
        if self._loop is None or self._thread is None:
            return
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop = None
        self._thread = None

    def __enter__(self) -> FakeUpstream:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    async def _serve_start(self) -> None:
        self._stopping = asyncio.Event()
        self._server = await asyncio.start_server(
            self._handle, self.host, self.port, limit=1 << 20, backlog=1024
        )
        self.port = self._server.sockets[0].getsockname()[1]

    async def _serve_stop(self) -> None:
        assert self._server is not None and self._stopping is not None
        self._stopping.set()
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    # ---- test-facing API

    @property
    def requests(self) -> list[Recorded]:
        with self._lock:
            return list(self._requests)

    @property
    def open_connections(self) -> int:
        with self._lock:
            return len(self._open)

    def wait_for_requests(self, n: int, timeout: float = 5.0) -> list[Recorded]:
        """Wait until at least `n` requests were recorded; returns them all."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while len(self._requests) < n:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(
                        f"upstream got {len(self._requests)} request(s) within {timeout}s, "
                        f"expected {n}: {[(r.method, r.target) for r in self._requests]}"
                    )
                self._lock.wait(left)
            return list(self._requests)

    def script(self, method: str, path: str, reply: Reply | Callable[[Recorded], Reply]) -> None:
        """Answer `method path` (path without query) with `reply` until reset()."""
        with self._lock:
            self._scripts[(method.upper(), path)] = reply

    def reset(self) -> None:
        with self._lock:
            self._requests.clear()
            self._scripts.clear()
            self._closed_at.clear()
            self._files.clear()
            self._batches.clear()

    def connection_closed_at(self, conn_id: int, timeout: float = 5.0) -> float:
        """Monotonic time at which connection `conn_id` ended (peer EOF/reset, or our close)."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while conn_id not in self._closed_at:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(
                        f"upstream connection {conn_id} still open after {timeout}s"
                    )
                self._lock.wait(left)
            return self._closed_at[conn_id]

    # ---- internals (loop thread)

    def _record(self, rec: Recorded) -> None:
        with self._lock:
            self._requests.append(rec)
            self._lock.notify_all()

    def _mark_closed(self, conn_id: int) -> None:
        with self._lock:
            self._closed_at.setdefault(conn_id, time.monotonic())
            self._open.discard(conn_id)
            self._lock.notify_all()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)  # type: ignore[arg-type]
        conn_id = next(self._conn_ids)
        with self._lock:
            self._open.add(conn_id)
        conn = _Conn(self, conn_id, writer)
        read_task = asyncio.create_task(conn.read_loop(reader))
        try:
            while True:
                rec = await conn.queue.get()
                if rec is None:
                    break
                reply = self._reply_for(rec)
                keep_open = await self._send(conn, rec, reply)
                if not keep_open:
                    break
        except (ConnectionError, OSError):
            pass
        except asyncio.CancelledError:
            pass  # stop(): end quietly (a cancelled handler task makes asyncio log an error)
        except Exception as exc:  # a bug in the fake or a bad Reply: keep it for the test to see
            self.errors.append(exc)
        finally:
            read_task.cancel()
            with contextlib.suppress(BaseException):
                await read_task
            self._mark_closed(conn_id)
            if not writer.transport.is_closing():
                writer.close()
            with contextlib.suppress(BaseException):
                await writer.wait_closed()
            self._tasks.discard(task)  # type: ignore[arg-type]

    def _reply_for(self, rec: Recorded) -> Reply:
        with self._lock:
            scripted = self._scripts.get((rec.method.upper(), rec.path))
        if scripted is None:
            return self._default_reply(rec)
        if not callable(scripted):
            return scripted
        try:
            return scripted(rec)
        except Exception as exc:
            self.errors.append(exc)
            return _error(500, f"fake upstream: script raised {exc!r}", "server_error")

    async def _send(self, conn: _Conn, rec: Recorded, reply: Reply) -> bool:
        """Write `reply`; returns whether the connection stays open for another request."""
        w = conn.writer
        if reply.headers_delay:
            await self._sleep_or_closed(conn, reply.headers_delay)
        if reply.gate is not None and reply.chunks is None:
            # a whole answer is held, head and all, until the gate opens (or the peer leaves)
            while not reply.gate.is_set() and not conn.peer_closed.is_set():
                await asyncio.sleep(0.002)
        if reply.raw is not None:
            w.write(reply.raw)
            await w.drain()
            return False
        names = {k.lower() for k, _ in reply.headers}
        chunked = reply.chunks is not None
        head = [f"HTTP/1.1 {reply.status} {self._reason(reply)}\r\n"]
        head += [f"{k}: {v}\r\n" for k, v in reply.headers]
        no_body = rec.method == "HEAD" or reply.status in (204, 304) or reply.status < 200
        if chunked and "transfer-encoding" not in names and not no_body:
            head.append("Transfer-Encoding: chunked\r\n")
        if not chunked and "content-length" not in names and reply.status not in (204, 304):
            head.append(f"Content-Length: {len(reply.body)}\r\n")
        client_close = (rec.header("connection") or "").lower() == "close"
        if (reply.close or client_close) and "connection" not in names:
            head.append("Connection: close\r\n")
        head.append("\r\n")
        w.write("".join(head).encode("latin-1"))
        if not no_body:
            if chunked:
                await self._send_chunks(conn, reply)
            else:
                w.write(reply.body)
        await w.drain()
        if reply.end == "finish" and chunked and not no_body:
            w.write(b"0\r\n\r\n")
            await w.drain()
        elif reply.end == "reset":
            await self._reset(w)
            return False
        elif reply.end == "stall":
            assert self._stopping is not None
            stop = asyncio.create_task(self._stopping.wait())
            closed = asyncio.create_task(conn.peer_closed.wait())
            await asyncio.wait({stop, closed}, return_when=asyncio.FIRST_COMPLETED)
            stop.cancel()
            closed.cancel()
            return False
        elif reply.end == "close":
            return False
        return not (reply.close or client_close)

    async def _send_chunks(self, conn: _Conn, reply: Reply) -> None:
        w = conn.writer
        assert reply.chunks is not None
        for i, chunk in enumerate(c for c in reply.chunks if c):
            if i > 0:
                if reply.gate is not None:
                    await w.drain()
                    while not reply.gate.is_set() and not conn.peer_closed.is_set():
                        await asyncio.sleep(0.002)
                if reply.chunk_delay:
                    await w.drain()
                    await self._sleep_or_closed(conn, reply.chunk_delay)
            w.write(b"%x\r\n%b\r\n" % (len(chunk), chunk))
            await w.drain()

    async def _sleep_or_closed(self, conn: _Conn, delay: float) -> None:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(conn.peer_closed.wait(), delay)

    @staticmethod
    async def _reset(w: asyncio.StreamWriter) -> None:
        await w.drain()
        # Let the kernel hand the last bytes to the peer before the RST discards the send queue.
        for _ in range(100):
            if w.transport.get_write_buffer_size() == 0:
                break
            await asyncio.sleep(0.001)
        await asyncio.sleep(0.01)
        sock = w.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        w.transport.abort()

    @staticmethod
    def _reason(reply: Reply) -> str:
        if reply.reason is not None:
            return reply.reason
        try:
            return http.HTTPStatus(reply.status).phrase
        except ValueError:
            return "Unknown"

    # ---- default OpenAI-shaped answers

    def _default_reply(self, rec: Recorded) -> Reply:
        if rec.header("authorization") is None:
            return _error(
                401,
                "You didn't provide an API key. You need to provide your API key in an "
                "Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY), "
                "or as the password field (with blank username) if you're accessing the API "
                "from your browser and are prompted for a username. You can obtain an API key "
                "from https://platform.openai.com/account/api-keys.",
            )
        route = (rec.method, rec.path)
        handler = _ROUTES.get(route)
        if handler is None:
            for (method, pattern), h in _PATTERN_ROUTES:
                if method == rec.method and pattern.fullmatch(rec.path):
                    handler = h
                    break
        if handler is None:
            return _error(404, f"Invalid URL ({rec.method} {rec.path})")
        try:
            return handler(self, rec)
        except (ValueError, KeyError, TypeError) as exc:
            return _error(400, f"fake upstream could not parse the request: {exc}")


def _openai_headers(content_type: str) -> list[tuple[str, str]]:
    return [
        ("x-request-id", f"req_{_hex(24)}"),
        ("openai-processing-ms", "12"),
        ("openai-organization", "org-test"),
        ("openai-version", "2020-10-01"),
        ("x-ratelimit-limit-requests", "10000"),
        ("x-ratelimit-remaining-requests", "9999"),
        ("x-ratelimit-reset-requests", "6ms"),
        ("x-ratelimit-limit-tokens", "2000000"),
        ("x-ratelimit-remaining-tokens", "1999990"),
        ("x-ratelimit-reset-tokens", "0s"),
        ("content-type", content_type),
    ]


def _json_reply(obj: Any, status: int = 200) -> Reply:
    return Reply(
        status=status,
        headers=_openai_headers("application/json"),
        body=json.dumps(obj).encode(),
    )


def _sse_reply(chunks: list[bytes]) -> Reply:
    return Reply(headers=_openai_headers("text/event-stream; charset=utf-8"), chunks=chunks)


def _error(
    status: int, message: str, type_: str = "invalid_request_error", code: Any = None
) -> Reply:
    return _json_reply(
        {"error": {"message": message, "type": type_, "param": None, "code": code}}, status
    )


def _usage(prompt: str, completion: str) -> dict[str, int]:
    p, c = len(prompt.split()) or 1, len(completion.split()) or 1
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def _chat(up: FakeUpstream, rec: Recorded) -> Reply:
    req = rec.json()
    user = _last_user_text(req["messages"])
    text = chat_reply_text(user)
    model = req.get("model", "gpt-test")
    cid, created = f"chatcmpl-{_hex()}", int(time.time())
    usage = _usage(user, text)
    if not req.get("stream"):
        return _json_reply(
            {
                "id": cid,
                "object": "chat.completion",
                "created": created,
                "model": model,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": text, "refusal": None},
                        "logprobs": None,
                        "finish_reason": "stop",
                    }
                ],
                "usage": usage,
                "system_fingerprint": "fp_test",
            }
        )
    include_usage = bool((req.get("stream_options") or {}).get("include_usage"))

    def chunk(delta: dict[str, Any], finish: str | None) -> dict[str, Any]:
        obj: dict[str, Any] = {
            "id": cid,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "system_fingerprint": "fp_test",
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
        }
        if include_usage:
            obj["usage"] = None
        return obj

    events: list[dict[str, Any] | str] = [chunk({"role": "assistant", "content": ""}, None)]
    events += [chunk({"content": piece}, None) for piece in _split_words(text)]
    events.append(chunk({}, "stop"))
    if include_usage:
        last = chunk({}, None)
        last["choices"] = []
        last["usage"] = usage
        events.append(last)
    return _sse_reply(sse(events))


def _completions(up: FakeUpstream, rec: Recorded) -> Reply:
    req = rec.json()
    prompt = req.get("prompt", "")
    prompt = prompt if isinstance(prompt, str) else " ".join(map(str, prompt))
    text = completion_text(prompt)
    model = req.get("model", "gpt-test")
    cid, created = f"cmpl-{_hex()}", int(time.time())
    usage = _usage(prompt, text)

    def obj(t: str, finish: str | None) -> dict[str, Any]:
        return {
            "id": cid,
            "object": "text_completion",
            "created": created,
            "model": model,
            "choices": [{"index": 0, "text": t, "logprobs": None, "finish_reason": finish}],
        }

    if not req.get("stream"):
        return _json_reply({**obj(text, "stop"), "usage": usage})
    events: list[dict[str, Any] | str] = [obj(p, None) for p in _split_words(text)]
    events.append(obj("", "stop"))
    if (req.get("stream_options") or {}).get("include_usage"):
        events.append({**obj("", None), "choices": [], "usage": usage})
    return _sse_reply(sse(events))


def _embeddings(up: FakeUpstream, rec: Recorded) -> Reply:
    req = rec.json()
    inputs = req["input"] if isinstance(req["input"], list) else [req["input"]]
    use_b64 = req.get("encoding_format") == "base64"
    data = []
    for i, item in enumerate(inputs):
        vec = embedding_vector(str(item))
        emb: Any = base64.b64encode(struct.pack(f"<{len(vec)}f", *vec)).decode() if use_b64 else vec
        data.append({"object": "embedding", "index": i, "embedding": emb})
    text = " ".join(map(str, inputs))
    n = len(text.split()) or 1
    return _json_reply(
        {
            "object": "list",
            "data": data,
            "model": req.get("model", "text-embedding-test"),
            "usage": {"prompt_tokens": n, "total_tokens": n},
        }
    )


def _images(up: FakeUpstream, rec: Recorded) -> Reply:
    req = rec.json()
    prompt = req["prompt"]
    items = []
    for i in range(int(req.get("n") or 1)):
        if req.get("response_format") == "b64_json":
            items.append({"b64_json": base64.b64encode(image_bytes(prompt, i)).decode()})
        else:
            items.append({"url": f"https://images.example.invalid/{_hex()}-{i}.png"})
    return _json_reply({"created": int(time.time()), "data": items})


def _audio_text(up: FakeUpstream, rec: Recorded) -> Reply:
    parts = rec.multipart()
    file = next(p for p in parts if p.name == "file")
    fmt = next((p.data.decode() for p in parts if p.name == "response_format"), "json")
    text = f"{file.filename} {len(file.data)} bytes"
    if fmt in ("text", "srt", "vtt"):
        return Reply(headers=_openai_headers("text/plain; charset=utf-8"), body=text.encode())
    return _json_reply({"text": text})


def _speech(up: FakeUpstream, rec: Recorded) -> Reply:
    req = rec.json()
    return Reply(headers=_openai_headers("audio/mpeg"), body=speech_bytes(req["input"]))


def _file_upload(up: FakeUpstream, rec: Recorded) -> Reply:
    parts = rec.multipart()
    file = next(p for p in parts if p.name == "file")
    purpose = next((p.data.decode() for p in parts if p.name == "purpose"), "assistants")
    obj = {
        "id": f"file-{_hex(24)}",
        "object": "file",
        "bytes": len(file.data),
        "created_at": int(time.time()),
        "filename": file.filename,
        "purpose": purpose,
        "status": "processed",
        "status_details": None,
    }
    with up._lock:
        up._files[obj["id"]] = (obj, file.data)
    return _json_reply(obj)


def _file_list(up: FakeUpstream, rec: Recorded) -> Reply:
    with up._lock:
        data = [obj for obj, _ in up._files.values()]
    return _json_reply({"object": "list", "data": data, "has_more": False})


def _file_lookup(
    up: FakeUpstream, rec: Recorded
) -> tuple[str, tuple[dict[str, Any], bytes] | None]:
    file_id = rec.path.split("/")[3]
    with up._lock:
        return file_id, up._files.get(file_id)


def _file_get(up: FakeUpstream, rec: Recorded) -> Reply:
    file_id, found = _file_lookup(up, rec)
    if found is None:
        return _error(404, f"No such File object: {file_id}", code=None)
    return _json_reply(found[0])


def _file_delete(up: FakeUpstream, rec: Recorded) -> Reply:
    file_id, found = _file_lookup(up, rec)
    if found is None:
        return _error(404, f"No such File object: {file_id}")
    with up._lock:
        up._files.pop(file_id, None)
    return _json_reply({"id": file_id, "object": "file", "deleted": True})


def _file_content(up: FakeUpstream, rec: Recorded) -> Reply:
    file_id, found = _file_lookup(up, rec)
    if found is None:
        return _error(404, f"No such File object: {file_id}")
    return Reply(headers=_openai_headers("application/octet-stream"), body=found[1])


MODELS = ["gpt-4o-mini", "gpt-4o", "text-embedding-3-small", "whisper-1", "tts-1", "dall-e-3"]


def _model_obj(model_id: str) -> dict[str, Any]:
    return {"id": model_id, "object": "model", "created": 1700000000, "owned_by": "system"}


def _models(up: FakeUpstream, rec: Recorded) -> Reply:
    return _json_reply({"object": "list", "data": [_model_obj(m) for m in MODELS]})


def _model(up: FakeUpstream, rec: Recorded) -> Reply:
    model_id = rec.path[len("/v1/models/") :]
    if model_id not in MODELS:
        return _error(404, f"The model '{model_id}' does not exist", code="model_not_found")
    return _json_reply(_model_obj(model_id))


def _responses_input_text(inp: Any) -> str:
    if isinstance(inp, str):
        return inp
    if isinstance(inp, list):
        return _last_user_text([m for m in inp if isinstance(m, dict)]) or "".join(
            _message_text(m.get("content")) for m in inp if isinstance(m, dict)
        )
    return ""


def _responses(up: FakeUpstream, rec: Recorded) -> Reply:
    req = rec.json()
    user = _responses_input_text(req.get("input"))
    text = chat_reply_text(user)
    rid, mid, created = f"resp_{_hex(24)}", f"msg_{_hex(24)}", int(time.time())
    u = _usage(user, text)
    usage = {
        "input_tokens": u["prompt_tokens"],
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": u["completion_tokens"],
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": u["total_tokens"],
    }
    part = {"type": "output_text", "text": text, "annotations": []}
    item = {
        "type": "message",
        "id": mid,
        "status": "completed",
        "role": "assistant",
        "content": [part],
    }

    def response(status: str, output: list[Any], use: Any) -> dict[str, Any]:
        return {
            "id": rid,
            "object": "response",
            "created_at": created,
            "status": status,
            "error": None,
            "incomplete_details": None,
            "instructions": req.get("instructions"),
            "model": req.get("model", "gpt-test"),
            "output": output,
            "parallel_tool_calls": True,
            "tool_choice": "auto",
            "tools": [],
            "usage": use,
        }

    if not req.get("stream"):
        return _json_reply(response("completed", [item], usage))
    seq = itertools.count()

    def ev(type_: str, **fields: Any) -> bytes:
        return sse_event({"type": type_, "sequence_number": next(seq), **fields}, event=type_)

    empty_item = {**item, "status": "in_progress", "content": []}
    chunks = [
        ev("response.created", response=response("in_progress", [], None)),
        ev("response.in_progress", response=response("in_progress", [], None)),
        ev("response.output_item.added", output_index=0, item=empty_item),
        ev(
            "response.content_part.added",
            item_id=mid,
            output_index=0,
            content_index=0,
            part={**part, "text": ""},
        ),
    ]
    for piece in _split_words(text):
        chunks.append(
            ev(
                "response.output_text.delta",
                item_id=mid,
                output_index=0,
                content_index=0,
                delta=piece,
                logprobs=[],
            )
        )
    chunks += [
        ev(
            "response.output_text.done",
            item_id=mid,
            output_index=0,
            content_index=0,
            text=text,
            logprobs=[],
        ),
        ev("response.content_part.done", item_id=mid, output_index=0, content_index=0, part=part),
        ev("response.output_item.done", output_index=0, item=item),
        ev("response.completed", response=response("completed", [item], usage)),
    ]
    return _sse_reply(chunks)


def _batch_create(up: FakeUpstream, rec: Recorded) -> Reply:
    req = rec.json()
    obj = {
        "id": f"batch_{_hex(24)}",
        "object": "batch",
        "endpoint": req["endpoint"],
        "errors": None,
        "input_file_id": req["input_file_id"],
        "completion_window": req["completion_window"],
        "status": "validating",
        "output_file_id": None,
        "error_file_id": None,
        "created_at": int(time.time()),
        "request_counts": {"total": 0, "completed": 0, "failed": 0},
        "metadata": req.get("metadata"),
    }
    with up._lock:
        up._batches[obj["id"]] = obj
    return _json_reply(obj)


def _batch_list(up: FakeUpstream, rec: Recorded) -> Reply:
    with up._lock:
        data = list(up._batches.values())
    return _json_reply(
        {
            "object": "list",
            "data": data,
            "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None,
            "has_more": False,
        }
    )


def _batch_get(up: FakeUpstream, rec: Recorded) -> Reply:
    batch_id = rec.path.split("/")[3]
    with up._lock:
        obj = up._batches.get(batch_id)
    return _json_reply(obj) if obj else _error(404, f"No batch found with id '{batch_id}'.")


def _billing_usage(up: FakeUpstream, rec: Recorded) -> Reply:
    return _json_reply({"object": "list", "daily_costs": [], "total_usage": 1234.5})


Handler = Callable[[FakeUpstream, Recorded], Reply]

_ROUTES: dict[tuple[str, str], Handler] = {
    ("POST", "/v1/chat/completions"): _chat,
    ("POST", "/v1/completions"): _completions,
    ("POST", "/v1/embeddings"): _embeddings,
    ("POST", "/v1/images/generations"): _images,
    ("POST", "/v1/audio/transcriptions"): _audio_text,
    ("POST", "/v1/audio/translations"): _audio_text,
    ("POST", "/v1/audio/speech"): _speech,
    ("POST", "/v1/files"): _file_upload,
    ("GET", "/v1/files"): _file_list,
    ("GET", "/v1/models"): _models,
    ("POST", "/v1/responses"): _responses,
    ("POST", "/v1/batches"): _batch_create,
    ("GET", "/v1/batches"): _batch_list,
    ("GET", "/dashboard/billing/usage"): _billing_usage,
}

_PATTERN_ROUTES: list[tuple[tuple[str, re.Pattern[str]], Handler]] = [
    (("GET", re.compile(r"/v1/files/[^/]+")), _file_get),
    (("DELETE", re.compile(r"/v1/files/[^/]+")), _file_delete),
    (("GET", re.compile(r"/v1/files/[^/]+/content")), _file_content),
    (("GET", re.compile(r"/v1/models/.+")), _model),
    (("GET", re.compile(r"/v1/batches/[^/]+")), _batch_get),
]
