"""Paired latency: a candidate and a reference timed in alternating windows, compared as ratios.

Latency on a shared or virtual machine drifts in bursts (1.3-2x slowdowns lasting up to a second),
so absolute times taken at different moments cannot be compared. A round (`timed_round`) runs a
short window of every function back to back; a ratio computed inside one round compares calls made
within a few tens of milliseconds of each other, and the median over rounds discards the rounds a
burst split. Shared by the exporter's timed decisions, the verifier and the benchmarks.

`threads(n)` runs a block at torch's thread count n and restores the previous count after it.
Nothing this process started runs beside a timed round: work sent to a pool worker to run while the
export goes on (`beside`: edgeq.trials.Pool.beside) is waited for before the round starts (`alone`).
"""

from __future__ import annotations

import contextlib
import gc
import time
from collections.abc import Callable, Iterator, Sequence

import numpy as np

Fn = Callable[[np.ndarray], object]

# Seconds per timing window (at least one call), for the exporter's decisions, the verifier and the device
# checker alike. Paired in one run (docs/decisions.md), 15 ms windows gave the medians and 8-round intervals of
# 40 ms windows on the MNIST models and resnet18, at a third of the time where a call is short; where one call
# is longer than a window, the window is that call either way.
WINDOW_S = 0.015
WARMUP_CALLS = 3  # untimed calls of each function before its first window at an input


@contextlib.contextmanager
def threads(n: int) -> Iterator[None]:
    """torch's intra-op thread count set to `n` for the block, the previous count restored after it."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def ort_timing_options(n: int) -> dict | None:
    """onnxruntime settings for timing sessions against each other: with more than one thread, worker
    threads do not spin, or one session's idle workers slow the next one timed."""
    return {"config_entries": {"session.intra_op.allow_spinning": "0"}} if n > 1 else None


_BESIDE: set = set()  # futures of untimed work this process started on other cores (edgeq.trials.Pool.beside)


def beside(future) -> None:
    """Untimed work now running beside this process: the next timed round waits for it to finish. A future
    leaves the set when it is done (nothing here holds its result)."""
    _BESIDE.add(future)
    future.add_done_callback(_BESIDE.discard)


def alone() -> None:
    """Wait for the work started beside this process (`beside`): a timed round shares no core with it.
    Its outcome (a result or an exception) stays with its future for the caller that started it."""
    from concurrent.futures import wait

    if _BESIDE:
        wait(list(_BESIDE))


def timed_round(fns: Sequence[Fn], x: np.ndarray, window_s: float, reverse: bool = False,
                min_calls: int = 1) -> list[list[float]]:
    """One round: a window per function, back to back -> per-call seconds, indexed like `fns`.

    A window lasts at least `window_s` and `min_calls` calls. `reverse` runs the functions in
    reverse order (alternate it between rounds so that none always follows the same neighbour).
    The garbage collector is paused so that a collection is not charged to the call it interrupts.
    Work this process started beside it (`beside`) is waited for first.
    """
    alone()
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
                 min_calls: int = 1, warmup_calls: int = WARMUP_CALLS) -> list[list[list[float]]]:
    """Warm up (TorchScript re-optimizes on the first calls of a shape), then `rounds` alternating
    rounds back to back: per-call seconds as samples[fn][round][call]."""
    warm_up(fns, x, warmup_calls)
    return by_function([timed_round(fns, x, window_s, r % 2 == 1, min_calls) for r in range(rounds)])


def first_warm_up(warmed: set, key) -> int:
    """Warm-up calls for a block of a timed decision at `key` (an input): WARMUP_CALLS for its first block, none
    for the later ones, whose functions ran at that input in the block before (between a decision's blocks
    only its own timing runs: at its other inputs). `warmed` holds the keys already warmed, one set per
    decision."""
    if key in warmed:
        return 0
    warmed.add(key)
    return WARMUP_CALLS


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
