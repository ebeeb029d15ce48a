"""Time functions of the request path where they run: inside the gateway under load.

    python bench/insitu.py FUNCTION [FUNCTION ...] -- GATEWAY ARGS...

runs ``python -m openai_forward GATEWAY ARGS`` (one worker: the timers live in this process)
with every FUNCTION (``module:qualname``, e.g. ``openai_forward.eventlog:EventLog.add``)
wrapped in a wall-clock timer, and when it stops prints each one's calls and mean time per
call to standard error. As a target of ``run.py`` (whose result JSON keeps the target's
last output, ``targets.NAME.output_tail``; the gateway's settings go in the command, as
``run.py`` does not pass on its own ``OPENAI_*`` environment):

    python bench/run.py --no-direct --phases c32 --target \\
      "timed=env OPENAI_FORWARD_CONFIG=$PWD/bench/configs/forward-key.yaml \\
       OPENAI_FORWARD_ACCESS_LOG=/tmp/a.log {python} {bench}/insitu.py \\
       openai_forward.eventlog:EventLog.add -- run --host {host} --port {port}"

Why: a piece timed alone (``components.py``) runs with its code and data in the CPU's
caches; in the gateway, between two calls, a whole request's other work has evicted them,
and the same piece takes about twice as long (docs/performance.md). The timer itself
costs about 0.1 µs a call. Nested timed functions count in both.
"""

from __future__ import annotations

import atexit
import functools
import importlib
import sys
import time
from collections.abc import Callable
from typing import Any


def wrap(spec: str) -> None:
    """Replace ``module:qualname`` by a timed copy; its figures print at exit."""
    module_name, _, qualname = spec.partition(":")
    owner: Any = importlib.import_module(module_name)
    *path, name = qualname.split(".")
    for part in path:
        owner = getattr(owner, part)
    inner: Callable[..., Any] = getattr(owner, name)
    spent = [0, 0]  # ns, calls
    clock = time.perf_counter_ns

    @functools.wraps(inner)
    def timed(*args: Any, **kwargs: Any) -> Any:
        start = clock()
        try:
            return inner(*args, **kwargs)
        finally:
            spent[0] += clock() - start
            spent[1] += 1

    setattr(owner, name, timed)

    def report() -> None:
        mean = spent[0] / spent[1] / 1000 if spent[1] else 0.0
        print(f"insitu {spec}: {spent[1]} calls, {mean:.2f} µs each", file=sys.stderr)

    atexit.register(report)


def main() -> int:
    argv = sys.argv[1:]
    if "--" not in argv or argv.index("--") == 0:
        print(__doc__, file=sys.stderr)
        return 2
    cut = argv.index("--")
    for spec in argv[:cut]:
        wrap(spec)
    from openai_forward.cli import main as gateway

    return gateway(argv[cut + 1 :])


if __name__ == "__main__":
    sys.exit(main())
