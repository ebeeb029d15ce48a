"""The `usage` command (openai_forward/report.py), run in-process through its own parser.

Covers: the aligned table (names from the key store, thousands separators, cost column only
with prices, a total line), the JSON list, grouping and filters, the window line, a missing
database, a database without usage, bad --since, and that reading never writes the file.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import pytest

from openai_forward import report
from openai_forward.config import Config
from openai_forward.keystore import KeyStore
from openai_forward.records import RecordStore, UsageRow, usage_row

T0 = 1_790_000_000.0  # 2026-09-21 14:13:20 UTC
DAY = 86400.0


def row(n: int, **changes: object) -> UsageRow:
    fields: dict[str, Any] = dict(
        request_id=f"req{n}",
        ts=T0 + n,
        key_id=None,
        key_name=None,
        client_ip="10.0.0.1",
        route="/",
        path="/v1/chat/completions",
        upstream="openai",
        upstream_key="key-1",
        model="gpt-4o",
        status=200,
        prompt_tokens=1_234_567,
        completion_tokens=1000,
        cached_tokens=0,
        reasoning_tokens=0,
        estimated=False,
        stream=False,
        client_closed=False,
        ttfb_ms=10.0,
        duration_ms=100.0,
        cost=None,
        error_code=None,
    )
    return usage_row(**{**fields, **changes})


def usage(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="openai-forward")
    report.add_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["usage", *argv])


@pytest.fixture
def db(tmp_path: Path) -> str:
    """A database with one key-store key (alice) and rows for it, bob and no key."""
    path = str(tmp_path / "gateway.db")
    with KeyStore(path) as keys:
        alice, _ = keys.create("alice")
    with RecordStore(path) as store:
        store.insert_many(
            [
                row(1, key_id=alice.id, key_name="alice", cost=1.5),
                row(2, key_id=alice.id, key_name="alice", cost=0.25, status=500),
                row(3, key_id="cfg_bob", key_name="bob", model="o3", ts=T0 + DAY),
                row(4, prompt_tokens=10, completion_tokens=5, ts=T0 + 2 * DAY),
            ]
        )
    return path


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = report.run(usage(*argv), Config())
    out, err = capsys.readouterr()
    return code, out, err


def test_table_by_key_is_aligned_with_names_and_a_total(
    db: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run(capsys, "--database", db)
    assert code == 0
    title, header, *lines, total = out.splitlines()
    assert title == "usage by key, all time (UTC)"
    assert header.split()[:4] == ["key", "name", "requests", "errors"]
    assert lines[0].split()[1:4] == ["alice", "2", "1"]
    assert lines[0].startswith("fkid_")
    assert lines[1].split()[:2] == ["cfg_bob", "bob"]
    assert lines[2].startswith("-") and "(no forward key)" in lines[2]
    assert "2,469,134" in lines[0]  # prompt tokens, thousands separated
    assert "1.7500" in lines[0] and " - " in lines[1]  # cost: 4 decimals, "-" when unpriced
    assert total.split()[:3] == ["total", "4", "1"]
    assert "1.7500" in total and "3,706,716" in total
    widths = {len(line) for line in (header, *lines, total)}
    assert len(widths) == 1  # every line ends in the right-aligned last column


def test_cost_column_only_when_prices_exist(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = str(tmp_path / "free.db")
    with RecordStore(path) as store:
        store.insert_many([row(1)])
    _, out, _ = run(capsys, "--database", path, "--by", "model")
    assert "cost" not in out
    assert out.splitlines()[2].split()[:2] == ["gpt-4o", "1"]


def test_json_is_a_list_of_stable_objects(db: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "--database", db, "--json", "--by", "model")
    assert code == 0
    groups = json.loads(out)
    assert [g["model"] for g in groups] == ["gpt-4o", "o3"]
    first = groups[0]
    assert list(first) == [
        "model",
        "requests",
        "prompt_tokens",
        "completion_tokens",
        "cached_tokens",
        "reasoning_tokens",
        "total_tokens",
        "cost",
        "estimated",
        "errors",
        "client_closed",
        "cache_hits",
        "avg_duration_ms",
        "avg_ttfb_ms",
        "first_ts",
        "last_ts",
    ]
    assert first["requests"] == 3 and first["cost"] == 1.75 and first["errors"] == 1
    assert isinstance(first["prompt_tokens"], int) and groups[1]["cost"] is None


def test_json_by_key_carries_the_key_store_name(
    db: str, capsys: pytest.CaptureFixture[str]
) -> None:
    _, out, _ = run(capsys, "--json", "--database", db)
    names = {g["key"]: g["key_name"] for g in json.loads(out)}
    assert sorted(map(str, names.values())) == ["None", "alice", "bob"]


def test_filters_by_time_and_key(db: str, capsys: pytest.CaptureFixture[str]) -> None:
    _, out, _ = run(capsys, "--database", db, "--json", "--since", "2026-09-22")
    assert sum(g["requests"] for g in json.loads(out)) == 2
    _, out, _ = run(capsys, "--database", db, "--json", "--until", "2026-09-22T00:00Z")
    assert sum(g["requests"] for g in json.loads(out)) == 2
    _, out, _ = run(capsys, "--database", db, "--json", "--key", "alice", "--by", "status")
    assert {g["status"]: g["requests"] for g in json.loads(out)} == {200: 1, 500: 1}
    _, out, _ = run(capsys, "--database", db, "--since", "2026-09-22", "--key", "bob")
    assert out.splitlines()[0] == "usage by key, since 2026-09-22 00:00, key bob (UTC)"


def test_by_day_lists_days_in_order(db: str, capsys: pytest.CaptureFixture[str]) -> None:
    _, out, _ = run(capsys, "--database", db, "--by", "day")
    days = [line.split()[0] for line in out.splitlines()[2:-1]]
    assert days == ["2026-09-21", "2026-09-22", "2026-09-23"]


def test_nothing_in_the_period(db: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "--database", db, "--since", "1h")
    assert code == 0 and out.splitlines()[-1] == "no usage recorded in this period"
    _, out, _ = run(capsys, "--database", db, "--since", "1h", "--json")
    assert json.loads(out) == []


def test_missing_database_is_an_empty_report(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "none.db"
    code, out, _ = run(capsys, "--database", str(path))
    assert code == 0
    assert out.strip() == f"no usage recorded yet (database {path} does not exist)"
    code, out, err = run(capsys, "--database", str(path), "--json")
    assert code == 0 and json.loads(out) == [] and "does not exist" in err
    assert not path.exists()


def test_database_from_the_config_when_no_flag(db: str, capsys: pytest.CaptureFixture[str]) -> None:
    code = report.run(usage("--json"), Config(database=db))
    assert code == 0 and len(json.loads(capsys.readouterr().out)) == 3


def test_reading_never_writes_the_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "keys.db"
    KeyStore(str(path)).close()
    before = path.read_bytes()
    code, out, _ = run(capsys, "--database", str(path))
    assert code == 0 and "no usage recorded in this period" in out
    assert path.read_bytes() == before


def test_bad_since_is_a_usage_error(db: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "--database", db, "--until", "soon")
    assert code == 2 and out == ""
    assert err.startswith("openai-forward: --until: 'soon' is not a duration")


def test_unusable_database_is_an_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "junk.db"
    path.write_bytes(b"not sqlite" * 200)
    code, _, err = run(capsys, "--database", str(path))
    assert code == 1 and "not a usable SQLite database" in err


def test_parser_accepts_config_and_database_anywhere() -> None:
    args = usage("--json", "--config", "gw.yaml", "--by", "route", "--database", "x.db")
    assert (args.config, args.database, args.by, args.json) == ("gw.yaml", "x.db", "route", True)
    with pytest.raises(SystemExit):
        usage("--by", "colour")
