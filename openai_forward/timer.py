"""A timer that is moved lazily: the cheap way to keep a deadline that changes per request."""

from __future__ import annotations

import asyncio
from collections.abc import Callable


class LazyTimer:
    """Calls ``callback`` at or before the latest time asked for, with one timer handle.

    A deadline later than the pending firing keeps that firing: the callback checks the real
    deadline against its own timestamps and asks again for what is left. So a deadline that
    moves forward on every request or chunk costs an attribute write, not a cancelled and
    re-created timer.
    """

    __slots__ = ("_at", "_callback", "_handle", "_loop")

    def __init__(self, loop: asyncio.AbstractEventLoop, callback: Callable[[], None]) -> None:
        self._loop = loop
        self._callback = callback
        self._handle: asyncio.TimerHandle | None = None
        self._at = 0.0

    def ensure(self, when: float) -> None:
        """Fire at ``when`` (loop time) at the latest."""
        if self._handle is not None:
            if self._at <= when:
                return
            self._handle.cancel()
        self._at = when
        self._handle = self._loop.call_at(when, self._fire)

    def cancel(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _fire(self) -> None:
        self._handle = None
        self._callback()
