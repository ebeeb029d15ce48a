"""The assistant's complete reply to one request, assembled from the response body as relayed.

Pure state, no I/O. The relay feeds a :class:`ReplyAssembler` every piece of the response
body, split anywhere, and asks for :meth:`ReplyAssembler.result` at the end. Streams are read
line by line: each ``data:`` line is one JSON chunk (what every OpenAI-compatible server
sends), so each byte is parsed once and nothing but an unfinished line is held. Non-stream
bodies (plain, gzip or deflate) are kept up to a bound and parsed once at the end.
"""

from __future__ import annotations

import zlib
from typing import Any

import orjson

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
RESPONSES = "/v1/responses"

_STEP = 65536  # inflate at most this much per call: a small compressed piece can be a bomb
# what a ReplyAssembler does with further pieces: read them, ignore them, or nothing at all
_READING, _STOPPED, _UNREADABLE = 0, 1, 2
_ENTRY = 64  # what one more choice, tool call or output index costs against the cap
_FINAL_EVENTS = frozenset({"response.completed", "response.incomplete", "response.failed"})


class _Reply:
    """What every API's reply has: model, usage, error, and the cap on assembled text."""

    __slots__ = ("cap", "error", "model", "size", "truncated", "usage")

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.size = 0
        self.truncated = False
        self.model: str | None = None
        self.usage: dict[str, Any] | None = None
        self.error: Any = None

    def keep(self, text: str) -> bool:
        """Count ``text`` against the cap; False (and truncated from now on) past it."""
        return self.room(len(text) if text.isascii() else len(text.encode("utf-8", "replace")))

    def room(self, size: int) -> bool:
        if self.truncated or self.size + size > self.cap:
            self.truncated = True
            return False
        self.size += size
        return True

    def meta(self, obj: dict[str, Any]) -> None:
        if self.model is None:
            model = obj.get("model")
            if type(model) is str and model:
                self.model = model
        usage = obj.get("usage")
        if type(usage) is dict:
            self.usage = usage
        error = obj.get("error")
        if error is not None:
            self.error = error

    def fields(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "usage": self.usage,
            "error": self.error,
            "truncated": self.truncated,
        }

    def chunk(self, obj: dict[str, Any], size: int) -> None:
        raise NotImplementedError

    def body(self, obj: dict[str, Any]) -> None:
        raise NotImplementedError

    def result(self) -> dict[str, Any]:
        raise NotImplementedError


class _Call:
    __slots__ = ("args", "id", "name", "type")

    def __init__(self) -> None:
        self.id: str | None = None
        self.type: str | None = None
        self.name: list[str] = []
        self.args: list[str] = []

    def function(self) -> dict[str, str]:
        return {"name": "".join(self.name), "arguments": "".join(self.args)}


class _Choice:
    __slots__ = ("calls", "content", "finish", "function", "reasoning", "refusal", "role", "text")

    def __init__(self) -> None:
        self.role = "assistant"
        self.content: list[str] = []
        self.text: list[str] = []
        self.refusal: list[str] = []
        self.reasoning: list[str] = []
        self.calls: dict[int, _Call] = {}
        self.function: _Call | None = None
        self.finish: Any = None

    def message(self) -> dict[str, Any]:
        extra = self.calls or self.function is not None or self.refusal
        msg: dict[str, Any] = {
            "role": self.role,
            "content": "".join(self.content) if self.content or not extra else None,
        }
        if self.refusal:
            msg["refusal"] = "".join(self.refusal)
        if self.reasoning:
            msg["reasoning_content"] = "".join(self.reasoning)
        if self.calls:
            msg["tool_calls"] = [
                {"id": call.id, "type": call.type or "function", "function": call.function()}
                for _, call in sorted(self.calls.items())
            ]
        if self.function is not None:
            msg["function_call"] = self.function.function()
        return msg


