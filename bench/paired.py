"""Compare gateway configurations on a noisy machine: interleaved runs, paired ratios.

On a shared (virtualised) machine the CPU a request costs drifts by 20 % and more over
minutes, so targets measured one after another (``run.py --repeat``) compare different
moments as much as different code. This runs ``run.py`` once per target per round, the
targets in turn, and reports per phase each target's median and the median over the rounds
of its ratio to the first target (the baseline), which cancels the drift the pair shares.

    BENCH_API_KEY=fk-bench-0123456789abcdef0123456789abcdef0123 \\
    python bench/paired.py --rounds 8 --phases c32,stream \\
        "off=OPENAI_FORWARD_CONFIG=$PWD/bench/configs/forward-key.yaml \\
             OPENAI_FORWARD_ACCESS_LOG=off" \\
        "on=OPENAI_FORWARD_CONFIG=$PWD/bench/configs/forward-key.yaml \\
            OPENAI_FORWARD_ACCESS_LOG=/tmp/a.log OPENAI_FORWARD_CONVERSATION_LOG=/tmp/c.log"

Each target is ``NAME=ENV...``: environment settings for ``python -m openai_forward run``
(a space-separated list of KEY=VALUE, paths absolute; the first target is the baseline).
The per-run JSON files and the summary go to ``--out`` (default
``bench/results/paired-<timestamp>/``).

To compare two checkouts (Python 3.11+), give each target ``PYTHONSAFEPATH=1 PYTHONPATH=DIR``
(the gateway runs from this repository, whose own package would otherwise come first).
``--pair A/B`` also reports the median per-round ratio of any two targets (say, logging on
to off of the same checkout); ``--report DIR`` prints a finished run's summary again.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
GATEWAY = "{python} -m openai_forward run --host {host} --port {port}"


def run_once(name: str, env: str, phases: str, out: Path) -> dict[str, float]:
    """One ``run.py`` of one target: CPU µs per request (or stream) by phase."""
    result = out / f"{name}-{int(time.time() * 1000)}.json"
    command = [
        sys.executable,
        str(BENCH / "run.py"),
        "--no-direct",
        "--repeat",
        "1",
        "--phases",
        phases,
        "--out",
        str(result),
        "--target",
        f"{name}=env {env} {GATEWAY}",
    ]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    data = json.loads(result.read_text())
    target = data["targets"][name]["results"]
    return {phase: float(r["cpu_us_per_unit"]) for phase, r in target.items()}


def summary(runs: dict[str, list[dict[str, float]]]) -> dict[str, dict[str, object]]:
    """Per phase and target: median, min and every run; and the median paired ratio to the
    first target."""
    names = list(runs)
    base = names[0]
    out: dict[str, dict[str, object]] = {}
    for phase in runs[base][0]:
        rows: dict[str, object] = {}
        for name in names:
            values = [r[phase] for r in runs[name]]
            row: dict[str, object] = {
                "median": round(statistics.median(values), 1),
                "min": round(min(values), 1),
                "runs": [round(v, 1) for v in values],
            }
            if name != base:
                pairs = zip(runs[name], runs[base], strict=False)
                ratios = [r[phase] / b[phase] for r, b in pairs]
                row["ratio_to_" + base] = round(statistics.median(ratios), 3)
            rows[name] = row
        out[phase] = rows
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("targets", nargs="*", help="NAME=ENV... (the first is the baseline)")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--phases", default="c32,stream")
    ap.add_argument("--out", help="folder for the runs and summary.json")
    ap.add_argument(
        "--pair",
        action="append",
        default=[],
        metavar="A/B",
        help="also report the median over rounds of A's ratio to B (repeatable)",
    )
    ap.add_argument("--report", metavar="DIR", help="print the summary.json of DIR; run nothing")
    args = ap.parse_args()
    if args.report:
        result = json.loads((Path(args.report) / "summary.json").read_text())
        show(result, args.pair)
        return
    targets = [t.split("=", 1) for t in args.targets]
    if not targets or any(len(t) != 2 or not t[0] for t in targets):
        ap.error("a target is NAME=ENV...")
    out = Path(args.out or BENCH / "results" / f"paired-{time.strftime('%Y%m%d-%H%M%S')}")
    out.mkdir(parents=True, exist_ok=True)
    runs: dict[str, list[dict[str, float]]] = {name: [] for name, _ in targets}
    for round_ in range(1, args.rounds + 1):
        for name, env in targets:
            runs[name].append(run_once(name, env, args.phases, out))
        print(f"round {round_}/{args.rounds} done", file=sys.stderr)
    result = summary(runs)
    (out / "summary.json").write_text(json.dumps(result, indent=2) + "\n")
    show(result, args.pair)
    print(f"runs and summary: {out}")


def show(result: dict[str, dict[str, Any]], pairs: list[str]) -> None:
    """Print a summary: per phase, each target's median and its ratio to the baseline, then
    the median per-round ratio of each ``A/B`` of ``pairs``."""
    for phase, rows in result.items():
        print(phase)
        for name, row in rows.items():
            ratio = next(
                (f"  x{v} vs {k[9:]}" for k, v in row.items() if k.startswith("ratio")), ""
            )
            print(f"  {name:12s} median {row['median']:8.1f}  min {row['min']:8.1f}{ratio}")
        for pair in pairs:
            a, _, b = pair.partition("/")
            ratios = [x / y for x, y in zip(rows[a]["runs"], rows[b]["runs"], strict=True)]
            print(f"  {pair:24s} x{statistics.median(ratios):.3f} (median of {len(ratios)} rounds)")


if __name__ == "__main__":
    main()
