"""The event log's queue: bounded while its writer thread falls behind, and every line made
from the same row the usage records get."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

from openai_forward import eventlog
from openai_forward.accounting import Account
from openai_forward.config import load
from openai_forward.eventlog import (
    Capture,
    Event,
    EventLog,
    conversation_line,
    fitting,
    json_line,
)
from openai_forward.records import UsageRow, usage_row
from openai_forward.usage import KEEP, JsonUsage, StreamUsage


def row(n: int, cache: str | None = None) -> UsageRow:
    return usage_row(
        f"req_gw_{n:020x}", time.time(), "cfg_alice", "alice", "127.0.0.1", "/",
        "/v1/chat/completions", "openai", "key-1", "gpt-4o", 200, 3, 5, 0, 0, False, False, False,
        1.5, 2.5, None, None, cache,
    )  # fmt: skip


def answered(body: bytes, answer: bytes, encoding: bytes = b"", cap: int = 1 << 20) -> Account:
    """The account of a logged chat completion whose answer came whole, as the proxy and
    the relay leave it: the observer (or a capture) fed, the usage read."""
    acct = Account("req_gw_1", "/v1/chat/completions", "/", 0.0)
    acct.body = acct.log_body = body
    acct.capture_cap = cap
    acct.on_head(200, False, encoding)
    if acct.capture is not None:
        acct.capture.keep(answer)
    assert isinstance(acct.observer, JsonUsage)
    acct.observer.feed(answer)
    acct.observer.result()
    return acct


def event(n: int, answer: bytes = b'{"choices":[]}') -> Event:
    return row(n), answered(b'{"model":"gpt-4o","messages":[]}', answer)


def written(
    tmp_path: Path, events: list[Event], access: str = "a.jsonl", **settings: int
) -> EventLog:
    """Add ``events`` to a worker's event log as it runs, then stop it (every line written)."""
    target = access if access in ("off", "stdout") else str(tmp_path / access)
    config = load({}, None, {"access_log": target, "conversation_log": str(tmp_path / "c.jsonl")})

    log = EventLog(config)
    for name, value in settings.items():
        setattr(log, name, value)

    async def run() -> None:
        for e in events:
            log.add(*e)
        await log.aclose()

    asyncio.run(run())
    return log


