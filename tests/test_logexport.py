"""Tests of fine-tuning export from the conversation log (openai_forward.logexport).

What a user notices: `logs export` turns logged chat completions, tool calls included, into
a file OpenAI's fine-tuning accepts; filters pick the right records; a damaged log line is
skipped, not fatal; rotated files are read too, each once, oldest first.
"""

from __future__ import annotations

import gzip
import io
import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import orjson
import pytest

from openai_forward.conversation import CHAT, ReplyAssembler
from openai_forward.logexport import ExportStats, export, parse_time
from openai_forward.logfile import LineFile

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather in a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    }
]

REQUEST = {
    "model": "gpt-4o",
    "stream": True,
    "stream_options": {"include_usage": True},
    "temperature": 0.2,
    "tools": TOOLS,
    "parallel_tool_calls": True,
    "messages": [
        {"role": "developer", "content": "You are terse."},
        {"role": "user", "content": [{"type": "text", "text": "Weather in Paris and Rome?"}]},
        {
            "role": "assistant",
            "content": None,
            "audio": None,
            "reasoning_content": "two cities",
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "18C, clear"},
        {"role": "user", "content": "And Rome?", "name": "ana"},
    ],
}


def sse(obj: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


def recorded_reply() -> dict[str, Any]:
    """The reply as the gateway would log it: a real stream through ReplyAssembler."""
    chunks = [
        {"role": "assistant", "content": None},
        {
            "tool_calls": [
                {
                    "index": 0,
                    "id": "call_2",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": ""},
                }
            ]
        },
        {"tool_calls": [{"index": 0, "function": {"arguments": '{"city"'}}]},
        {"tool_calls": [{"index": 0, "function": {"arguments": ': "Rome"}'}}]},
    ]
    assembler = ReplyAssembler(CHAT, True)
    for delta in chunks:
        assembler.feed(
            sse(
                {
                    "model": "gpt-4o-2024-08-06",
                    "choices": [{"index": 0, "delta": delta, "finish_reason": None}],
                }
            )
        )
    assembler.feed(
        sse(
            {
                "model": "gpt-4o-2024-08-06",
                "choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}],
            }
        )
    )
    assembler.feed(b"data: [DONE]\n\n")
    reply = assembler.result()
    assert reply is not None
    return reply


def at(seconds: float) -> str:
    """A moment as the access log (and so the conversation log) writes it."""
    return datetime.fromtimestamp(seconds, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def record(ts: float = 1_760_000_000.0, **overrides: Any) -> dict[str, Any]:
    """A conversation log line as the gateway writes it: the access line's fields, then the
    request and the reply."""
    base = {
        "time": at(ts),
        "request_id": "req-1",
        "client_ip": "127.0.0.1",
        "method": "POST",
        "path": CHAT,
        "route": "/",
        "status": 200,
        "key_id": "k1",
        "key_name": "team-a",
        "upstream": "openai",
        "model": "gpt-4o-2024-08-06",
        "prompt_tokens": 50,
        "completion_tokens": 9,
        "error_code": None,
        "request": REQUEST,
        "reply": recorded_reply(),
    }
    return {**base, **overrides}


def write_log(path: Path, records: list[dict[str, Any]], tail: bytes = b"") -> None:
    with LineFile(str(path)) as sink:
        sink.write([orjson.dumps(r) + b"\n" for r in records])
    with path.open("ab") as file:
        file.write(tail)


def run(paths: list[Path], fmt: str = "openai-chat", **filters: Any) -> tuple[list[Any], Any]:
    out = io.StringIO()
    stats = ExportStats()
    options = {"since": None, "until": None, "key": None, "model": None, **filters}
    count = export([str(p) for p in paths], out, fmt, **options, stats=stats)
    lines = out.getvalue().splitlines()
    assert count == len(lines) == stats.written
    return [json.loads(line) for line in lines], stats


def test_a_chat_with_tool_calls_exports_in_the_fine_tuning_shape(tmp_path):
    log = tmp_path / "conversations.jsonl"
    write_log(log, [record()])
    (example,), _ = run([log])
    assert example == {
        "messages": [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": [{"type": "text", "text": "Weather in Paris and Rome?"}]},
            {
                "role": "assistant",
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                    }
                ],
            },
            {"role": "tool", "content": "18C, clear", "tool_call_id": "call_1"},
            {"role": "user", "content": "And Rome?", "name": "ana"},
            {
                "role": "assistant",
                "tool_calls": [
                    {
                        "id": "call_2",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'},
                    }
                ],
            },
        ],
        "tools": TOOLS,
        "parallel_tool_calls": True,
    }
    for call in example["messages"][-1]["tool_calls"]:  # arguments are JSON text
        assert isinstance(json.loads(call["function"]["arguments"]), dict)


