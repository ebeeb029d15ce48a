"""Tests of the JSON-lines log sinks (openai_forward.logfile) on real files and processes.

What a user notices: with several workers writing one log that rotates, every line is in
exactly one file, whole; old files go when their time is up; nobody else can read them.
"""

from __future__ import annotations

import itertools
import json
import multiprocessing
import os
import stat
import threading
import time
from pathlib import Path

import pytest

from openai_forward.logfile import LineFile, StdoutLines, rotated_paths


def line(**fields: object) -> bytes:
    return json.dumps(fields).encode() + b"\n"


def read_lines(path: Path) -> list[bytes]:
    return [ln for name in rotated_paths(str(path)) for ln in Path(name).read_bytes().splitlines()]


def _writer(path: str, worker: int, count: int, start: threading.Barrier) -> None:
    sink = LineFile(path, max_bytes=4096, backups=10_000)
    start.wait(timeout=30)
    batch: list[bytes] = []
    size = 1
    for seq in range(count):
        batch.append(line(worker=worker, seq=seq, pad="x" * (seq % 50)))
        if len(batch) >= size:  # batches of varying size, as the writer thread makes
            sink.write(batch)
            batch = []
            size = 1 + (size * 7 + worker) % 37
    sink.write(batch)
    sink.close()


def test_two_processes_rotating_one_file_keep_every_line_once_and_whole(tmp_path):
    path = tmp_path / "access.jsonl"
    context = multiprocessing.get_context("fork")
    start = context.Barrier(2)
    workers = [context.Process(target=_writer, args=(str(path), w, 10_000, start)) for w in (1, 2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=50)
        assert worker.exitcode == 0
    names = rotated_paths(str(path))
    assert len(names) > 100  # it did rotate, many times, with both writing
    seen: dict[int, list[int]] = {1: [], 2: []}
    shared = 0  # files holding lines of both: the two really wrote at the same time
    for name in names:
        data = Path(name).read_bytes()
        shared += b'"worker": 1' in data and b'"worker": 2' in data
        assert data.endswith(b"\n")
        assert len(data) <= 4096 or data.count(b"\n") <= 37  # only one batch may overflow
        for raw in data.splitlines():
            record = json.loads(raw)  # never a line split across files or interleaved
            assert record["pad"] == "x" * (record["seq"] % 50)
            seen[record["worker"]].append(record["seq"])
    for worker in (1, 2):
        assert seen[worker] == list(range(10_000))  # each once, and in order
    assert shared > 10


def test_files_are_private_to_the_owner(tmp_path):
    path = tmp_path / "conv.jsonl"
    old = os.umask(0o022)
    try:
        with LineFile(str(path), max_bytes=100) as sink:
            sink.write([line(n=1, pad="p" * 80)])
            sink.write([line(n=2, pad="p" * 80)])  # rotates
    finally:
        os.umask(old)
    for name in (path, Path(f"{path}.1"), Path(f"{path}.lock")):
        assert stat.S_IMODE(name.stat().st_mode) == 0o600


def test_rotation_keeps_the_configured_number_of_backups_newest_last(tmp_path):
    path = tmp_path / "a.jsonl"
    Path(f"{path}.9").write_bytes(b"left by a larger backups setting\n")
    with LineFile(str(path), max_bytes=30, backups=2) as sink:
        for n in range(10):
            sink.write([line(n=n, p="yyyyyyyyyy")])
    assert rotated_paths(str(path)) == [f"{path}.2", f"{path}.1", str(path)]
    assert [json.loads(raw)["n"] for raw in read_lines(path)] == [7, 8, 9]


def test_no_backups_keeps_only_the_current_file(tmp_path):
    path = tmp_path / "a.jsonl"
    with LineFile(str(path), max_bytes=30, backups=0) as sink:
        for n in range(5):
            sink.write([line(n=n, p="yyyyyyyyyy")])
    assert rotated_paths(str(path)) == [str(path)]
    assert [json.loads(raw)["n"] for raw in read_lines(path)] == [4]


def test_a_writer_follows_a_rotation_made_by_another(tmp_path):
    path = tmp_path / "a.jsonl"
    with LineFile(str(path), max_bytes=60) as first, LineFile(str(path), max_bytes=60) as second:
        first.write([line(by="first", n=0)])
        second.write([line(by="second", n=0)])
        first.write([line(by="first", n=1)])  # rotates: the two lines above go to a.jsonl.1
        second.write([line(by="second", n=1)])  # must land in the new a.jsonl, not in .1
    assert Path(f"{path}.1").read_bytes().count(b"\n") == 2
    assert [json.loads(raw)["by"] for raw in path.read_bytes().splitlines()] == [
        "first",
        "second",
    ]


def test_a_file_moved_away_by_logrotate_is_reopened(tmp_path):
    path = tmp_path / "a.jsonl"
    with LineFile(str(path)) as sink:
        sink.write([line(n=1)])
        os.rename(path, tmp_path / "a.jsonl-20260101")
        sink.write([line(n=2)])
    assert path.read_bytes() == line(n=2)


def test_a_line_left_unfinished_is_ended_before_the_next_batch(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_bytes(line(n=0) + b'{"n": 1, "cut sh')  # a writer died mid-line
    with LineFile(str(path)) as sink:
        sink.write([line(n=2)])
    lines = path.read_bytes().splitlines()
    assert lines[0] == line(n=0).rstrip() and lines[2] == line(n=2).rstrip()
    with pytest.raises(ValueError):
        json.loads(lines[1])


def test_rotated_files_past_retention_are_deleted(tmp_path):
    path = tmp_path / "a.jsonl"
    day = 86400
    now = time.time()
    for number, age in ((1, 0.5 * day), (2, 3 * day), (3, 10 * day)):
        name = Path(f"{path}.{number}")
        name.write_bytes(line(n=number))
        os.utime(name, (now - age, now - age))
    path.write_bytes(line(n=0))
    os.utime(path, (now - 10 * day, now - 10 * day))  # the live file is never swept
    with LineFile(str(path), retention_days=2) as sink:
        sink.write([line(n=4)])  # the first write checks retention
        assert rotated_paths(str(path)) == [f"{path}.1", str(path)]
        name = Path(f"{path}.1")
        os.utime(name, (now - 3 * day, now - 3 * day))
        sink.write([line(n=5)])  # within the hour: not checked again
        assert name.exists()
    with LineFile(str(path), max_bytes=10, retention_days=2) as sink:
        sink.write([line(n=6)])  # rotation checks it: .1 (now .2) is past retention
    assert rotated_paths(str(path)) == [f"{path}.1", str(path)]


def test_writing_after_close_raises_oserror(tmp_path):
    sink = LineFile(str(tmp_path / "a.jsonl"))
    sink.close()
    sink.close()
    with pytest.raises(OSError):
        sink.write([line(n=1)])


def test_stdout_lines_reach_a_nonblocking_pipe_whole_and_in_order():
    read_end, write_end = os.pipe()
    os.set_blocking(write_end, False)
    received = bytearray()

    def drain() -> None:
        while chunk := os.read(read_end, 65536):
            received.extend(chunk)

    reader = threading.Thread(target=drain)
    reader.start()
    try:
        lines = [line(n=n, pad="z" * (n % 300)) for n in range(5000)]
        sink = StdoutLines(write_end)
        sink.write(lines[:10])
        sink.write(lines[10:])
        sink.close()
    finally:
        os.close(write_end)
        reader.join(timeout=30)
        os.close(read_end)
    assert bytes(received) == b"".join(lines)


def test_stdout_lines_go_in_pieces_of_at_most_pipe_buf_cut_at_line_ends():
    """Several workers may share one pipe: a write of at most PIPE_BUF bytes is never
    interleaved with another writer's, so no line up to that size is ever split."""
    pieces: list[bytes] = []

    class Recorded(StdoutLines):
        def _write(self, data: bytes) -> None:
            pieces.append(data)

    lines = [line(n=n, pad="q" * (n * 37 % 900)) for n in range(400)]
    lines.insert(200, line(n=-1, pad="L" * 9000))  # longer than PIPE_BUF: goes alone
    Recorded().write(lines)
    assert b"".join(pieces) == b"".join(lines)
    assert all(piece.endswith(b"\n") for piece in pieces)
    assert [p for p in pieces if len(p) > 4096] == [lines[200]]
    # each piece is as full as it can be: the next piece's first line would not have fit
    for piece, after in itertools.pairwise(pieces):
        assert len(piece) + after.index(b"\n") + 1 > 4096
