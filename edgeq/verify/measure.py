"""Measurements that compare a candidate with a reference: accuracy, fidelity and paired latency.

Latency on a shared or virtual machine drifts in bursts (1.3-2x slowdowns lasting up to a second),
so absolute times taken at different moments cannot be compared. A round (`timed_round`) runs a
short window of every function back to back; a ratio computed inside one round compares calls made
within a few tens of milliseconds of each other, and the median over rounds discards the rounds a
burst split. Spreading one function's rounds over a longer span (as `edgeq verify` does, one round
of every artifact at a time) also makes its own median robust to a burst. Nothing here knows about
artifacts: a benchmark can reuse it.
"""

from __future__ import annotations

import gc
import math
import time
from collections.abc import Callable, Sequence

import numpy as np

Fn = Callable[[np.ndarray], object]


def correct_count(logits: np.ndarray, labels: np.ndarray) -> int:
    """Number of top-1 hits: an integer, so two runs (or a manifest) agree to the last sample."""
    return int((logits.argmax(axis=1) == labels).sum())


def agreement(ref: np.ndarray, cand: np.ndarray) -> float:
    """Fraction of samples on which both logit sets pick the same class."""
    return float((ref.argmax(axis=1) == cand.argmax(axis=1)).mean())


def sqnr_db(ref: np.ndarray, cand: np.ndarray) -> float:
    """Signal-to-quantization-noise ratio of the logits, 20*log10(||ref|| / ||ref - cand||); inf if equal."""
    ref64, diff = ref.astype(np.float64), ref.astype(np.float64) - cand.astype(np.float64)
    noise = float(np.linalg.norm(diff))
    return math.inf if noise == 0.0 else 20.0 * math.log10(float(np.linalg.norm(ref64)) / noise)


def timed_round(fns: Sequence[Fn], x: np.ndarray, window_s: float, reverse: bool = False,
                min_calls: int = 1) -> list[list[float]]:
    """One round: a window per function, back to back -> per-call seconds, indexed like `fns`.

    A window lasts at least `window_s` and `min_calls` calls. `reverse` runs the functions in
    reverse order (alternate it between rounds so that none always follows the same neighbour).
    The garbage collector is paused so that a collection is not charged to the call it interrupts.
    """
    samples: list[list[float]] = [[] for _ in fns]
    order = reversed(range(len(fns))) if reverse else range(len(fns))
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for i in order:
            samples[i] = _window(fns[i], x, window_s, min_calls)
    finally:
        if gc_was_enabled:
            gc.enable()
    return samples


def timed_rounds(fns: Sequence[Fn], x: np.ndarray, rounds: int = 5, window_s: float = 0.04,
                 min_calls: int = 1, warmup_calls: int = 3) -> list[list[list[float]]]:
    """Warm up (TorchScript re-optimizes on the first calls of a shape), then `rounds` alternating
    rounds back to back: per-call seconds as samples[fn][round][call]."""
    warm_up(fns, x, warmup_calls)
    return by_function([timed_round(fns, x, window_s, r % 2 == 1, min_calls) for r in range(rounds)])


def by_function(per_round: list[list[list[float]]]) -> list[list[list[float]]]:
    """samples[round][fn] -> samples[fn][round]."""
    return [list(fn_rounds) for fn_rounds in zip(*per_round, strict=True)]


def warm_up(fns: Sequence[Fn], x: np.ndarray, calls: int) -> None:
    """Call each function `calls` times, untimed."""
    for fn in fns:
        for _ in range(calls):
            fn(x)


def _window(fn: Fn, x: np.ndarray, window_s: float, min_calls: int) -> list[float]:
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < min_calls or time.perf_counter() - start < window_s:
        t0 = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - t0)
    return times


def round_ratios(cand: list[list[float]], ref: list[list[float]]) -> list[float]:
    """Per-round ratio of median call times, candidate / reference (>1: the candidate is slower)."""
    return [float(np.median(c) / np.median(r)) for c, r in zip(cand, ref, strict=True)]


def paired_latency(ref_fn: Fn, cand_fn: Fn, x: np.ndarray, rounds: int = 5, window_s: float = 0.04) -> dict:
    """Time two functions in alternating windows: all samples of each, and the per-round ratios."""
    ref, cand = timed_rounds([ref_fn, cand_fn], x, rounds, window_s)
    return {"ref_samples": flatten(ref), "cand_samples": flatten(cand), "ratios": round_ratios(cand, ref)}


def flatten(rounds: list[list[float]]) -> list[float]:
    return [t for window in rounds for t in window]
