"""How long a timing window must be: the same paired ratio measured with windows of different lengths.

Every timed decision compares a file with its parent in rounds of alternating windows (edgeq.timing), in
blocks of 8 rounds (edgeq.evidence). For each int8 ONNX file of an export and its fp32 parent, at batch 1
and 256, this takes `--blocks` blocks of 8 rounds with each window length in turn (the lengths
interleaved, so that a burst of load falls on all of them alike) and prints, per length: the seconds a
block costs, the median of the block medians and their spread between blocks, and the mean width of a
block's 99 % interval of the median (for 8 rounds, their min to max). A window shorter than one call is
that call.

With `--trace SECONDS` it prints instead, for each pair at batch 1, every block of 8 rounds of 15 ms windows
taken back to back for that long: when it started, its median ratio and each file's median call. On a shared
machine the ratio can move between levels that last from a block to several seconds (docs/byom.md): a
decision's blocks see the level of their moment.

    .venv/bin/python benchmarks/windows.py artifacts [--pairs cnn-fp32.onnx:cnn-static.onnx ...] [--blocks 6]
    .venv/bin/python benchmarks/windows.py artifacts --pairs m-fp32.onnx:m-static.onnx --trace 20
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from edgeq.evidence import RULE, median_interval
from edgeq.runtime import load_onnx
from edgeq.timing import ort_timing_options, round_ratios, timed_rounds

WINDOWS = (0.04, 0.015, 0.01)
BATCHES = (1, 256)


def pairs_in(directory: Path) -> list[tuple[str, str]]:
    """Every `<family>-static.onnx` beside its `<family>-fp32.onnx`."""
    return [(f"{p.name[: -len('-static.onnx')]}-fp32.onnx", p.name) for p in sorted(directory.glob("*-static.onnx"))
            if (directory / f"{p.name[: -len('-static.onnx')]}-fp32.onnx").exists()]


def measure(directory: Path, parent: str, child: str, blocks: int) -> dict:
    val = np.load(directory / "val.npz")["inputs"]
    ref, cand = (load_onnx(directory / f, 1, ort_timing_options(1)) for f in (parent, child))
    rng = np.random.default_rng(0)
    found: dict = {(b, w): [] for b in BATCHES for w in WINDOWS}
    for _ in range(blocks):
        for b in BATCHES:
            x = val[rng.integers(0, len(val), size=b)]
            for w in WINDOWS:
                t0 = time.perf_counter()
                r, c = timed_rounds([ref.run, cand.run], x, RULE.block_rounds, w)
                ratios = round_ratios(c, r)
                lo, hi = median_interval(ratios)
                found[b, w].append((time.perf_counter() - t0, float(np.median(ratios)), hi - lo))
    return found


def trace(directory: Path, parent: str, child: str, seconds: float) -> None:
    val = np.load(directory / "val.npz")["inputs"]
    ref, cand = (load_onnx(directory / f, 1, ort_timing_options(1)) for f in (parent, child))
    x = val[np.random.default_rng(0).integers(0, len(val), size=1)]
    print(f"{child} / {parent}, batch 1: blocks of {RULE.block_rounds} rounds, 15 ms windows")
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        started = time.perf_counter() - t0
        r, c = timed_rounds([ref.run, cand.run], x, RULE.block_rounds, 0.015)
        us = [np.median([t for w in f for t in w]) * 1e6 for f in (r, c)]
        print(f"  {started:6.2f} s  ratio {np.median(round_ratios(c, r)):.3f}  {parent} {us[0]:7.1f} us  "
              f"{child} {us[1]:7.1f} us")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("directory", type=Path, help="an export's directory (its val.npz and ONNX files)")
    ap.add_argument("--pairs", nargs="*", help="PARENT:CHILD file names (default: every *-static.onnx and its "
                                               "*-fp32.onnx)")
    ap.add_argument("--blocks", type=int, default=6)
    ap.add_argument("--trace", type=float, metavar="SECONDS", help="print every block of a pair at batch 1 for "
                                                                   "this long instead")
    args = ap.parse_args(argv)
    pairs = [tuple(p.split(":", 1)) for p in args.pairs] if args.pairs else pairs_in(args.directory)
    if not pairs:
        print(f"no int8 ONNX file beside its fp32 parent in {args.directory}: export first (make export)",
              file=sys.stderr)
        return 2
    if args.trace:
        for parent, child in pairs:
            trace(args.directory, parent, child, args.trace)
        return 0
    print(f"{'pair':42} {'batch':>5} {'window':>7} {'s/block':>8} {'median':>7} {'spread':>7} {'width':>6}")
    for parent, child in pairs:
        found = measure(args.directory, parent, child, args.blocks)
        for (b, w), rows in found.items():
            a = np.array(rows)
            print(f"{child + ' / ' + parent:42.42} {b:5d} {w * 1e3:5.0f}ms {a[:, 0].mean():8.2f} "
                  f"{np.median(a[:, 1]):7.3f} {a[:, 1].std():7.3f} {a[:, 2].mean():6.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