class _ChoicesReply(_Reply):
    """Chat completions (``message``) and legacy completions (``text``) by choice index."""

    __slots__ = ("chat", "choices", "given")

    def __init__(self, cap: int, chat: bool) -> None:
        super().__init__(cap)
        self.chat = chat
        self.choices: dict[int, _Choice] = {}
        self.given: list[dict[str, Any]] = []  # the choices of a non-stream body

    def chunk(self, obj: dict[str, Any], size: int) -> None:
        self.meta(obj)
        choices = obj.get("choices")
        if type(choices) is not list:
            return
        for item in choices:
            if type(item) is not dict:
                continue
            index = item.get("index", 0)
            if type(index) is not int:
                index = 0
            state = self.choices.get(index)
            if state is None:
                if self.choices and not self.room(_ENTRY):
                    continue
                state = self.choices[index] = _Choice()
            if self.chat:
                delta = item.get("delta")
                if type(delta) is dict:
                    self._delta(state, delta)
            else:
                self._append(state.text, item.get("text"))
            finish = item.get("finish_reason")
            if finish is not None:
                state.finish = finish

    def _append(self, parts: list[str], value: object) -> None:
        # keep() inlined: this runs for nearly every chunk
        if type(value) is str and value:
            size = len(value) if value.isascii() else len(value.encode("utf-8", "replace"))
            if self.truncated or self.size + size > self.cap:
                self.truncated = True
                return
            self.size += size
            parts.append(value)

    def _delta(self, state: _Choice, delta: dict[str, Any]) -> None:
        # one pass over what came: most deltas carry a single member
        for key, value in delta.items():
            if key == "content":
                self._append(state.content, value)
            elif key == "tool_calls":
                for call in value if type(value) is list else ():
                    if type(call) is dict:
                        self._call(state, call)
            elif key == "role":
                if type(value) is str and value:
                    state.role = value
            elif key == "refusal":
                self._append(state.refusal, value)
            elif key == "reasoning_content":
                self._append(state.reasoning, value)
            elif key == "function_call" and type(value) is dict:
                if state.function is None:
                    state.function = _Call()
                self._merge(state.function, value)

    def _call(self, state: _Choice, delta: dict[str, Any]) -> None:
        index = delta.get("index")
        if type(index) is not int:  # some servers omit it: a new id starts a new call
            known = {call.id for call in state.calls.values()}
            new = not state.calls or (delta.get("id") and delta.get("id") not in known)
            index = len(state.calls) if new else max(state.calls)
        call = state.calls.get(index)
        if call is None:
            if state.calls and not self.room(_ENTRY):
                return
            call = state.calls[index] = _Call()
        kind = delta.get("type")
        if call.type is None and type(kind) is str:
            call.type = kind
        function = delta.get("function")
        if type(function) is dict:
            self._merge(call, function)
        ident = delta.get("id")
        if call.id is None and type(ident) is str and ident and self.keep(ident):
            call.id = ident  # the first id wins: some servers repeat it on every chunk

    def _merge(self, call: _Call, function: dict[str, Any]) -> None:
        self._append(call.name, function.get("name"))
        self._append(call.args, function.get("arguments"))

    def body(self, obj: dict[str, Any]) -> None:
        self.meta(obj)
        choices = obj.get("choices")
        for position, item in enumerate(choices if type(choices) is list else ()):
            if type(item) is dict:
                key = "message" if self.chat else "text"
                self.given.append(
                    {
                        "index": item.get("index", position),
                        key: item.get(key),
                        "finish_reason": item.get("finish_reason"),
                    }
                )

    def result(self) -> dict[str, Any]:
        choices = self.given or [
            {
                "index": index,
                **({"message": state.message()} if self.chat else {"text": "".join(state.text)}),
                "finish_reason": state.finish,
            }
            for index, state in sorted(self.choices.items())
        ]
        return {"choices": choices, **self.fields()}


class _ResponsesReply(_Reply):
    """The Responses API: the final response's ``output``, else what the events built."""

    __slots__ = ("final", "items", "status", "texts")

    def __init__(self, cap: int) -> None:
        super().__init__(cap)
        self.final: list[Any] | None = None
        self.status: Any = None
        self.items: dict[int, Any] = {}  # output_index -> a finished output item
        self.texts: dict[int, list[str]] = {}  # output_index -> text deltas

    def chunk(self, obj: dict[str, Any], size: int) -> None:
        kind = obj.get("type")
        index = obj.get("output_index")
        if kind == "response.output_text.delta":
            delta = obj.get("delta")
            if type(index) is int and type(delta) is str and delta and self.keep(delta):
                parts = self.texts.get(index)
                if parts is None and (not self.texts or self.room(_ENTRY)):
                    parts = self.texts[index] = []
                if parts is not None:
                    parts.append(delta)
        elif kind == "response.output_item.done":
            if type(index) is int and index not in self.items and self.room(size):
                self.items[index] = obj.get("item")
        elif kind == "error":
            self.error = {k: v for k, v in obj.items() if k != "type"}
        else:
            response = obj.get("response")
            if type(response) is dict:
                self.body(response)
                if kind in _FINAL_EVENTS and type(response.get("output")) is list:
                    # the whole output at once: what the deltas built is no longer needed
                    self.texts.clear()
                    self.items.clear()
                    self.size = size
                    self.truncated = False

    def body(self, obj: dict[str, Any]) -> None:
        self.meta(obj)
        output = obj.get("output")
        if type(output) is list and (output or self.final is None):
            self.final = output
        status = obj.get("status")
        if status is not None:
            self.status = status

    def result(self) -> dict[str, Any]:
        output = self.final
        if output is None or (not output and (self.items or self.texts)):
            output = [
                self.items[index] if index in self.items else _message(self.texts[index])
                for index in sorted(self.items.keys() | self.texts.keys())
            ]
        return {"output": output, "status": self.status, **self.fields()}


