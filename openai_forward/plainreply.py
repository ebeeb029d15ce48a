"""The reply of a plain chat-completions stream, read cheaply for the conversation log.

A text answer streamed by OpenAI is dozens of chunk events that differ only in their
``content``: ``data: {"id":...,"choices":[{"index":0,"delta":{"content":"<text>"},...}]}``.
Parsing every one into objects costs about 3 µs a chunk; this module takes one chunk as a
template (parsed and checked like any other), splits the stream after every chunk that ends
like it with one ``bytes.split``, checks that the pieces are the template's bytes with another
string, and decodes all those strings with one orjson call. The chunks that differ from the
template (the first, with the role; the last ones, with the finish reason and the usage) are
parsed one by one. The result is exactly what
``conversation.ReplyAssembler`` gives for the same stream (a property test holds it to that),
or None when the stream is not plain and the assembler must read it.
"""

from __future__ import annotations

import re
from typing import Any

import orjson

PLAIN_DELTA = frozenset({"role", "content", "refusal"})
STREAM_END = b"\n\ndata: [DONE]\n\n"
_SEP = b"\n\ndata: "
_CONTENT = b'"content":"'
# OpenAI's random padding of every chunk (on by default): no part of the reply, and it
# would make every chunk end differently
_PADDING = re.compile(rb',"obfuscation":"[^"\\]*"')


class NotPlain(Exception):
    """The stream needs the assembler."""


class _Reply:
    """What the events of a plain stream say so far, folded in order."""

    __slots__ = ("finish", "model", "parts", "role", "seen", "usage")

    def __init__(self) -> None:
        self.parts: list[bytes] = []  # the contents, as JSON string bodies (still escaped)
        self.role = "assistant"
        self.finish: Any = None
        self.model: str | None = None
        self.usage: Any = None
        self.seen = False

    def event(self, obj: Any) -> str | None:
        """Fold one parsed event; return its content text (None if it has none)."""
        choices = obj.get("choices")  # AttributeError: not an object
        if "usage" in obj and type(obj["usage"]) is dict:
            self.usage = obj["usage"]
        if self.model is None and type(obj.get("model")) is str and obj["model"]:
            self.model = obj["model"]
        if obj.get("error") is not None:
            raise NotPlain
        if not choices:
            return None
        (choice,) = choices  # ValueError: more than one
        if choice.get("index", 0) != 0:
            raise NotPlain
        self.seen = True
        text = None
        delta = choice.get("delta")
        if delta:
            if delta.keys() - PLAIN_DELTA or delta.get("refusal"):
                raise NotPlain
            content = delta.get("content")
            if content and type(content) is str:
                text = content
            said = delta.get("role")
            if said and type(said) is str:
                self.role = said
        if choice.get("finish_reason") is not None:
            self.finish = choice["finish_reason"]
        return text

    def parsed(self, event: bytes) -> None:
        text = self.event(orjson.loads(event))
        if text is not None:
            self.parts.append(orjson.dumps(text)[1:-1])


def plain_chat_reply(data: bytes, cap: int = 1 << 20) -> dict[str, Any] | None:
    """The reply of a plain chat-completions stream, as ``ReplyAssembler`` would give it,
    or None when the stream is not plain (then the assembler must read it).

    Plain: ``data: {...}`` events framed with LF and a blank line, ending ``data: [DONE]``;
    every chunk with choices has one, of index 0, whose delta holds only ``role``, ``content``
    and an empty ``refusal``; no ``error``; the text within ``cap``. That is what OpenAI
    sends for a text answer."""
    if not data.startswith(b"data: ") or not data.endswith(STREAM_END):
        return None
    body = data[6 : -len(STREAM_END)]
    if body.find(b',"obfuscation":"') >= 0:
        body = _PADDING.sub(b"", body)
    reply = _Reply()
    try:
        if not _by_template(body, reply):
            reply = _Reply()
            for event in body.split(_SEP):
                reply.parsed(event)
        text = orjson.loads(b'"' + b"".join(reply.parts) + b'"')
    except (NotPlain, AttributeError, TypeError, ValueError):  # orjson's errors included
        return None  # a shape the assembler knows how to read, or not
    if (
        not reply.seen
        or (len(text) if text.isascii() else len(text.encode("utf-8", "replace"))) > cap
    ):
        return None
    message = {"role": reply.role, "content": text}
    choice = {"index": 0, "message": message, "finish_reason": reply.finish}
    return {
        "choices": [choice],
        "model": reply.model,
        "usage": reply.usage,
        "error": None,
        "truncated": False,
    }


def _by_template(body: bytes, reply: _Reply) -> bool:
    """Fold the events of ``body`` into ``reply`` by the template cut; False (``reply``
    untouched) when no template fits, and the events must be read one by one.

    The stream is split after every event ending like the template, the second event: its
    bytes after the content's string body (``tail``, the quote that ends the string and
    what follows). The pieces between the first and the last cut are then events without
    their tail; those that are the template's bytes before the content (``head``) plus a
    string body with no quote are the template with another string: that string cannot
    end sooner (no quote), nor later (``tail`` starts with the quote that ends it), so all
    but the content is the template's. The events before the first cut and after the last
    are parsed one by one."""
    second = body.find(_SEP)
    if second < 0:
        return False
    third = body.find(_SEP, second + 8)
    template = body[second + 8 : third if third >= 0 else len(body)]
    at = template.find(_CONTENT)
    if at < 0:
        return False
    start = at + len(_CONTENT)
    end = template.find(b'"', start)
    if end < 0 or template[end - 1] == 92:  # a backslash: an escaped quote, or unclear
        return False
    obj = orjson.loads(template)
    text = _Reply().event(obj)  # NotPlain: nor is the stream
    if text != orjson.loads(b'"' + template[start:end] + b'"'):
        return False  # the cut did not find the delta's content (another member's string)
    head, tail = template[:start], template[end:]
    pieces = body.split(tail + _SEP)
    if len(pieces) < 3:
        return False  # nothing to gain
    # every middle piece must be head + a string body without a quote
    size = len(head)
    middle = pieces[1:-1]
    contents = [piece[size:] for piece in middle if piece.startswith(head)]
    if len(contents) < len(middle):
        return False  # another event between the cuts: read them one by one
    joined = b"".join(contents)
    if joined.find(b'"') >= 0:
        return False  # a content with a quote: read the events one by one
    if joined.find(b"\\") >= 0:
        for content in contents:
            if content.find(b"\\", len(content) - 5) >= 0:
                # an escape near the end must be whole in its own event (else that event
                # is not JSON, and a joint decode would mend it with the next one)
                orjson.loads(b'"' + content + b'"')
    for event in (pieces[0] + tail).split(_SEP):
        reply.parsed(event)
    reply.event(obj)  # the cut events' shared effects: role, model, finish (idempotent)
    reply.parts.append(joined)
    for event in pieces[-1].split(_SEP):
        reply.parsed(event)
    return True
