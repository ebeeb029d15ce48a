"""What each piece of the request path's accounting and logging costs, one piece at a time.

    python bench/components.py --list            the pieces
    python bench/components.py PIECE N           run PIECE N times (for a profiler)
    bench/components.sh [PIECE ...]              instructions per run of each, by callgrind

Every piece works on the benchmark's own traffic: the request body of ``load.py``, the
answer and the stream of ``upstream.py``, a usage row of that request, the buckets of
``configs/limits.yaml``. The figures say where a request's instructions go (see
docs/performance.md); they are not a benchmark of the gateway as a whole.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import orjson  # noqa: E402
import upstream  # noqa: E402
from load import REQUEST_MESSAGES  # noqa: E402

from openai_forward import admission, eventlog, limits, records  # noqa: E402
from openai_forward.accounting import Account  # noqa: E402
from openai_forward.body import read_facts  # noqa: E402
from openai_forward.config import load  # noqa: E402
from openai_forward.usage import JsonUsage, StreamUsage, usage_from_obj  # noqa: E402

BODY = json.dumps({"model": "gpt-4o-mini", "messages": REQUEST_MESSAGES}).encode()
ANSWER = upstream.COMPLETION_BODY
EVENTS = [upstream._event(i, usage=True) for i in range(upstream.N_CHUNKS)]
EVENTS.append(upstream._usage_event())
USAGE_OBJ = orjson.loads(ANSWER)["usage"]
ROW = records.usage_row(
    "req_gw_0123456789ab00000001", 1765000000.125, "cfg_bench", "bench", "127.0.0.1", "/",
    "/v1/chat/completions", "main", "k-0a1b2c3d", "gpt-4o-mini-2024-07-18", 200, 19, 28, 0, 0,
    False, False, False, 1.234, 2.345, None, None,
)  # fmt: skip


def _buckets() -> list[limits.Bucket]:
    """The buckets a request of configs/limits.yaml fills: a daily token budget; rpm, tpm
    and concurrency of the key; the global concurrency."""
    b = limits.Bucket
    return [
        b("key:cfg_bench|budget|tokens|d20261207", "quota", 1e12, 86400.0, 2019.0, 0.0, "tokens"),
        b("key:cfg_bench|r0|rpm", "rate", 1e8, 60.0, 1.0, 0.0, "requests"),
        b("key:cfg_bench|r0|tpm", "rate", 1e11, 60.0, 2019.0, 0.0, "tokens"),
        b("key:cfg_bench|r0|cc", "concurrent", 1e5, 300.0),
        b("global|r1|cc", "concurrent", 1e5, 300.0),
    ]


def _floor(body: bytes) -> object:
    obj = orjson.loads(body)
    return usage_from_obj(obj.get("usage")), obj.get("model")


def _pieces() -> dict[str, Callable[[], object]]:
    folder = tempfile.mkdtemp(prefix="of-components-")
    config = load(
        {
            "OPENAI_API_KEY": "sk-x",
            "OPENAI_FORWARD_ACCESS_LOG": os.path.join(folder, "access.log"),
            "OPENAI_FORWARD_CONVERSATION_LOG": os.path.join(folder, "conversations.log"),
        }
    )
    store = records.RecordStore(os.path.join(folder, "usage.db"))
    ids = iter(range(1, 1 << 62))
    batch = [dict(ROW) for _ in range(512)]

    def insert_rows() -> None:  # one row's share of a 512-row batch, as the writer does it
        for row in batch:
            row["request_id"] = f"req_gw_{next(ids):022x}"
        store.insert_many(batch)

    def answer_usage() -> object:
        observer = JsonUsage(b"")
        observer.feed(ANSWER)
        return observer.result()

    def stream_usage() -> object:  # a 50-chunk stream whose usage the gateway asked for
        observer = StreamUsage(strip=True)
        for event in EVENTS:
            observer.feed(event)
        observer.end()
        return observer.usage

    cap = config.conversation_max_bytes

    def answered(logged: bool) -> Account:  # a chat completion's account as Meter.finish
        acct = Account("req_gw_0123456789ab00000001", "/v1/chat/completions", "/", 0.0)
        acct.body = BODY
        if logged:
            acct.log_body = BODY
            acct.capture_cap = cap
        acct.on_head(200, False, b"")
        observer = acct.observer
        assert isinstance(observer, JsonUsage)
        observer.feed(ANSWER)
        observer.result()  # (the usage read: the answer parsed as one object)
        return acct

    conv = answered(True)
    events = eventlog.EventLog(config)
    head = eventlog.json_line(ROW)

    def log_on_loop() -> None:  # a logged request on the loop: its account, its lines
        acct = answered(True)
        events.add(ROW, acct if acct.encoding is not None and acct.log_body else None)
        if events._count >= 256:  # (no flush here: the batch is dropped unwritten)
            events._take()

    def observe_only() -> None:  # the same request, its conversation not logged
        answered(False)

    access_line = eventlog.json_line(ROW)
    talk = eventlog.conversation_line(ROW, conv, cap, head)
    assert talk is not None
    made = {line: [access_line] * 256 for line, _ in events._makers}
    talks: list[eventlog.Talk] = [talk] * 256

    def write_logs() -> None:  # one request's share of a 256-request batch, as the writer does it
        events._write(made, talks)

    store_ = limits.LocalStore()
    buckets = _buckets()

    def admit_settle() -> None:
        decision = store_.admit(buckets)
        admission.rate_headers(decision.states)
        store_.settle(decision, [-1900.0, 0.0, -1900.0, 0.0, 0.0])

    admitted = store_.admit(buckets)

    return {
        "nothing": lambda: None,
        "admit": lambda: store_.admit(buckets),
        "rate_headers": lambda: admission.rate_headers(admitted.states),
        "answer_parse": lambda: orjson.loads(ANSWER),
        "usage_from_obj": lambda: usage_from_obj(USAGE_OBJ),
        "answer_usage": answer_usage,
        "answer_usage_floor": lambda: _floor(ANSWER),
        "stream_usage": stream_usage,
        "body_facts": lambda: read_facts(BODY),
        "admit_settle": admit_settle,
        "row_insert": insert_rows,
        "access_line": lambda: eventlog.json_line(ROW),
        "conversation_line": lambda: eventlog.conversation_line(ROW, conv, 1 << 20, head),
        "observe_only": observe_only,
        "log_on_loop": log_on_loop,
        "log_write": write_logs,
    }


# pieces that do a whole batch per run, and how many requests that batch stands for
PER_RUN = {"row_insert": 512, "log_write": 256}


def main() -> int:
    if sys.argv[1:] == ["--list"]:
        for name in _pieces():
            print(name, PER_RUN.get(name, 1))
        return 0
    if len(sys.argv) != 3:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    name, count = sys.argv[1], int(sys.argv[2])
    piece = _pieces()[name]
    piece()  # warm: first use of every path
    # a collection of the cyclic garbage in one count and not in the other would be charged
    # to the piece: the counts must differ by the runs alone
    gc.collect()
    gc.disable()
    start = time.process_time()
    for _ in range(count):
        piece()
    spent = time.process_time() - start
    print(f"{name}: {spent / count / PER_RUN.get(name, 1) * 1e6:.2f} us of CPU per request")
    return 0


if __name__ == "__main__":
    sys.exit(main())
