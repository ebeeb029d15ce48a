"""Errors the gateway makes itself, rendered in OpenAI's envelope in one place."""

from __future__ import annotations

import json
import os
from http import HTTPStatus


def new_request_id() -> str:
    """An id for a response the gateway makes itself (upstream responses carry their own)."""
    return "req_gw_" + os.urandom(12).hex()


class GatewayError(Exception):
    """A request ends here with an OpenAI-shaped error.

    ``should_retry`` becomes the ``x-should-retry`` header when not None: the openai SDKs
    retry 408/409/429/5xx unless told not to.
    """

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        type: str | None = None,
        param: str | None = None,
        should_retry: bool | None = None,
        headers: tuple[tuple[bytes, bytes], ...] = (),
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.type = type or ("server_error" if status >= 500 else "invalid_request_error")
        self.param = param
        if should_retry is None and 400 <= status < 500 and status not in (408, 409, 429):
            should_retry = False
        self.should_retry = should_retry
        self.headers = headers

    def body(self) -> bytes:
        payload = {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }
        return json.dumps(payload, separators=(",", ":")).encode()

    def sse_event(self) -> bytes:
        """The error as a final server-sent event: the SDKs raise on a ``data:`` with an error."""
        return b"data: " + self.body() + b"\n\n"

    def response(self, request_id: str, *, close: bool = False, head_only: bool = False) -> bytes:
        """The complete HTTP/1.1 response, head and body."""
        body = self.body()
        reason = HTTPStatus(self.status).phrase if self.status in _KNOWN else "Error"
        lines = [
            f"HTTP/1.1 {self.status} {reason}".encode(),
            b"content-type: application/json",
            b"content-length: %d" % len(body),
            b"x-request-id: " + request_id.encode(),
        ]
        if self.should_retry is not None:
            lines.append(b"x-should-retry: " + (b"true" if self.should_retry else b"false"))
        lines.extend(name + b": " + value for name, value in self.headers)
        if close:
            lines.append(b"connection: close")
        head = b"\r\n".join(lines) + b"\r\n\r\n"
        return head if head_only else head + body


_KNOWN = frozenset(s.value for s in HTTPStatus)


def bad_request(message: str, code: str = "invalid_request") -> GatewayError:
    return GatewayError(400, code, message)


def upstream_connect_error() -> GatewayError:
    return GatewayError(
        502, "upstream_connect_error", "The gateway could not connect to the upstream service."
    )


def upstream_protocol_error() -> GatewayError:
    return GatewayError(
        502, "upstream_protocol_error", "The upstream service sent an invalid HTTP response."
    )


def upstream_timeout(retry: bool) -> GatewayError:
    return GatewayError(
        504,
        "upstream_timeout",
        "The upstream service did not answer in time.",
        should_retry=retry,
    )


def upstream_disconnected() -> GatewayError:
    return GatewayError(
        502, "upstream_disconnected", "The upstream service closed the connection mid-response."
    )


def stream_stalled() -> GatewayError:
    return GatewayError(
        504, "upstream_timeout", "The upstream service stopped sending in the middle of a response."
    )