def test_a_plain_answer_keeps_only_the_fields_fine_tuning_takes(tmp_path):
    reply = {
        "choices": [
            {
                "index": 1,
                "message": {"role": "assistant", "content": "other"},
                "finish_reason": "stop",
            },
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": "Hi!",
                    "refusal": None,
                    "annotations": [],
                    "audio": None,
                },
                "finish_reason": "stop",
            },
        ],
        "model": "m",
        "usage": None,
        "error": None,
        "truncated": False,
    }
    request = {"model": "m", "n": 2, "messages": [{"role": "user", "content": "Hello"}]}
    log = tmp_path / "c.jsonl"
    write_log(log, [record(request=request, reply=reply)])
    (example,), _ = run([log])
    assert example == {
        "messages": [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi!"}]
    }


def test_records_that_cannot_train_are_left_out_and_counted(tmp_path):
    truncated = {**recorded_reply(), "truncated": True}
    audio = {
        "model": "m",
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}
                ],
            }
        ],
    }
    empty = {
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": ""}, "finish_reason": "stop"}
        ],
        "truncated": False,
    }

    def finished(reason: str | None) -> dict[str, Any]:
        reply = recorded_reply()
        return {**reply, "choices": [{**reply["choices"][0], "finish_reason": reason}]}

    log = tmp_path / "c.jsonl"
    write_log(
        log,
        [
            record(status=500),
            record(reply=truncated),
            record(reply=None),
            record(path="/v1/embeddings"),
            record(request=audio),
            record(reply=empty),
            record(reply=finished(None)),  # a stream the client left before its end
            record(reply=finished("length")),  # cut by max_tokens
            record(error="client_closed"),
            record(request={"model": "m", "messages": [{"role": "wizard", "content": "x"}]}),
            record(request_id="good"),
        ],
    )
    examples, stats = run([log])
    assert len(examples) == 1
    assert (stats.read, stats.unusable, stats.bad) == (11, 10, 0)


def test_filters_select_by_time_key_and_model(tmp_path):
    log = tmp_path / "c.jsonl"
    records = [
        record(request_id="a", ts=100.0, key_id="k1", key_name="team-a"),
        record(
            request_id="b",
            ts=200.0,
            key_id="k2",
            key_name="team-b",
            model="gpt-4.1-mini",
            request={**REQUEST, "model": "gpt-4.1-mini"},
        ),
        record(request_id="c", ts=300.0, key_id=None, key_name=None),
    ]
    write_log(log, records)

    def ids(**filters: Any) -> list[str]:
        found, _ = run([log], fmt="jsonl", **filters)
        return [r["request_id"] for r in found]

    assert ids() == ["a", "b", "c"]
    assert ids(since=200.0) == ["b", "c"]
    assert ids(until=200.0) == ["a"]
    assert ids(since=150.0, until=250.0) == ["b"]
    assert ids(key="k2") == ["b"]
    assert ids(key="team-a") == ["a"]
    assert ids(model="gpt-4o") == ["a", "c"]  # the model the request named
    assert ids(model="gpt-4o-2024-08-06") == ["a", "c"]  # or the one that answered
    _, stats = run([log], fmt="jsonl", key="nobody")
    assert stats.filtered == 3


def test_lines_of_an_earlier_version_with_ts_and_error_are_read(tmp_path):
    log = tmp_path / "c.jsonl"
    old = [
        {k: v for k, v in record(request_id=rid).items() if k not in ("time", "error_code")}
        | {"ts": ts, "error": error}
        for rid, ts, error in (("a", 100.0, None), ("b", 200.0, None), ("c", 300.0, "cut"))
    ]
    write_log(log, old)
    found, stats = run([log], fmt="jsonl", since=150.0)
    assert [r["request_id"] for r in found] == ["b", "c"]
    examples, stats = run([log])
    assert len(examples) == 2 and stats.unusable == 1  # "c" failed: not a training example


def test_a_time_that_cannot_be_read_is_left_out_by_a_time_filter(tmp_path):
    log = tmp_path / "c.jsonl"
    write_log(log, [record(request_id="a", time="yesterday"), record(request_id="b", ts=500.0)])
    found, stats = run([log], fmt="jsonl", since=100.0)
    assert [r["request_id"] for r in found] == ["b"] and stats.filtered == 1


