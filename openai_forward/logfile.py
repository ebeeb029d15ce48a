"""JSON-lines sinks for the access log and the conversation log.

:class:`LineFile` appends batches of lines to one file that several worker processes share,
and rotates it by size (``path`` -> ``path.1`` -> ... ``path.N``), safely across them: every
append and every rotation happens under an ``fcntl.lockf`` lock on ``path + ".lock"``, so a
line is never split across files, lost to a rename, or interleaved with another process's.
:class:`StdoutLines` writes the same batches to standard output. Both are called from one
background writer thread per process, never from the event loop: they block on the disk.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import select
import time

MiB = 1 << 20
_SWEEP_EVERY = 3600.0  # seconds between retention checks outside rotation
_PIPE_BUF = 4096  # POSIX: a pipe write of at most this many bytes is never interleaved


def rotated_paths(path: str) -> list[str]:
    """The log files of ``path`` that exist, oldest first: ``path.N`` ... ``path.1``, ``path``.

    Numbers need not be contiguous (retention may have removed some)."""
    out = [name for _, name in sorted(_rotated(path).items(), reverse=True)]
    if os.path.exists(path):
        out.append(path)
    return out


def _rotated(path: str) -> dict[int, str]:
    """The rotated files of ``path`` by number."""
    folder, base = os.path.split(path)
    pattern = re.compile(re.escape(base) + r"\.([1-9][0-9]*)")
    try:
        names = os.listdir(folder or ".")
    except OSError:
        return {}
    found = {}
    for name in names:
        match = pattern.fullmatch(name)
        if match:
            found[int(match.group(1))] = os.path.join(folder, name)
    return found


class LineFile:
    """A JSON-lines file shared by worker processes, rotated by size, pruned by age.

    ``max_bytes``: a batch that would take the file past this size first rotates it (a
    single batch larger than this still goes whole into a fresh file). ``backups``: rotated
    files kept (``path.1`` newest); 0 keeps none. ``retention_days``: rotated files last
    written longer ago than this are deleted, at rotation and at most hourly otherwise.
    ``fsync``: flush every batch to the disk before ``write`` returns.

    The file and its lock file are created with mode 0600. Raises OSError if the file cannot
    be opened.
    """

    def __init__(
        self,
        path: str,
        max_bytes: int = 100 * MiB,
        backups: int = 10,
        retention_days: float | None = None,
        fsync: bool = False,
    ) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.backups = max(0, backups)
        self.retention = None if retention_days is None else retention_days * 86400.0
        self.fsync = fsync
        self._lock = os.open(path + ".lock", os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self._fd = -1
        self._ino = -1
        self._next_sweep = 0.0
        self._open()

    def _open(self) -> None:
        # the new file first: if it cannot be opened (its directory is gone), the old one
        # stays in use and the next write tries again
        flags = os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC  # read: the last byte
        fd = os.open(self.path, flags, 0o600)
        if self._fd >= 0:
            os.close(self._fd)
        self._fd = fd
        self._ino = os.fstat(fd).st_ino

    def write(self, lines: list[bytes]) -> None:
        """Append ``lines`` (each ending with b"\\n") in one write, rotating first if due.

        Raises OSError (disk full...). A line left unfinished by a failed write, or by a
        process that died while writing, is ended before the next batch, so every batch
        starts on a line of its own.
        """
        if not lines:
            return
        if self._fd < 0:
            raise OSError(errno.EBADF, "log file closed", self.path)
        data = b"".join(lines)
        fcntl.lockf(self._lock, fcntl.LOCK_EX)
        try:
            self._follow()  # may raise (the directory is gone): this batch is not written
            size = os.fstat(self._fd).st_size
            if size and size + len(data) > self.max_bytes:
                self._rotate()
            else:
                if size and os.pread(self._fd, 1, size - 1) != b"\n":
                    # a writer died or hit a full disk mid-line: end its fragment there
                    data = b"\n" + data
                if self.retention is not None and time.monotonic() >= self._next_sweep:
                    self._sweep()
            _write_all(self._fd, data)
        finally:
            fcntl.lockf(self._lock, fcntl.LOCK_UN)
        if self.fsync:
            os.fsync(self._fd)

    def _follow(self) -> None:
        """Reopen when another process (or logrotate) moved the file away."""
        try:
            current = os.stat(self.path).st_ino
        except FileNotFoundError:
            current = -1
        if current != self._ino:
            self._open()

    def _rotate(self) -> None:
        # highest number first, so no rename lands on a file not yet moved; numbers past
        # ``backups`` (the oldest, or left by a larger setting before) are deleted
        for number, name in sorted(_rotated(self.path).items(), reverse=True):
            if number >= self.backups:
                os.unlink(name)
            else:
                os.replace(name, f"{self.path}.{number + 1}")
        if self.backups:
            os.replace(self.path, self.path + ".1")
        else:
            os.unlink(self.path)
        self._open()
        if self.retention is not None:
            self._sweep()

    def _sweep(self) -> None:
        """Delete rotated files older than the retention (called under the lock)."""
        assert self.retention is not None
        self._next_sweep = time.monotonic() + _SWEEP_EVERY
        oldest = time.time() - self.retention
        for name in _rotated(self.path).values():
            try:
                if os.stat(name).st_mtime < oldest:
                    os.unlink(name)
            except FileNotFoundError:
                pass

    def close(self) -> None:
        """Close the file; further writes raise OSError. Idempotent."""
        for fd in (self._fd, self._lock):
            if fd >= 0:
                os.close(fd)
        self._fd = self._lock = -1

    def __enter__(self) -> LineFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:  # a short write (signal, full disk) goes on where it stopped
        view = view[os.write(fd, view) :]


class StdoutLines:
    """Batches of lines to standard output (``access_log: stdout``, for container logs).

    Lines are grouped into writes of at most PIPE_BUF bytes, so that when several worker
    processes share one pipe a line up to that size is never interleaved with another's.
    A non-blocking stdout is waited on, not given up on.
    """

    def __init__(self, fd: int = 1) -> None:
        self._fd = fd

    def write(self, lines: list[bytes]) -> None:
        """Write ``lines`` (each ending with b"\\n"). Raises OSError (closed stdout)."""
        batch: list[bytes] = []
        size = 0
        for line in lines:
            if batch and size + len(line) > _PIPE_BUF:
                self._write(b"".join(batch))
                batch.clear()
                size = 0
            batch.append(line)
            size += len(line)
        if batch:
            self._write(b"".join(batch))

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                view = view[os.write(self._fd, view) :]
            except BlockingIOError:
                select.select([], [self._fd], [])

    def close(self) -> None:
        """Nothing to release: standard output stays open."""
