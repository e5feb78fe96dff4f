"""Wall-time profiles: where `edgeq export` and `edgeq verify` spend their time."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator


_open: list[list[float]] = []  # per open `timed` block: the seconds spent in blocks nested in it


@contextlib.contextmanager
def timed(store: dict[str, float], key: str) -> Iterator[None]:
    """Add the block's wall time to store[key], in seconds (a stage may be entered several times),
    less the time of `timed` blocks nested in it: each second is counted under one stage only."""
    t0 = time.perf_counter()
    _open.append([0.0])
    try:
        yield
    finally:
        nested = _open.pop()[0]
        elapsed = time.perf_counter() - t0
        store[key] = round(store.get(key, 0.0) + elapsed - nested, 2)
        if _open:
            _open[-1][0] += elapsed


def past_budget(t0: float, done: int, budget_s: float) -> bool:
    """Whether one more step of a serial search that started at `t0` (time.perf_counter) and has done `done`
    steps would end past `budget_s` seconds, at the mean wall time of its steps so far. Before any step: no."""
    spent = time.perf_counter() - t0
    return done > 0 and spent + spent / done > budget_s


def profile(seconds: dict[str, float]) -> str:
    """'time (s): a 12.3, b 4.5, ...', largest first."""
    parts = [f"{k} {v:.1f}" for k, v in sorted(seconds.items(), key=lambda kv: -kv[1])]
    return "time (s): " + ", ".join(parts)