def test_jsonl_gives_the_records_as_logged(tmp_path):
    log = tmp_path / "c.jsonl"
    records = [record(request_id="a"), record(request_id="b", status=429)]
    write_log(log, records)
    found, _ = run([log], fmt="jsonl")
    assert found == records


def test_bad_lines_and_a_truncated_last_line_are_skipped_and_counted(tmp_path):
    log = tmp_path / "c.jsonl"
    write_log(log, [record(request_id="a")])
    with log.open("ab") as file:
        file.write(b"not json at all\n[1, 2]\n\n\xff\xfe\n")
    write_log(log, [record(request_id="b")], tail=orjson.dumps(record(request_id="c"))[:200])
    found, stats = run([log], fmt="jsonl")
    assert [r["request_id"] for r in found] == ["a", "b"]
    assert stats.bad == 5


def test_rotated_files_are_read_oldest_first_and_each_once(tmp_path):
    log = tmp_path / "c.jsonl"
    write_log(Path(f"{log}.2"), [record(request_id="oldest")])
    write_log(Path(f"{log}.1"), [record(request_id="older")])
    write_log(log, [record(request_id="newest")])
    for paths in ([log], [log, Path(f"{log}.1"), Path(f"{log}.2")]):
        found, _ = run(paths, fmt="jsonl")
        assert [r["request_id"] for r in found] == ["oldest", "older", "newest"]


def test_gzip_compressed_logs_are_read_and_a_cut_one_does_not_stop_the_export(tmp_path):
    whole = tmp_path / "old.jsonl.gz"
    whole.write_bytes(gzip.compress(orjson.dumps(record(request_id="gz")) + b"\n"))
    cut = tmp_path / "cut.jsonl.gz"
    data = gzip.compress(
        b"".join(orjson.dumps(record(request_id=str(i))) + b"\n" for i in range(50))
    )
    cut.write_bytes(data[: len(data) // 2])
    found, stats = run([whole, cut], fmt="jsonl")
    assert found[0]["request_id"] == "gz"
    assert stats.bad >= 1


def test_an_unknown_format_or_a_missing_file_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="openai-chat"):
        export([], io.StringIO(), "alpaca", None, None, None, None)
    with pytest.raises(OSError):
        export([str(tmp_path / "nope.jsonl")], io.StringIO(), "jsonl", None, None, None, None)


NOW = 1_760_000_000.0


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1750000000", 1_750_000_000.0),
        ("1750000000.5", 1_750_000_000.5),
        ("2026-01-31", 1_769_817_600.0),
        ("2026-01-31T08:00", 1_769_817_600.0 + 8 * 3600),
        ("2026-01-31T08:00+02:00", 1_769_817_600.0 + 6 * 3600),
        ("2026-01-31T08:00Z", 1_769_817_600.0 + 8 * 3600),  # (Python 3.10 reads no Z itself)
        ("7D", NOW - 7 * 86400),
        ("90s", NOW - 90),
        ("30m", NOW - 1800),
        ("12h", NOW - 12 * 3600),
        (" 7d ", NOW - 7 * 86400),
        ("1.5d", NOW - 1.5 * 86400),
        ("2w", NOW - 14 * 86400),
    ],
)
def test_times_for_since_and_until_read_dates_ages_and_unix_seconds(text, expected):
    assert parse_time(text, NOW) == expected


@pytest.mark.parametrize(
    "text", ["", "  ", "yesterday", "7x", "d", "-3d", "2026-13-01", "20260131", "12345678.5", "3M"]
)
def test_a_time_that_is_none_of_those_is_refused_by_name(text):
    with pytest.raises(ValueError, match="is not a time"):
        parse_time(text, NOW)


@pytest.mark.parametrize("flag", ["--since", "--until"])
def test_an_empty_since_or_until_is_refused_not_ignored(tmp_path, flag):
    from conftest import run_cli

    conv = tmp_path / "c.jsonl"
    conv.write_text("")
    done = run_cli("logs", "export", "--file", str(conv), flag, "")
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert "is not a time" in done.stderr and "Traceback" not in done.stderr


def test_an_existing_output_file_is_truncated_and_made_private(tmp_path):
    from conftest import run_cli

    conv = tmp_path / "c.jsonl"
    conv.write_text("")
    out = tmp_path / "train.jsonl"
    out.write_text("old contents\n")
    out.chmod(0o644)
    done = run_cli("logs", "export", "--file", str(conv), "--output", str(out))
    assert done.returncode == 0, done.stderr
    assert out.read_text() == "" and (out.stat().st_mode & 0o777) == 0o600
