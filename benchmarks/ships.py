"""What timing the int8 files of one parent together saves in the ship rule.

The ship rule times every int8 file against its fp32 parent (edgeq.speed). `ship_race` times the files of
one parent in the same rounds: a window of the parent, then one of each file still undecided, so k files
take k + 1 windows a round where one race per file takes 2k. This reads an export directory (its manifest
names each int8 file's parent and the recipe's threads and batch sizes; its val.npz gives the inputs, drawn
as the exporter draws them), groups the shipped int8 files by parent, and alternates two arms per group in
one run: `together` (one `ship_race` of the group, as `edgeq export` times them) and `one by one` (a
`ship_race` per file). It prints per group and arm the seconds, the blocks and the decisions, then the sums.
The arms time separately, so a decision near its threshold may differ between them by noise.

    .venv/bin/python benchmarks/ships.py artifacts --repeats 3
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from edgeq.precision import SearchConfig
from edgeq.speed import ship_race

FORMATS = {"ts": "torchscript", "onnx": "onnx", "pte": "pte"}


def groups(directory: Path) -> list[dict]:
    """The shipped int8 files per (model, parent): their paths, format and the recipe's timing settings."""
    manifest = json.loads((directory / "manifest.json").read_text())
    files = {a["name"]: directory / a["file"] for a in manifest["artifacts"]}
    out: dict[str, dict] = {}
    for a in manifest["artifacts"]:
        if a["precision"] != "int8" or a["parent"] not in files:
            continue
        recipe = manifest["models"][a["model"]]["recipe"]
        g = out.setdefault(a["parent"], {"parent": files[a["parent"]], "fmt": FORMATS[a["name"].rsplit("-", 1)[1]],
                                         "threads": recipe["threads"], "batches": recipe["batches"], "files": {}})
        g["files"][a["name"]] = files[a["name"]]
    return [{"name": k, **v} for k, v in out.items()]


def timing_inputs(val: np.ndarray, batches: list[int]) -> dict[int, np.ndarray]:
    """As edgeq.speed.timing_inputs draws them from the validation split."""
    rng = np.random.default_rng(0)
    return {n: val[rng.integers(0, len(val), size=n)] for n in batches}


def arm(g: dict, inputs: dict[int, np.ndarray], together: bool) -> tuple[float, int, dict[str, bool]]:
    """Seconds, blocks (summed over races) and ship decisions of one arm on one group."""
    cfg = SearchConfig(batches=tuple(g["batches"]), threads=g["threads"])
    t0 = time.perf_counter()
    if together:
        gates = ship_race(g["parent"], g["files"], g["fmt"], inputs, cfg)
        blocks = max(gate["evidence"]["blocks"] for gate in gates.values())
    else:
        gates = {n: ship_race(g["parent"], {n: p}, g["fmt"], inputs, cfg)[n] for n, p in g["files"].items()}
        blocks = sum(gate["evidence"]["blocks"] for gate in gates.values())
    return time.perf_counter() - t0, blocks, {n: gate["ship"] for n, gate in gates.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("directory", type=Path, help="an export directory (edgeq export --out DIR)")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    val = np.load(args.directory / "val.npz")["inputs"]
    totals = {True: [0.0] * args.repeats, False: [0.0] * args.repeats}
    for g in groups(args.directory):
        inputs = timing_inputs(val, g["batches"])
        for r in range(args.repeats):
            for together in ((True, False) if r % 2 == 0 else (False, True)):  # alternated
                s, blocks, ships = arm(g, inputs, together)
                totals[together][r] += s
                print(f"{g['name']} ({len(g['files'])} files) {'together' if together else 'one by one'} repeat {r}: "
                      f"{s:.2f} s, {blocks} blocks, dropped: {[n for n, ok in ships.items() if not ok] or 'none'}",
                      flush=True)
    for together, seconds in totals.items():
        print(f"sum over groups, {'together' if together else 'one by one'}: "
              + ", ".join(f"{s:.1f} s" for s in seconds))


if __name__ == "__main__":
    main()
