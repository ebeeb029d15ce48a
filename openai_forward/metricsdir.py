"""The metrics directory: what the supervisor does, before it forks and as workers exit.

prometheus_client picks its value class (in-memory or a per-pid mmap file) once, when
``prometheus_client.values`` is first imported, from ``PROMETHEUS_MULTIPROC_DIR``. This module
imports prometheus_client only inside functions, and ``setup`` sets the variable and then
re-picks the value class, so it works even if something imported prometheus_client earlier.
"""

from __future__ import annotations

import atexit
import glob
import os
import shutil
import tempfile
from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from prometheus_client import Metric

ENV = "PROMETHEUS_MULTIPROC_DIR"
LEGACY_ENV = "prometheus_multiproc_dir"  # still honoured by prometheus_client: never leave set


class _Setup:
    """What ``setup`` did in this process (inherited by the forked workers)."""

    directory: str | None = None
    temporary = False
    owner_pid = 0
    atexit = False


def setup(workers: int, directory: str | None = None) -> None:
    """Choose single- or multi-process metrics; call before forking any worker.

    ``workers > 1``: create ``directory`` (mode 0700) or empty the ``*.db`` files already in
    it, or with ``directory=None`` make a fresh temporary one that ``teardown`` (or else the
    exit of this process) removes; then set ``PROMETHEUS_MULTIPROC_DIR``. ``workers <= 1``:
    unset it, so values stay in memory. Raises ``ValueError`` if ``directory`` exists and is
    not a directory, ``OSError`` if it cannot be made private. Calling it again first undoes
    the previous call.
    """
    teardown()
    os.environ.pop(ENV, None)
    os.environ.pop(LEGACY_ENV, None)
    if workers > 1:
        _Setup.temporary = directory is None
        _Setup.directory = _prepare(directory)
        _Setup.owner_pid = os.getpid()
        os.environ[ENV] = _Setup.directory
        if not _Setup.atexit:  # in case the caller's own teardown never runs
            _Setup.atexit = True
            atexit.register(teardown)
    _pick_value_class()


def teardown() -> None:
    """Undo ``setup`` in the process that called it; a no-op anywhere else (forked workers
    inherit atexit handlers and must not remove the directory the others still use)."""
    if _Setup.directory is None or _Setup.owner_pid != os.getpid():
        return
    if os.environ.get(ENV) == _Setup.directory:
        del os.environ[ENV]
    if _Setup.temporary:
        shutil.rmtree(_Setup.directory, ignore_errors=True)
    _Setup.directory, _Setup.temporary, _Setup.owner_pid = None, False, 0
    _pick_value_class()


def directory() -> str | None:
    """The directory ``setup`` made for several workers (inherited across fork), else None."""
    return _Setup.directory


def worker_died(pid: int) -> None:
    """Forget the live gauges (in-flight requests and streams, key states) of a worker that
    exited; its counters and histograms stay in the sums. Call in the supervisor after
    ``waitpid`` returns ``pid``. A no-op in single-process mode."""
    if _Setup.directory is None:
        return
    from prometheus_client.multiprocess import mark_process_dead

    mark_process_dead(pid, _Setup.directory)  # type: ignore[no-untyped-call]


def _prepare(directory: str | None) -> str:
    if directory is None:
        return tempfile.mkdtemp(prefix="openai-forward-metrics-")  # mode 0700
    os.makedirs(directory, mode=0o700, exist_ok=True)
    if not os.path.isdir(directory):
        raise ValueError(f"metrics directory {directory!r} is not a directory")
    os.chmod(directory, 0o700)
    # Only our own files: a mistyped path must not lose anything else.
    for path in glob.glob(os.path.join(glob.escape(directory), "*.db")):
        os.remove(path)
    return directory


def _pick_value_class() -> None:
    from prometheus_client import values

    values.ValueClass = values.get_value_class()  # type: ignore[no-untyped-call]


class FilesCollector:
    """Every worker's values in ``directory``, merged as prometheus_client's
    MultiProcessCollector does, except that an empty file is skipped: a worker that is
    creating one (or was killed while it did) must not fail every scrape (client_python
    issue #1199)."""

    def __init__(self, directory: str) -> None:
        self._pattern = os.path.join(glob.escape(directory), "*.db")

    def collect(self) -> Iterable[Metric]:
        """The merged metrics: counters and histograms summed, gauges per their mode."""
        from prometheus_client.multiprocess import MultiProcessCollector

        files = [path for path in glob.glob(self._pattern) if _written(path)]
        merged: Iterable[Metric] = MultiProcessCollector.merge(files)  # type: ignore[no-untyped-call]
        return merged


def _written(path: str) -> bool:
    try:
        return os.path.getsize(path) > 0
    except FileNotFoundError:  # a dead worker's live gauges, removed by worker_died
        return False