def read_lines(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_a_writer_that_falls_behind_drops_conversations_not_access_lines(tmp_path: Path) -> None:
    events = [event(n, b"x" * 1000) for n in range(20)]
    size = len(
        conversation_line(events[0][0], events[0][1], 1 << 20, json_line(events[0][0])) or b""
    )
    log = written(tmp_path, events, max_pending_bytes=10_000)
    kept = read_lines(tmp_path / "c.jsonl")
    # lines are made while at most 10,000 bytes of them wait: about 1.2 KB each
    assert (len(kept) - 1) * size <= 10_000 < len(kept) * size and len(kept) < 20
    assert log.dropped_conversations == 20 - len(kept) and log.dropped == 0
    assert len(read_lines(tmp_path / "a.jsonl")) == 20  # every access line still comes


def test_the_bound_applies_to_what_waits_not_to_what_was_written(tmp_path: Path) -> None:
    path = tmp_path / "c.jsonl"
    config = load({}, None, {"access_log": "off", "conversation_log": str(path)})

    async def run() -> None:
        log = EventLog(config)
        log.max_pending_bytes = 3_000
        for round_ in range(3):  # each flush starts the count again
            for n in range(2):
                log.add(*event(round_ * 2 + n, b'{"choices":[],"pad":"' + b"x" * 1000 + b'"}'))
            await log.flush()
        await log.aclose()
        assert log.dropped_conversations == 0

    asyncio.run(run())
    records = read_lines(path)
    assert len(records) == 6 and all(r["reply"]["choices"] == [] for r in records)


def test_an_access_line_is_one_json_object_with_every_field() -> None:
    line = json_line(row(1, "hit"))
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    record = json.loads(line)
    assert record["cache"] == "hit" and record["request_id"] == "req_gw_" + "0" * 19 + "1"
    assert record["stream"] is False and record["time"].endswith("Z")


def test_an_observer_keeps_for_the_log_what_a_capture_would_have_kept() -> None:
    """The usage observer keeps the pieces for the conversation log (no second call per
    piece); what the writer takes of them is exactly what ``Capture.keep`` would hold."""
    pieces = [b"a" * 300, b"b" * 300, b"c" * 300, b"d" * 300]
    for cap in (1, 299, 300, 899, 900, 1200, 5000, 20_000, 70_000):  # (the config: > 0)
        for observer in (JsonUsage(b"", cap), StreamUsage(False, max(KEEP, cap))):
            own = Capture(cap)
            for piece in pieces * 20:
                own.keep(piece)
                observer.feed(piece)
            kept = observer.kept
            assert kept is not None
            truncated = observer.seen_bytes > cap
            taken = fitting(kept, cap) if truncated else kept
            assert (taken, truncated) == (own.pieces, own.truncated), (observer, cap)


def write_batch(tmp_path: Path, access: str, events: list[Event]) -> list[dict[str, object]]:
    """The conversation log's lines of ``events``."""
    written(tmp_path, events, access)
    return read_lines(tmp_path / "c.jsonl")


def test_a_conversation_line_is_its_access_line_with_the_request_and_the_reply(
    tmp_path: Path,
) -> None:
    answer = b'{\n  "id": "chatcmpl-1",\n  "choices": [],\n  "usage": {"prompt_tokens": 3}\n}'
    # the usage observer read the answer as one object: it goes in as it came
    conv = answered(b'{"model": "gpt-4o",\r\n "messages": []}', answer)
    one = row(1)
    for access in ("off", "a.jsonl", "stdout"):
        (record,) = write_batch(tmp_path, access, [(one, conv)])
        (tmp_path / "c.jsonl").unlink()
        reply = record.pop("reply")
        request = record.pop("request")
        assert record == json.loads(json_line(one))  # every field of the access line
        assert request == {"model": "gpt-4o", "messages": []}
        assert reply == json.loads(answer)


def test_an_event_whose_line_cannot_be_made_costs_only_its_own_lines(tmp_path: Path) -> None:
    bad = row(2)
    bad["model"] = b"\xff"  # not encodable as JSON text: its lines are dropped, counted
    lines = write_batch(tmp_path, "a.jsonl", [event(1), (bad, event(2)[1]), event(3)])
    assert [r["request_id"] for r in lines] == [row(1)["request_id"], row(3)["request_id"]]
    access = (tmp_path / "a.jsonl").read_text().splitlines()
    assert [json.loads(line)["request_id"] for line in access] == [
        row(1)["request_id"],
        row(3)["request_id"],
    ]


def test_a_long_answer_is_logged_in_its_place_by_the_writer(tmp_path: Path) -> None:
    # past INLINE_ANSWER the line is made by the writer thread, not the loop: same record,
    # same order among the others
    long = b'{"choices":[],"pad":"' + b"x" * (eventlog.INLINE_ANSWER + 1) + b'"}'
    events = [event(1), event(2, long), event(3)]
    log = EventLog(load({}, None, {"access_log": "off", "conversation_log": str(tmp_path / "c")}))
    for e in events:
        log.add(*e)
    assert [type(talk) for talk in log._talks] == [bytes, tuple, bytes]

    asyncio.run(log.aclose())
    records = read_lines(tmp_path / "c")
    assert [r["request_id"] for r in records] == [e[0]["request_id"] for e in events]
    assert records[1]["reply"]["choices"] == [] and records[1]["reply"]["truncated"] is False


def test_lines_waiting_past_the_bound_lose_the_oldest(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(eventlog, "MAX_PENDING", 10)
    log = written(tmp_path, [(row(n), None) for n in range(25)])
    lines = read_lines(tmp_path / "a.jsonl")
    # each time 11 wait, the oldest one goes (a tenth of the bound)
    assert [r["request_id"] for r in lines] == [row(n)["request_id"] for n in range(15, 25)]
    assert log.dropped == 15


def test_a_console_line_is_printable_ascii_whatever_the_client_sent() -> None:
    odd = row(1)
    odd["model"] = "你好\x1b[31m\nforged 200 POST"
    odd["path"] = "/v1/é\u2028x"
    line = eventlog.console_line(odd)
    text = line.decode("ascii")  # nothing but ASCII
    assert text.endswith("\n") and text.count("\n") == 1 and text[:-1].isprintable()
    assert "model=\\u4f60\\u597d\\x1b[31m\\nforged 200 POST" in text
    assert "/v1/\\xe9\\u2028x" in text


def test_a_failing_log_warns_once_names_itself_and_counts_only_its_own_lines(
    tmp_path: Path, caplog
) -> None:
    folder = tmp_path / "gone"
    folder.mkdir()
    access, talks = folder / "a.jsonl", tmp_path / "c.jsonl"
    config = load({}, None, {"access_log": str(access), "conversation_log": str(talks)})
    log = EventLog(config)

    async def run() -> None:
        log.add(*event(1))
        await log.flush()  # both files open
        for f in folder.iterdir():  # the log and its lock file
            f.unlink()
        folder.rmdir()
        for n in range(2, 5):  # three batches the access log cannot write
            log.add(*event(n))
            await log.flush()
        folder.mkdir()
        log.add(*event(5))
        await log.flush()
        await log.aclose()

    with caplog.at_level("WARNING", logger="openai_forward"):
        asyncio.run(run())
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 2, warnings
    assert warnings[0].startswith(f"log {access}: cannot write")
    assert warnings[1] == f"log {access}: writing again (3 lines were dropped)"
    assert len(read_lines(talks)) == 5  # the conversation log lost nothing
    assert [r["request_id"] for r in read_lines(access)] == [row(5)["request_id"]]