def _message(parts: list[str]) -> dict[str, Any]:
    return {
        "type": "message",
        "role": "assistant",
        "content": [{"type": "output_text", "text": "".join(parts)}],
    }


class ReplyAssembler:
    """Observer of one response body: ``feed`` every piece as relayed, then ``result``.

    ``path`` is the canonical request path: ``/v1/chat/completions``, ``/v1/completions`` or
    ``/v1/responses`` (any other path assembles nothing). ``stream`` says the body is a
    ``text/event-stream``. ``encoding`` is its Content-Encoding: b"", b"identity", b"gzip" or
    b"deflate" (zlib or raw); another one makes ``result`` None.

    Memory is bounded by ``cap``: once the assembled text would pass ``cap`` bytes (UTF-8),
    or a stream line longer than ``2 * cap + 64 KiB`` (room for JSON escapes and chunk
    fields) had to be skipped, no more text is appended and the reply is marked
    ``truncated``: its text is then a prefix of the reply (finish reasons, usage and the
    Responses API's final output are still read). A non-stream body is kept up to the same
    ``2 * cap + 64 KiB`` decoded bytes; past that the reply is empty and truncated. A
    compressed stream is read up to ``max(64 MiB, 4 * cap)`` inflated bytes.

    Neither method raises on malformed input: a malformed chunk is skipped, a malformed
    non-stream body gives None.
    """

    __slots__ = (
        "_body",
        "_body_len",
        "_bound",
        "_decoded",
        "_inflate",
        "_limit",
        "_partial",
        "_partial_len",
        "_raw_deflate",
        "_reply",
        "_skipping",
        "_state",
        "_stream",
    )

    def __init__(self, path: str, stream: bool, encoding: bytes = b"", cap: int = 1 << 20) -> None:
        path = path.split("?", 1)[0]
        self._reply: _Reply | None = None
        if path in (CHAT, COMPLETIONS):
            self._reply = _ChoicesReply(cap, chat=path == CHAT)
        elif path == RESPONSES:
            self._reply = _ResponsesReply(cap)
        self._stream = stream
        name = encoding.strip().lower()
        known = name in (b"", b"identity", b"gzip", b"deflate")
        self._state = _READING if self._reply is not None and known else _UNREADABLE
        self._raw_deflate = name == b"deflate"  # the window is chosen from the first byte
        self._inflate = zlib.decompressobj(16 + zlib.MAX_WBITS) if name == b"gzip" else None
        self._decoded = 0
        # a line or body may exceed the text it carries: JSON escapes and chunk fields
        self._bound = 2 * cap + 65536
        self._limit = self._bound if not stream else max(64 << 20, 4 * cap)  # inflated bytes
        self._body: list[bytes] = []
        self._body_len = 0
        self._partial: list[bytes] = []
        self._partial_len = 0
        self._skipping = False

    def feed(self, data: bytes) -> None:
        """Take the next piece of the body exactly as received (still encoded)."""
        if self._state or not data:
            return
        if self._raw_deflate:
            self._raw_deflate = False
            first = data[0]
            zlib_header = first & 0x0F == 8 and first >> 4 <= 7
            self._inflate = zlib.decompressobj(zlib.MAX_WBITS if zlib_header else -zlib.MAX_WBITS)
        if self._inflate is None:
            self._take(data)
            return
        try:
            self._inflate_piece(self._inflate, data)
        except zlib.error:
            self._stop(_UNREADABLE if not self._stream else _STOPPED)

    def _inflate_piece(self, inflate: zlib._Decompress, data: bytes) -> None:
        out = inflate.decompress(data, _STEP)
        while True:
            self._decoded += len(out)
            if self._decoded > self._limit:
                self._stop(_STOPPED)
                return
            if out:
                self._take(out)
            if not inflate.unconsumed_tail or self._state:
                return
            out = inflate.decompress(inflate.unconsumed_tail, _STEP)

    def _stop(self, state: int) -> None:
        """Read no further: a stream keeps what it had; a body becomes empty (too large)
        or unreadable (corrupt)."""
        assert self._reply is not None
        self._reply.truncated = True
        self._state = state
        self._partial.clear()
        self._body.clear()

    def _take(self, data: bytes) -> None:
        if not self._stream:
            self._body_len += len(data)
            if self._body_len > self._bound:
                self._stop(_STOPPED)
            else:
                self._body.append(data)
            return
        if self._partial or self._skipping:
            start = self._finish_line(data)
            if start < 0:
                return
        elif (  # the common piece, one whole event "data: {...}\n\n", skips the line split
            data.startswith(b"data:")
            and data.endswith(b"\n\n")
            and data.find(b"\n") == len(data) - 2
            and data.find(b"\r") < 0
        ):
            self._line(data[:-2])
            return
        else:
            start = 0
        last = max(data.rfind(b"\n", start), data.rfind(b"\r", start))
        if last >= start:
            whole = data if start == 0 and last == len(data) - 1 else data[start : last + 1]
            for line in whole.splitlines():
                if line.startswith(b"data:"):  # not blank lines, comments, event:, id:
                    self._line(line)
            start = last + 1
        if start < len(data):
            self._hold(data[start:] if start else data)

    def _finish_line(self, data: bytes) -> int:
        """End the held line with ``data`` if it has a line break: where the rest of
        ``data`` starts, or -1 when the line goes on."""
        lf = data.find(b"\n")
        cr = data.find(b"\r")
        eol = lf if cr < 0 or 0 <= lf < cr else cr
        if eol < 0:
            self._hold(data)
            return -1
        if not self._skipping:
            self._partial.append(data[:eol])
            self._line(b"".join(self._partial))
        self._partial.clear()
        self._partial_len = 0
        self._skipping = False
        return eol + 1

    def _hold(self, piece: bytes) -> None:
        assert self._reply is not None
        if self._skipping:
            return
        self._partial_len += len(piece)
        if self._partial_len > self._bound:
            self._reply.truncated = True  # a line this long is skipped, not buffered
            self._skipping = True
            self._partial.clear()
            return
        self._partial.append(piece)

    def _line(self, line: bytes) -> None:
        if not line.startswith(b"data:"):
            return
        reply = self._reply
        assert reply is not None
        if len(line) > self._bound:
            reply.truncated = True
            return
        try:
            obj = orjson.loads(line[5:])
        except orjson.JSONDecodeError:
            return  # [DONE], or a malformed chunk
        if type(obj) is dict:
            reply.chunk(obj, len(line))

    def result(self) -> dict[str, Any] | None:
        """The reply assembled so far (call at the end of the body), or None when nothing
        could be read: another path, an unsupported encoding, a non-stream body that is not
        a JSON object, or a compressed body that does not inflate.

        Every shape carries ``model`` (the first seen), ``usage`` (the upstream's usage
        object as sent, else None), ``error`` (an upstream error object sent in place of or
        inside the reply, else None) and ``truncated``. Besides them:

        * chat: ``choices``: ``[{"index", "message", "finish_reason"}]``; a streamed message
          is ``{"role", "content"}`` plus, when they came, ``refusal``,
          ``reasoning_content``, ``tool_calls`` (``[{"id", "type", "function": {"name",
          "arguments"}}]``) and ``function_call``; a non-stream message is as sent.
        * completions: ``choices``: ``[{"index", "text", "finish_reason"}]``.
        * responses: ``output`` (the response's output items: from the final
          ``response.completed``/``incomplete``/``failed`` event if it came, else the
          finished items and text deltas seen, as assistant ``message`` items) and
          ``status``.
        """
        reply = self._reply
        if reply is None or self._state == _UNREADABLE:
            return None
        if self._stream:
            if self._partial and not self._skipping:
                self._line(b"".join(self._partial))  # the last line had no terminator
                self._partial.clear()
                self._partial_len = 0
        elif self._state == _READING:
            try:
                obj = orjson.loads(b"".join(self._body))
            except orjson.JSONDecodeError:
                obj = None
            if type(obj) is not dict:
                self._state = _UNREADABLE
                return None
            self._body.clear()
            self._state = _STOPPED  # parsed: a second call gives the same reply
            reply.body(obj)
        return reply.result()
