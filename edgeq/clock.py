"""Wall-time profiles: where `edgeq export` and `edgeq verify` spend their time."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator


@contextlib.contextmanager
def timed(store: dict[str, float], key: str) -> Iterator[None]:
    """Add the block's wall time to store[key], in seconds (a stage may be entered several times)."""
    t0 = time.perf_counter()
    try:
        yield
    finally:
        store[key] = round(store.get(key, 0.0) + time.perf_counter() - t0, 2)


def profile(seconds: dict[str, float]) -> str:
    """'time (s): a 12.3, b 4.5, ...', largest first."""
    parts = [f"{k} {v:.1f}" for k, v in sorted(seconds.items(), key=lambda kv: -kv[1])]
    return "time (s): " + ", ".join(parts)
